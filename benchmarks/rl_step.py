"""One GRPO iteration end to end: our on-policy loop's pieces against tunix's GRPOLearner.

    /work/venv-bench/bin/python benchmarks/rl_step.py                 # 4x2 and 16x4, 3 timed each
    /work/venv-bench/bin/python benchmarks/rl_step.py --rows 4x2 --iterations 5
    /work/venv-bench/bin/python benchmarks/rl_step.py --quick         # 2 layers, 16+16 tokens
    /work/venv-bench/bin/python benchmarks/rl_step.py --systems ours,ours_continuous,tunix

The venv holds tunix beside our pinned stack (see benchmarks/requirements.txt).

An iteration, in both systems: P prompts of 128 random token ids (the same
ones for both, new ones every iteration) -> K samples each, 128 new tokens
at temperature 0.9 (no EOS can fire, so every row runs the whole budget) ->
decoded text -> a reward (the fraction of even token ids, on the text) ->
group advantages -> the reference model's log-probs -> one AdamW step on the
P*K x 256 tokens (the clipped GRPO loss with a beta 0.04 KL term, sequence
mean of token means). Both start from the same random Llama-style weights
(ours, copied into tunix's Llama3).

- ours: the pieces `experiments/on_policy.py` runs, built as it builds them:
  `rollout.collect` (engine `Sampler` on the learner's params, decode,
  rewards), `ppo.score` + `on_policy.advantages_and_rewards` (one jit each),
  the jitted, donated `ppo_update` with `grpo.grpo_ppo_config`.
- ours_continuous: the same with `sampling.engine="continuous"`: the
  continuous-batching engine over its paged KV cache, one slot per row.
- tunix: `GRPOLearner` over an `RLCluster` (vanilla rollout, actor, rollout
  and reference colocated on one mesh), driven one global step at a time
  exactly as `RLLearner.train` drives it; its phases are timed by wrapping
  `RLCluster.generate`, `get_ref_per_token_logps` and `update_actor`.

Phases: generate (sampling + text + rewards), reference (the reference
model's log-probs, and for ours the group advantages: with one optimizer
step per rollout neither system recomputes the policy's log-probs first),
update; "other" is the rest of the iteration. Each figure is the median
over --iterations timed iterations after one warm-up (compiling) iteration
per system, the systems interleaved (ours, tunix, ours, ...) so that load
from other work hits both. Ours unembeds --chunk positions at a time and
skips the chunks that hold prompt positions only.

Roofline: the model FLOPs an iteration needs (PaLM's count: 2 x matmul
params per token forward, 3 x that for forward + backward, plus attention's
two products), the same count for both systems: generation prefills each
distinct prompt once and decodes P*K x 128 tokens; the reference scores the
P*K x 256 tokens once; the update is one forward and backward over them.
A phase's fraction is its FLOPs at the f32 matmul peak measured in this
run (before, between rows, after; the best reading) over its measured time.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from benchlib import (  # benchmarks/ is on the path when run as a script; sets ours first
    IdTokenizer,
    OnPolicyIteration,
    forward_flops,
    ids_to_text,
    init_params,
    load_average,
    make_prompts,
    matmul_peak_flops,
    peak_rss_bytes,
    tunix_llama3,
)

from rl_reason.algorithms.grpo import grpo_ppo_config
from rl_reason.experiments import sources
from rl_reason.experiments.config import rl_config
from rl_reason.models.config import ModelConfig, llama_50m
from rl_reason.models.transformer import Transformer
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd
from rl_reason.rewards.compose import Composite

PHASES = ("generate", "reference", "update")
# tunix 0.1.7's Llama3 applies RoPE with its default base of 1e6 whatever the
# config says, so both systems use that base; it does not change the cost.
ROPE_BASE = 1_000_000.0
BETA = 0.04  # the KL loss coefficient: tunix's GRPO default, and grpo_ppo_config's
CLIP_EPS = 0.2


def model_config(quick: bool) -> ModelConfig:
    """The 56M Llama of the issue: 512 x 8, MLP 1408, 8 query / 4 KV heads, vocab 32000, untied."""
    config = llama_50m(mlp_dim=1408, num_kv_heads=4, rope_base=ROPE_BASE)
    return config.replace(num_layers=2) if quick else config


def even_fraction(texts: list[str]) -> list[float]:
    """The reward: the fraction of a completion's token ids that are even (varies per sample)."""
    out = []
    for text in texts:
        ids = [int(x) for x in text.split()]
        out.append(sum(1 for x in ids if x % 2 == 0) / max(len(ids), 1))
    return out


