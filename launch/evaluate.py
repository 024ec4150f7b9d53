"""Evaluates a model on GSM8K, SVAMP or the synthetic task: maj@1, maj@K, pass@K, diversity.

    python launch/evaluate.py --config=configs/synthetic_eval.py --workdir=runs/eval \
        --config.model_source.path=runs/default
    python launch/evaluate.py --config=configs/gemma3_270m_svamp_eval.py --workdir=runs/svamp

Writes eval_metrics.json, eval_samples.jsonl and report.md into --workdir.
"""

import os
import sys

from absl import app, flags, logging

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# This checkout's rl_reason, not an installed one: the default config is loaded
# (and imports rl_reason) as soon as the flag is defined.
sys.path.insert(0, _ROOT)

from rl_reason import process_setup  # noqa: E402 (after the path is set)

process_setup.use_huge_page_malloc()  # restarts this process once, before anything is loaded
process_setup.fit_cpus_to_quota()  # before JAX sizes its thread pools

from rl_reason.experiments import cli  # noqa: E402

cli.define_config_flag(
    "config", os.path.join(_ROOT, "configs", "synthetic_eval.py"), "Evaluation config file."
)
flags.DEFINE_string("workdir", "runs/eval", "Where the report and samples go.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # Orbax reports every file it writes at INFO
        logging.set_verbosity(logging.WARNING)
    from rl_reason.experiments import evaluate

    process_setup.use_compilation_cache(flags.FLAGS.workdir)

    cli.run_reporting_errors(evaluate.run, flags.FLAGS.config, flags.FLAGS.workdir)
    import jax

    if jax.process_index() != 0:  # process 0 wrote the report; the others only helped
        return
    with open(os.path.join(flags.FLAGS.workdir, "report.md")) as f:
        print(f.read())


if __name__ == "__main__":
    app.run(main)
