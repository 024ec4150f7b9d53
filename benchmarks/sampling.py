"""Sampling throughput: our `sample_jit` against transformers' `generate` and tunix's sampler.

    /work/venv-bench/bin/python benchmarks/sampling.py            # batch 1/8/32/64, greedy + sampled
    /work/venv-bench/bin/python benchmarks/sampling.py --quick    # smoke run: 2 layers, 16 tokens
    /work/venv-bench/bin/python benchmarks/sampling.py --batches 32 --modes greedy --systems ours,tunix

The venv holds tunix beside our pinned stack (see benchmarks/requirements.txt).
Every system (ours with XLA's defaults, ours with the `CPU_XNNPACK_DOTS` compiler
options, the continuous-batching engine, transformers, tunix) gets the same random weights (ours, converted) and the same
64-token prompts, and generate exactly the same number of new tokens (no EOS
can fire). Tokens/s is batch x new tokens over the wall time of one whole
call, prompt ids on the host in, token ids on the host out, prefill included;
each cell is the best of --repeats calls after an untimed warm-up (compilation)
call, the systems' calls interleaved so that load from other work hits all of
them. The roofline fraction is 2 x params x tokens/s over the f32 matmul peak
that this run measures (before and after; the better of the two). The process
runs as the launchers do (huge-page malloc, CPUs fitted to a quota: `rl_reason.process_setup`).
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import numpy as np
import torch
import transformers
from benchlib import (  # benchmarks/ is on the path when run as a script; sets ours first
    PAD,
    IdTokenizer,
    ids_to_text,
    init_params,
    load_average,
    make_prompts,
    matmul_peak_flops,
    tunix_llama3,
)

from rl_reason import process_setup

process_setup.use_huge_page_malloc()  # as the launchers run (restarts this process once)
process_setup.fit_cpus_to_quota()

from rl_reason.models.config import ModelConfig, llama_125m
from rl_reason.models.hf_config import hf_config_dict
from rl_reason.models.hf_export import hf_state_dict
from rl_reason.models.transformer import Transformer
from rl_reason.sampling.continuous import Engine, EngineConfig
from rl_reason.sampling.sampler import CPU_XNNPACK_DOTS, SamplingConfig, jit_sample

SYSTEMS = ("ours", "ours_xnn", "engine", "generate", "tunix")
OURS = ("ours", "ours_xnn", "engine")
# ours_xnn: the same sampler compiled with CPU_XNNPACK_DOTS (see BENCHMARKS.md);
# engine: the continuous-batching engine over its paged KV cache, one slot per row.
MODES = ("greedy", "sampled")
# tunix 0.1.7's Llama3 applies RoPE with its default base of 1e6 whatever the
# config says, so every system uses that base; it does not change the cost.
ROPE_BASE = 1_000_000.0
CHECK_TOKENS = 16  # leading greedy tokens that must agree across systems


class Ours:
    """rl_reason's jitted sampler, called as the engine calls it (stacked params)."""

    def __init__(self, config: ModelConfig, params: dict, compiler_options=None):
        self.model = Transformer(config.replace(scan_layers=False))
        self.params = params
        self.sample = jit_sample(compiler_options)

    def generate(self, prompts, greedy, new_tokens, seed):
        config = SamplingConfig(
            max_new_tokens=new_tokens, temperature=0.0 if greedy else 1.0, pad_id=PAD
        )
        mask = np.ones(prompts.shape, bool)
        rng = jax.random.PRNGKey(seed)
        rollout = self.sample(self.model, self.params, prompts, mask, rng, config)
        return np.asarray(rollout.completion_tokens)


class Paged:
    """rl_reason's continuous-batching engine (sampling/continuous.py), a slot per row."""

    def __init__(self, config: ModelConfig, params: dict):
        self.config, self.params, self.engines = config, params, {}

    def generate(self, prompts, greedy, new_tokens, seed):
        batch = len(prompts)
        if batch not in self.engines:
            self.engines[batch] = Engine(self.config, EngineConfig(slots=batch))
        config = SamplingConfig(
            max_new_tokens=new_tokens, temperature=0.0 if greedy else 1.0, pad_id=PAD
        )
        rollout = self.engines[batch].generate(
            self.params, prompts.tolist(), jax.random.PRNGKey(seed), config
        )
        return np.asarray(rollout.completion_tokens)


class Generate:
    """transformers' LlamaForCausalLM.generate (PyTorch, default dynamic cache)."""

    def __init__(self, config: ModelConfig, params: dict):
        # No BOS/EOS: nothing may stop generation before the token budget.
        ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": PAD}
        hf_config = transformers.LlamaConfig.from_dict(hf_config_dict(config, ids))
        self.model = transformers.LlamaForCausalLM(hf_config).eval()
        state = {k: torch.tensor(v) for k, v in hf_state_dict(config, params).items()}
        self.model.load_state_dict(state, strict=True)

    def generate(self, prompts, greedy, new_tokens, seed):
        gen = transformers.GenerationConfig(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=not greedy,
            temperature=1.0,
            top_k=0,  # 0 switches off generate's default top-k of 50
            top_p=1.0,
            eos_token_id=None,
            pad_token_id=PAD,
        )
        ids = torch.from_numpy(prompts).long()
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen
            )
        return out[:, prompts.shape[1] :].numpy()