class _EvenFraction:
    """`even_fraction` as an rl_reason reward function (sparse: one float per completion)."""

    dense = False

    def __call__(self, completions, batch):
        return even_fraction(completions)


def grpo_config(*, prompts, samples, prompt_len, new_tokens, temperature, lr, chunk=256):
    """The run config of this iteration, as configs/arith_grpo.py writes one."""
    config = rl_config("grpo")
    config.rl.update(
        advantage="grpo",
        kl_coef=0.0,  # GRPO's KL is the loss term below
        num_iterations=10_000,
        prompts_per_iteration=prompts,
        num_samples=samples,
        max_new_tokens=new_tokens,
        temperature=temperature,
    )
    config.sampling.update(batch_size=prompts, prompt_buckets=(prompt_len,))
    config.ppo.update(
        dataclasses.asdict(grpo_ppo_config(kl_loss_coef=BETA, clip_eps=CLIP_EPS, chunk_size=chunk))
    )
    config.optim.update(lr=lr, schedule="constant", warmup_steps=0)
    return config


class Ours:
    """The on-policy loop's pieces (experiments/on_policy.py) on a (1, 1, 1) mesh."""

    def __init__(self, config, params, run_config, engine="static"):
        if engine != "static":  # every row of an iteration in a slot of its own
            run_config = run_config.copy_and_resolve_references()
            rl = run_config.rl
            run_config.sampling.update(
                engine=engine, slots=rl.prompts_per_iteration * rl.num_samples
            )
        mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
        start = sources.LoadedModel(config, params, IdTokenizer())
        reward = Composite((("even_fraction", 1.0, _EvenFraction()),))
        self.step = OnPolicyIteration(
            run_config, start, mesh, shd.DEFAULT_RULES, reward, full_length=True
        )
        self.last = {}

    def iteration(self, prompt_ids: np.ndarray, index: int) -> dict[str, float]:
        texts = ids_to_text(prompt_ids)
        times = self.step([{"question": t} for t in texts], texts, index)
        self.last = self.step.last
        return times


class Tunix:
    """tunix's GRPOLearner, one global step per call, as RLLearner.train runs it."""

    def __init__(self, config, params, run_config):
        import optax
        from jax.sharding import Mesh
        from tunix.rl import rl_cluster as rl_cluster_lib
        from tunix.rl.grpo import grpo_learner
        from tunix.rl.rollout import base_rollout

        self.mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
        actor = tunix_llama3(config, params)
        reference = tunix_llama3(config, params)
        rl, optim = run_config.rl, run_config.optim  # the same AdamW as ours
        prompts, samples = rl.prompts_per_iteration, rl.num_samples
        prompt_len, new_tokens = max(run_config.sampling.prompt_buckets), rl.max_new_tokens
        tx = optax.chain(
            optax.clip_by_global_norm(optim.grad_clip),
            optax.adamw(
                optim.lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay
            ),
        )
        roles = rl_cluster_lib.Role
        cluster_config = rl_cluster_lib.ClusterConfig(
            role_to_mesh={
                roles.ACTOR: self.mesh,
                roles.REFERENCE: self.mesh,
                roles.ROLLOUT: self.mesh,
            },
            rollout_engine="vanilla",
            offload_to_cpu=False,
            training_config=rl_cluster_lib.RLTrainingConfig(
                actor_optimizer=tx, eval_every_n_steps=10**9, max_steps=10**9
            ),
            rollout_config=base_rollout.RolloutConfig(
                max_tokens_to_generate=new_tokens,
                max_prompt_length=prompt_len,
                kv_cache_size=prompt_len + new_tokens,
                temperature=rl.temperature,
                top_p=rl.top_p,
                top_k=None,
                eos_tokens=[config.vocab_size],  # an id no model output can take
            ),
        )
        self.cluster = rl_cluster_lib.RLCluster(
            actor=actor, reference=reference, tokenizer=IdTokenizer(), cluster_config=cluster_config
        )
        self.learner = grpo_learner.GRPOLearner(
            self.cluster,
            grpo_learner.GRPOConfig(
                num_generations=samples, num_iterations=1, beta=BETA, epsilon=CLIP_EPS
            ),
            reward_fns=lambda prompts, completions, **kwargs: even_fraction(completions),
        )
        # RLLearner.train's set-up, for a full batch of `prompts` prompts and no micro-batching.
        self.prompts = prompts
        learner = self.learner
        learner._rollout_micro_batch_size = learner._rollout_micro_batch_size or prompts
        learner._compute_logps_micro_batch_size = learner._compute_logps_micro_batch_size or prompts
        self.service_target = max(
            learner._rollout_micro_batch_size, learner._compute_logps_micro_batch_size
        )
        self.times: dict[str, float] = {}
        self._time("generate", "generate")
        self._time("get_ref_per_token_logps", "reference")
        self._time("update_actor", "update")
        self.last = {}

    def _time(self, method: str, phase: str) -> None:
        original = getattr(self.cluster, method)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            clock = time.perf_counter()
            out = original(*args, **kwargs)
            if phase == "update":
                jax.block_until_ready(jax.tree.leaves(self._actor_state()))
            else:
                jax.block_until_ready(out)
            self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - clock
            return out

        setattr(self.cluster, method, timed)

    def _actor_state(self):
        from flax import nnx

        return nnx.state(self.cluster.actor_trainer.model)

    def iteration(self, prompt_ids: np.ndarray, index: int) -> dict[str, float]:
        self.times = {}
        learner = self.learner
        batch = {
            "prompts": np.array(ids_to_text(prompt_ids))
        }  # one leaf, as a data loader gives it
        learner._run_global_step(
            self.prompts, self.prompts, self.service_target, 1, iter([batch]), None, False
        )
        if learner.should_sync_weights:
            self.cluster.sync_weights()
        else:
            self.cluster.global_steps += 1
        self.last = {"loss": _last_loss(self.cluster)}
        return dict(self.times)


