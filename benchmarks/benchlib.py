"""What the side-by-side benchmarks share: the machine's peak, its load, model FLOPs,
random weights and prompts, and the peers' models built from our weights.

Importing this module puts this checkout's root first on sys.path (as the
launchers do), so `python benchmarks/<name>.py` measures this checkout's
rl_reason, not another one.
"""

from __future__ import annotations

import functools
import os
import resource
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rl_reason.models.config import ModelConfig
from rl_reason.models.transformer import Transformer

PAD = 0  # prompts never contain it


# --- the machine --------------------------------------------------------------


def matmul_peak_flops(dtype=jnp.float32, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a jitted n x n x n matmul: the roofline's peak, measured in the run."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        f(a).block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def load_average() -> float:
    """The 1-minute load average: how many runnable processes shared the cores."""
    return os.getloadavg()[0]


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# --- model FLOPs (PaLM's count: matmuls, plus attention's two products) ------------


def matmul_params(config: ModelConfig) -> int:
    """Parameters used in matmuls: all but the input embedding (a lookup), the
    table counted once more when it is also the unembedding."""
    n = config.num_params() - config.vocab_size * config.hidden_dim
    if config.tie_embeddings:
        n += config.vocab_size * config.hidden_dim
    return n


def forward_flops(config: ModelConfig, tokens: int, context: float, unembed: bool = True) -> float:
    """FLOPs of a forward pass over `tokens` tokens attending to `context` positions each.

    2 x matmul params per token, 4 x layers x context x attention width for
    q.k and p.v; `unembed=False` leaves the unembedding out (a prefill that
    needs the last position's logits only counts them separately).
    """
    params = matmul_params(config)
    if not unembed:
        params -= config.vocab_size * config.hidden_dim
    attention = 4 * config.num_layers * context * config.num_heads * config.head_dim
    return tokens * (2 * params + attention)


def train_flops_per_token(config: ModelConfig, length: int) -> float:
    """Forward and backward (3 x the forward) of one token in a sequence of `length`."""
    return 3 * forward_flops(config, 1, length)


# --- the same weights and prompts for every system ---------------------------------


def init_params(config: ModelConfig, seed: int) -> dict:
    """Random weights in the stacked (training) layout, as a trainer hands them to the sampler."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    return nn.meta.unbox(Transformer(config).init(jax.random.PRNGKey(seed), tokens, tokens))


def make_prompts(config: ModelConfig, batch: int, length: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(PAD + 1, config.vocab_size, (batch, length)).astype(np.int32)


class IdTokenizer:
    """Token ids written as text, so that string APIs see exactly our prompt ids.

    Speaks tunix's tokenizer protocol (encode, decode, bos_id, eos_id, pad_id)
    and the Hugging Face calls rl_reason's sampling engine makes.
    """

    bos_token_id = None
    eos_token_id = None
    pad_token_id = PAD

    def __call__(self, text, add_special_tokens=False, **kwargs):
        return {"input_ids": self.encode(text)}

    def encode(self, text, **kwargs):
        return [int(x) for x in text.split()]

    def decode(self, ids, **kwargs):
        return " ".join(map(str, ids))

    def bos_id(self):
        return None

    def eos_id(self):
        return None

    def pad_id(self):
        return PAD


def ids_to_text(rows: np.ndarray) -> list[str]:
    return [" ".join(map(str, row)) for row in rows]


def tunix_llama3(config: ModelConfig, params: dict, *, sampling: bool = False):
    """tunix's Llama3 (flax nnx) holding `params` (ours, stacked layout).

    tunix 0.1.7's Llama3 applies RoPE with its default base of 1e6 whatever
    its config says: give our model rope_base=1e6 for the two to agree.
    """
    from flax import nnx
    from tunix.models.llama3 import model as tunix_llama

    tconfig = tunix_llama.ModelConfig(
        num_layers=config.num_layers,
        vocab_size=config.vocab_size,
        embed_dim=config.hidden_dim,
        hidden_dim=config.mlp_dim,
        num_heads=config.num_heads,
        head_dim=config.head_dim,
        num_kv_heads=config.num_kv_heads,
        rope_theta=int(config.rope_base),
        norm_eps=config.norm_eps,
        shd_config=tunix_llama.ShardingConfig.get_default_sharding(is_sampling=sampling),
    )
    model = tunix_llama.Llama3(tconfig, rngs=nnx.Rngs(0))
    p = params["params"]
    copy = lambda x: jnp.array(x, copy=True)  # the peer owns its buffers
    model.embedder.input_embedding.value = copy(p["embedder"]["embedding"])
    model.final_norm.w.value = copy(p["final_norm"]["scale"])
    model.lm_head.w.value = copy(p["lm_head"])
    layers = p["layers"]
    for i, layer in enumerate(model.layers):
        layer.input_layernorm.w.value = copy(layers["pre_attn_norm"]["scale"][i])
        layer.post_attention_layernorm.w.value = copy(layers["pre_mlp_norm"]["scale"][i])
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer.attn, name).w.value = copy(layers["attn"][name]["kernel"][i])
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(layer.mlp, name).kernel.value = copy(layers["mlp"][name]["kernel"][i])
    return model


# --- one iteration of our on-policy loop -------------------------------------------


class OnPolicyIteration:
    """One iteration of `experiments/on_policy.py`'s loop, its pieces built from an RL
    config as `on_policy.train` builds them, without logging or checkpoints.

    `start` is the loaded start model (as `sources.load_model` returns it): its
    params become the frozen reference, a copy (with a value head when PPO
    has one, and `rl.remat` if set) the trained state. `full_length=True`
    samples with no EOS and no stop strings, so that every row runs
    rl.max_new_tokens tokens: the shapes, and the work, are the budget's.
    Phases are timed apart (with a wait for the devices in between):
    generate (sampler, text, rewards), reference (policy and reference
    log-probs, values, advantages), update.
    """

    def __init__(self, config, start, mesh, rules, reward_fn, *, full_length: bool = False):
        from rl_reason.algorithms import optimizer, ppo
        from rl_reason.algorithms import train_state as ts
        from rl_reason.data import templates
        from rl_reason.experiments import on_policy, sources
        from rl_reason.sampling.engine import Sampler

        rl = config.rl
        self.pc = pc = on_policy.ppo_config(config)
        self.mesh, self.rules, self.reward_fn = mesh, rules, reward_fn
        changes = {"remat": rl.remat} if rl.get("remat") else {}
        heads = ("value",) if pc.use_value else ()
        policy = sources.with_heads(start, heads, mesh, rules, seed=config.seed, **changes)
        self.models = ppo.ActorCritic(Transformer(policy.config))
        needs_reference = rl.kl_coef > 0 or pc.kl_loss_coef > 0
        self.ref_params = start.params if needs_reference else None
        steps = rl.num_iterations * pc.num_epochs * pc.num_minibatches
        tx, schedule = optimizer.make_optimizer(config.optim, steps)
        self.state = ppo.create_ppo_state(
            self.models, tx, mesh, rules, config.seed, params=policy.params
        )
        del policy
        self.sampler = Sampler(
            self.models.policy.config,
            start.tokenizer,
            batch_size=rl.sampling_batch_size,
            prompt_buckets=tuple(rl.prompt_buckets),
            mesh=mesh,
            rules=rules,
            stop_strings=() if full_length else templates.STOP_SEQUENCES,
        )
        self.sampling = self.sampler.sampling_config(
            max_new_tokens=rl.max_new_tokens,
            temperature=rl.temperature,
            top_p=rl.top_p,
            num_samples=rl.num_samples,
            **({"eos_ids": ()} if full_length else {}),
        )
        self.update = ts.jit_step(
            ppo.make_ppo_update(self.models, tx, pc, lr_schedule=schedule),
            mesh,
            rules,
            ppo.ppo_state_shardings(self.models, tx, mesh, rules),
        )
        with_policy = rl.advantage == "gae" or not ppo.single_step(pc)
        self.score = jax.jit(
            functools.partial(
                ppo.score, self.models, chunk_size=pc.chunk_size, with_policy=with_policy
            )
        )
        self.estimate = jax.jit(
            functools.partial(
                on_policy.advantages_and_rewards,
                estimator=rl.advantage,
                num_samples=rl.num_samples,
                gamma=rl.gamma,
                lam=rl.lam,
                kl_estimator=rl.kl_estimator,
                std_floor=rl.std_floor,
            )
        )
        self.kl_coef = float(rl.kl_coef)
        self.base_rng = jax.random.PRNGKey(config.seed)
        self.last: dict = {}

    def __call__(self, examples, prompts, index: int, on_phase=None) -> dict[str, float]:
        """Runs the loop body on `prompts` (texts; `examples` their rows, for the rewards).

        Returns each phase's seconds; `on_phase(name)` is called after each phase.
        """
        from rl_reason.experiments import rollout
        from rl_reason.parallel import sharding as shd

        mesh, rules = self.mesh, self.rules
        sample_rng, _ = jax.random.split(jax.random.fold_in(self.base_rng, index))
        times = {}

        clock = time.perf_counter()
        with shd.activation_sharding(mesh, rules):
            batch = rollout.collect(
                self.sampler,
                self.state.params,
                examples,
                prompts,
                sample_rng,
                self.sampling,
                self.reward_fn,
            )
        times["generate"] = time.perf_counter() - clock
        if on_phase:
            on_phase("generate")

        clock = time.perf_counter()
        sequences = shd.shard_batch(batch.sequences, mesh)
        token_scores, rewards = shd.shard_batch((batch.token_scores, batch.totals()), mesh)
        with shd.activation_sharding(mesh, rules):
            scored = self.score(self.state.params, self.ref_params, sequences)
            estimates = self.estimate(
                scored, token_scores, rewards, sequences["loss_mask"], jnp.float32(self.kl_coef)
            )
        jax.block_until_ready((scored, estimates))
        times["reference"] = time.perf_counter() - clock
        if on_phase:
            on_phase("reference")

        clock = time.perf_counter()
        train_batch = {**sequences, **scored, "advantages": estimates["advantages"]}
        if "returns" in estimates:
            train_batch["returns"] = estimates["returns"]
        if not self.pc.kl_loss_coef and "old_logprobs" in train_batch:
            train_batch.pop("ref_logprobs", None)
        del scored, estimates
        self.state, metrics = self.update(self.state, train_batch)
        metrics = jax.device_get(metrics)
        times["update"] = time.perf_counter() - clock
        if on_phase:
            on_phase("update")
        self.last = {
            "loss": float(metrics["loss"]),
            "reward": float(batch.totals().mean()),
            "rows": len(batch.texts),
            "sequence_length": int(batch.sequences["tokens"].shape[1]),
            "generated_tokens": int(batch.samples.rollout.lengths.sum()),
            "finite": float(metrics["finite"]),
        }
        return times