class Tunix:
    """tunix's native JAX sampler (tunix.generate.sampler.Sampler) over its Llama3 model."""

    def __init__(self, config: ModelConfig, params: dict, max_length: int):
        from tunix.generate import sampler as tunix_sampler

        model = tunix_llama3(config, params, sampling=True)
        cache = tunix_sampler.CacheConfig(
            cache_size=max_length,
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
        )
        self.sampler = tunix_sampler.Sampler(model, IdTokenizer(), cache)
        self.never = config.vocab_size  # an EOS id no model output can take

    def generate(self, prompts, greedy, new_tokens, seed):
        out = self.sampler(
            ids_to_text(prompts),
            max_generation_steps=new_tokens,
            max_prompt_length=prompts.shape[1],
            eos_tokens=[self.never],
            temperature=0.0 if greedy else 1.0,
            top_p=None if greedy else 1.0,
            seed=seed,
        )
        return np.stack([np.asarray(t) for t in out.tokens])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per cell (best kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 layers, batches 1,4, 16 tokens")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    modes = args.modes.split(",")
    systems = args.systems.split(",")
    if not set(modes) <= set(MODES) or not set(systems) <= set(SYSTEMS):
        parser.error(f"modes must be in {MODES}, systems in {SYSTEMS}")
    config = llama_125m(rope_base=ROPE_BASE)
    if args.quick:
        config = config.replace(num_layers=2)
        batches, args.new_tokens, args.repeats = [1, 4], 16, 1

    start_all = time.perf_counter()
    load_before = load_average()
    peak_before = matmul_peak_flops()
    params = init_params(config, args.seed)
    runners = {}
    for name in systems:
        if name == "ours":
            runners[name] = Ours(config, params)
        elif name == "ours_xnn":
            runners[name] = Ours(config, params, CPU_XNNPACK_DOTS)
        elif name == "engine":
            runners[name] = Paged(config, params)
        elif name == "generate":
            runners[name] = Generate(config, params)
        else:
            runners[name] = Tunix(config, params, args.prompt_len + args.new_tokens)
    print(
        f"llama_125m{' (2 layers, --quick)' if args.quick else ''}:"
        f" {config.num_params() / 1e6:.1f}M params, prompt {args.prompt_len},"
        f" {args.new_tokens} new tokens, best of {args.repeats}; torch threads"
        f" {torch.get_num_threads()}; load average {load_before:.1f}",
        flush=True,
    )
    prompts_all = make_prompts(config, max(batches), args.prompt_len, args.seed)
    rows = []
    for batch in batches:
        prompts = prompts_all[:batch]
        for mode in modes:
            greedy = mode == "greedy"
            calls = {
                name: functools.partial(
                    runner.generate, prompts, greedy, args.new_tokens, args.seed
                )
                for name, runner in runners.items()
            }
            firsts = {name: call()[0] for name, call in calls.items()}  # warm-up, compile
            best = dict.fromkeys(calls, float("inf"))
            for _ in range(args.repeats):  # interleaved, so load changes hit every system
                for name, call in calls.items():
                    start = time.perf_counter()
                    tokens = call()
                    best[name] = min(best[name], time.perf_counter() - start)
                    if tokens.shape != (batch, args.new_tokens):
                        raise RuntimeError(f"{name} returned {tokens.shape} tokens")
            tps = {name: batch * args.new_tokens / best[name] for name in calls}
            print(
                f"  batch {batch} {mode}: "
                + ", ".join(f"{name} {tps[name]:.1f} tok/s" for name in calls),
                flush=True,
            )
            if greedy and len(firsts) > 1:
                ref = firsts[systems[0]]
                agree = {n: int(np.argmin(np.append(t == ref, False))) for n, t in firsts.items()}
                verdict = "agree" if min(agree.values()) >= CHECK_TOKENS else "DISAGREE"
                print(
                    f"  greedy check, batch {batch} row 0: systems {verdict} on the first"
                    f" {CHECK_TOKENS} tokens (leading tokens equal to {systems[0]}: {agree};"
                    f" first 8 of {systems[0]}: {ref[:8].tolist()})",
                    flush=True,
                )
            rows.append((batch, mode, tps))

    peak_after = matmul_peak_flops()
    # The machine's peak is the better of the two measurements; other work only lowers it.
    peak = max(peak_before, peak_after)
    ours = [name for name in OURS if name in systems]
    peers = [name for name in ("generate", "tunix") if name in systems]
    header = [f"{name} tok/s" for name in systems]
    header += [f"{o}/{p}" for o in ours for p in peers] + [f"{o} roofline %" for o in ours]
    print(f"\n| batch | mode | {' | '.join(header)} |\n|{'---|' * (len(header) + 2)}")
    for batch, mode, tps in rows:
        cells = [f"{tps[name]:.1f}" for name in systems]
        cells += [f"{tps[o] / tps[p]:.2f}x" for o in ours for p in peers]
        cells += [f"{100 * 2 * config.num_params() * tps[o] / peak:.1f}%" for o in ours]
        print(f"| {batch} | {mode} | {' | '.join(cells)} |")
    print(
        f"\nf32 matmul peak {peak_before / 1e9:.0f} GFLOP/s before, {peak_after / 1e9:.0f} after"
        f" (roofline uses {peak / 1e9:.0f}); load average {load_before:.1f} before,"
        f" {load_average():.1f} after; total time {time.perf_counter() - start_all:.0f} s"
    )


if __name__ == "__main__":
    main()