def _last_loss(cluster) -> float:
    buffered = cluster.actor_trainer._prev_buffered_train_metrics  # the step just taken
    try:
        return float(np.asarray(buffered.losses[-1]))
    except (AttributeError, IndexError, TypeError):
        return float("nan")


def check_same_weights(config: ModelConfig, params: dict, tokens: np.ndarray) -> float:
    """Max |log-prob difference| between our model and the tunix copy on one sequence."""
    from tunix.rl import common as tunix_common

    model = Transformer(config)
    mask = np.ones(tokens.shape, bool)
    out = model.apply(params, tokens, np.arange(tokens.shape[1])[None], mask)
    ours = jax.nn.log_softmax(model.apply(params, out.hidden, method=Transformer.logits))
    tunix = tunix_llama3(config, params)
    half = tokens.shape[1] // 2
    from flax import nnx

    graphdef, state = nnx.split(tunix)
    theirs = tunix_common.compute_per_token_logps(
        graphdef, state, tokens[:, :half], tokens[:, half:], pad_id=0, eos_id=None
    )
    ours_target = jnp.take_along_axis(ours[:, half - 1 : -1], tokens[:, half:, None], axis=-1)[
        ..., 0
    ]
    return float(jnp.abs(ours_target - theirs).max())


def iteration_flops(config: ModelConfig, prompts: int, samples: int, prompt_len: int, new: int):
    rows, length = prompts * samples, prompt_len + new
    unembed_one = 2 * config.vocab_size * config.hidden_dim
    generate = (
        forward_flops(config, prompts * prompt_len, prompt_len, unembed=False)
        + prompts * unembed_one  # the prefill's last position
        + forward_flops(config, rows * new, prompt_len + new / 2)
    )
    reference = forward_flops(config, rows * length, length)
    return {"generate": generate, "reference": reference, "update": 3 * reference}


