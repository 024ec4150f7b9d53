"""Runs (or resumes) a training job.

    python launch/train.py                                  # built-in default
    python launch/train.py --config=configs/sft_synthetic.py --workdir=runs/sft \
        --config.optim.lr=3e-4

Re-running the same command on the same --workdir resumes from its latest
checkpoint. Unknown keys and wrongly typed values fail before anything compiles.
SIGTERM or Ctrl-C saves after the current step and exits with status 75
(rerun to resume); a run that cannot continue exits with status 1 and one
paragraph saying why.
"""

import os
import sys

from absl import app, flags, logging

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# This checkout's rl_reason, not an installed one (another checkout's, with an
# editable install): the default config below is loaded, and imports rl_reason,
# as soon as the flag is defined, so the path must be set first.
sys.path.insert(0, _ROOT)

from rl_reason import process_setup  # noqa: E402 (after the path is set)

process_setup.use_huge_page_malloc()  # restarts this process once, before anything is loaded
process_setup.fit_cpus_to_quota()  # before JAX sizes its thread pools

from rl_reason.experiments import cli  # noqa: E402

_DEFAULT_CONFIG = os.path.join(_ROOT, "configs", "study_mini.py")

cli.define_config_flag("config", _DEFAULT_CONFIG, "Experiment config file.")
flags.DEFINE_string("workdir", "runs/default", "Run directory: checkpoints, logs, config.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # Orbax reports every file it writes at INFO
        logging.set_verbosity(logging.WARNING)
    from rl_reason.experiments import registry

    config = flags.FLAGS.config
    process_setup.use_compilation_cache(flags.FLAGS.workdir)
    metrics = cli.run_reporting_errors(registry.trainer(config), config, flags.FLAGS.workdir)
    print("final metrics:", metrics)


if __name__ == "__main__":
    app.run(main)
