"""The sampler/learner mismatch of a bfloat16 sampler against a float32 learner, measured.

    python benchmarks/precision_mismatch.py --start=runs/sft   # the synthetic task's SFT start
    python benchmarks/precision_mismatch.py --gemma            # Gemma 3 270M (GGUF from PyPI)

`--start` is a run directory of `configs/arith_start.py`
(`python launch/train.py --config=configs/arith_start.py --workdir=runs/sft`);
its prompts are held-out synthetic questions, sampled as `configs/arith_ppo.py`
samples (8 per prompt, temperature 1, 48 new tokens, the template's stop
strings). `--gemma` samples zero-shot GSM8K test questions (4 per prompt,
temperature 1, 48 new tokens).

Every case samples with the engine (`Sampler`, its `dtype` the sampler's
precision) and scores the same tokens with the learner (a full forward,
`token_logprobs`, in the learner's precision), then reports
`rollout_correction.mismatch_metrics` on the completion tokens and what each
correction mode would do at C = 2. The cases:

    f32/f32          float32 sampler, float32 learner: today's exact on-policy baseline
    bf16/f32         bfloat16 weights copy and KV cache in the sampler, float32 learner
    bf16+head32/f32  the same with lm_head_fp32 in the sampler (float32 final norm + unembedding)
    bf16/bf16        bfloat16 compute on both sides (float32 masters): the same precision,
                     two code paths (KV-cache decode vs full forward)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from benchlib import load_average, matmul_peak_flops  # sets this checkout first on sys.path

from rl_reason.algorithms import rollout_correction as rc
from rl_reason.algorithms.logprobs import token_logprobs
from rl_reason.data import synthetic, templates
from rl_reason.models.transformer import Transformer
from rl_reason.sampling.engine import Sampler

CASES = {
    "f32/f32": (None, {}, {}),  # sampler dtype, sampler config changes, learner config changes
    "bf16/f32": ("bfloat16", {}, {}),
    "bf16+head32/f32": ("bfloat16", {"lm_head_fp32": True}, {}),
    "bf16/bf16": ("bfloat16", {}, {"dtype": "bfloat16"}),
}
MODES = ("token_tis", "token_mis", "sequence_tis", "sequence_mis")
CAP = 2.0


def _learner_logprobs(config, params, rollout, rows: int, chunk: int) -> np.ndarray:
    """The learner's log-probs of the rollout's completion tokens, `rows` rows at a time."""
    model = Transformer(config.replace(scan_layers=True))
    score = jax.jit(lambda p, t, m: token_logprobs(model, p, t, m, chunk_size=chunk).logprobs)
    seq = rollout.sequences()
    tokens, mask = np.asarray(seq["tokens"]), np.asarray(seq["input_mask"])
    width = rollout.prompt_tokens.shape[1]
    parts = []
    for start in range(0, tokens.shape[0], rows):
        t, m = tokens[start : start + rows], mask[start : start + rows]
        fill = rows - len(t)
        if fill:
            t = np.concatenate([t, np.zeros((fill, t.shape[1]), t.dtype)])
            m = np.concatenate([m, np.zeros((fill, m.shape[1]), bool)])
        parts.append(np.asarray(score(params, t, m))[: rows - fill, width:])
    return np.concatenate(parts)


def measure(
    config, params, tokenizer, prompts, *, samples, new_tokens, batch, buckets, rows, chunk
):
    results = {}
    for name, (dtype, sampler_changes, learner_changes) in CASES.items():
        clock = time.perf_counter()
        sampler = Sampler(
            config.replace(**sampler_changes),
            tokenizer,
            batch_size=batch,
            prompt_buckets=buckets,
            stop_strings=templates.STOP_SEQUENCES,
            dtype=dtype,
        )
        options = sampler.sampling_config(
            max_new_tokens=new_tokens, temperature=1.0, num_samples=samples
        )
        rollout = sampler.generate(params, prompts, jax.random.PRNGKey(0), options).rollout
        learner = _learner_logprobs(config.replace(**learner_changes), params, rollout, rows, chunk)
        mask = np.asarray(rollout.completion_mask)
        sampler_lp = np.asarray(rollout.logprobs)
        metrics = {k: float(v) for k, v in rc.mismatch_metrics(learner, sampler_lp, mask).items()}
        for mode in MODES:
            corr = rc.correct(mode, learner, sampler_lp, mask, CAP)
            for k, v in rc.correction_metrics(corr, mask).items():
                metrics[f"{mode}/{k}"] = float(v)
        metrics["seconds"] = time.perf_counter() - clock
        metrics["load"] = load_average()
        results[name] = metrics
        print(f"  {name}: " + json.dumps({k: round(v, 6) for k, v in metrics.items()}), flush=True)
    return results


def table(title: str, results: dict) -> str:
    cols = [
        ("k3 mean", "kl_k3_mean", "{:.2e}"),
        ("k3 max", "kl_k3_max", "{:.2e}"),
        ("mean abs dlogp", "logp_abs_diff_mean", "{:.2e}"),
        ("max abs dlogp", "logp_abs_diff_max", "{:.2e}"),
        ("ratio min", "ratio_min", "{:.4f}"),
        ("ratio max", "ratio_max", "{:.4f}"),
        ("outside [1/2,2]", "ratio_outside", "{:.2e}"),
        ("seq ratio min", "seq_ratio_min", "{:.4f}"),
        ("seq ratio max", "seq_ratio_max", "{:.4f}"),
        ("max abs seq log-ratio", "seq_log_ratio_abs_max", "{:.3f}"),
        ("token_mis rejected", "token_mis/rejected", "{:.2e}"),
        ("sequence_mis rejected", "sequence_mis/rejected", "{:.2e}"),
        ("tokens", "tokens", "{:.0f}"),
    ]
    lines = [f"{title}", "", "| sampler/learner | " + " | ".join(c[0] for c in cols) + " |"]
    lines.append("|---" * (len(cols) + 1) + "|")
    for name, m in results.items():
        lines.append(f"| {name} | " + " | ".join(f.format(m[k]) for _, k, f in cols) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--start", default="", help="run directory of configs/arith_start.py")
    parser.add_argument("--gemma", action="store_true", help="Gemma 3 270M on GSM8K questions")
    parser.add_argument("--prompts", type=int, default=0, help="0: 32 (start), 8 (Gemma)")
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument("--table", default="", help="only print the tables of this --json file")
    args = parser.parse_args()
    if args.table:
        with open(args.table) as f:
            for name, results in json.load(f).items():
                print(table(name, results) + "\n")
        return
    if not args.start and not args.gemma:
        parser.error("give --start=<run dir> and/or --gemma")
    print(
        f"load average {load_average():.1f}; float32 matmul peak"
        f" {matmul_peak_flops() / 1e9:.0f} GFLOP/s; bfloat16 matmul peak"
        f" {matmul_peak_flops(jnp.bfloat16) / 1e9:.0f} GFLOP/s",
        flush=True,
    )
    out = {}
    if args.start:
        from rl_reason.experiments import sources
        from rl_reason.parallel import mesh as mesh_lib
        from rl_reason.parallel import sharding as shd

        mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
        start = sources.load_run(args.start, mesh, shd.DEFAULT_RULES)
        n = args.prompts or 32
        prompts = [templates.format_prompt(ex["question"]) for ex in synthetic.generate("test", n)]
        print(
            f"synthetic start {args.start}: {start.config.num_params() / 1e6:.2f}M params, "
            f"{n} prompts x 8 samples, 48 new tokens",
            flush=True,
        )
        out["start"] = measure(
            start.config,
            start.params,
            start.tokenizer,
            prompts,
            samples=8,
            new_tokens=48,
            batch=32,
            buckets=(64, 128),
            rows=64,
            chunk=256,
        )
        print(table("synthetic start", out["start"]), flush=True)
    if args.gemma:
        from rl_reason.models.gemma3_270m import load_gemma3_270m

        loaded = load_gemma3_270m()
        n = args.prompts or 8
        path = os.path.join(
            os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k_test.jsonl"
        )
        if not os.path.exists(path):
            path = "/work/shared/data/gsm8k_test.jsonl"
        with open(path) as f:
            questions = [json.loads(line)["question"] for line in f][:n]
        prompts = [templates.format_prompt(q) for q in questions]
        print(f"Gemma 3 270M: {n} GSM8K prompts x 4 samples, 48 new tokens", flush=True)
        out["gemma"] = measure(
            loaded.config,
            loaded.params,
            loaded.tokenizer,
            prompts,
            samples=4,
            new_tokens=48,
            batch=8,
            buckets=(128, 256),
            rows=8,
            chunk=64,
        )
        print(table("Gemma 3 270M", out["gemma"]), flush=True)
    print(f"load average at the end {load_average():.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