# ours_continuous: ours with sampling.engine="continuous" (a slot per row of the iteration).
SYSTEMS = ("ours", "ours_continuous", "tunix")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="4x2,16x4", help="prompts x samples per iteration")
    parser.add_argument("--systems", default="ours,tunix", help=f"among {SYSTEMS}")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per system")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument(
        "--chunk", type=int, default=32, help="ppo.chunk_size: positions unembedded at a time"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 layers, 16 + 16 tokens, 1 timed")
    args = parser.parse_args()
    if args.quick:
        args.prompt_len, args.new_tokens, args.iterations = 16, 16, 1
    systems = args.systems.split(",")
    if not set(systems) <= set(SYSTEMS):
        parser.error(f"systems are among {SYSTEMS}")
    shapes = [tuple(int(x) for x in row.split("x")) for row in args.rows.split(",")]
    config = model_config(args.quick)

    start_all = time.perf_counter()
    loads = [load_average()]
    peaks = [matmul_peak_flops()]
    params = init_params(config, args.seed)
    print(
        f"llama 56M{' (2 layers, --quick)' if args.quick else ''}: {config.num_params() / 1e6:.1f}M"
        f" params; prompt {args.prompt_len}, {args.new_tokens} new tokens at temperature"
        f" {args.temperature}; ppo.chunk_size {args.chunk}; median of {args.iterations} after 1"
        f" warm-up; load average"
        f" {loads[0]:.1f}; f32 matmul peak {peaks[0] / 1e9:.0f} GFLOP/s",
        flush=True,
    )
    if "tunix" in systems:
        probe = make_prompts(config, 1, args.prompt_len + args.new_tokens, args.seed + 999)
        diff = check_same_weights(config, params, probe)
        print(f"same weights: max |log-prob ours - tunix| = {diff:.2e} on one sequence", flush=True)

    results = []
    for prompts, samples in shapes:
        run_config = grpo_config(
            prompts=prompts,
            samples=samples,
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            temperature=args.temperature,
            lr=args.lr,
            chunk=args.chunk,
        )
        runners = {}
        for name in systems:
            if name == "tunix":
                runners[name] = Tunix(config, params, run_config)
            else:
                engine = "continuous" if name == "ours_continuous" else "static"
                runners[name] = Ours(config, params, run_config, engine)
        timings = {name: [] for name in systems}
        for i in range(args.iterations + 1):  # the first is the warm-up (compilation)
            prompt_ids = make_prompts(config, prompts, args.prompt_len, args.seed + 1 + i)
            for name, runner in runners.items():
                clock = time.perf_counter()
                phases = runner.iteration(prompt_ids, i)
                total = time.perf_counter() - clock
                phases["other"] = total - sum(phases.get(p, 0.0) for p in PHASES)
                phases["total"] = total
                if i:
                    timings[name].append(phases)
                print(
                    f"  {prompts}x{samples} {name} {'warm-up' if not i else f'#{i}'}: "
                    + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items())
                    + f"; {runner.last}; load {load_average():.1f}",
                    flush=True,
                )
        loads.append(load_average())
        peaks.append(matmul_peak_flops())
        medians = {
            name: {k: statistics.median(t[k] for t in runs) for k in runs[0]}
            for name, runs in timings.items()
        }
        results.append(((prompts, samples), medians))
        del runners

    peak = max(peaks)
    print(
        "\n| rows | system | iteration s | generate s | reference s | update s | other s |"
        " iteration roofline % | generate % | reference % | update % |"
    )
    print("|---" * 11 + "|")
    for (prompts, samples), medians in results:
        flops = iteration_flops(config, prompts, samples, args.prompt_len, args.new_tokens)
        for name, m in medians.items():
            cells = [f"{m['total']:.2f}"] + [f"{m.get(p, 0.0):.2f}" for p in (*PHASES, "other")]
            cells.append(f"{100 * sum(flops.values()) / peak / m['total']:.0f}%")
            cells += [f"{100 * flops[p] / peak / m[p]:.0f}%" if m.get(p) else "-" for p in PHASES]
            print(f"| {prompts} x {samples} | {name} | {' | '.join(cells)} |")
        for name in [n for n in ("ours", "ours_continuous") if "tunix" in medians and n in medians]:
            ours, tunix = medians[name], medians["tunix"]
            ratios = ", ".join(
                f"{p} {tunix[p] / ours[p]:.2f}x" for p in PHASES if ours.get(p) and tunix.get(p)
            )
            print(
                f"  {prompts} x {samples}: {name} {tunix['total'] / ours['total']:.2f}x tunix"
                f" ({ratios})"
            )
    print(
        f"\nf32 matmul peak (GFLOP/s) {', '.join(f'{p / 1e9:.0f}' for p in peaks)} (roofline uses"
        f" {peak / 1e9:.0f}); load average {', '.join(f'{x:.1f}' for x in loads)}; peak RSS"
        f" {peak_rss_bytes() / 1e9:.1f} GB; total time {time.perf_counter() - start_all:.0f} s"
    )


if __name__ == "__main__":
    main()
