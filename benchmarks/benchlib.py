"""What the side-by-side benchmarks share: the machine's peak, its load, model FLOPs,
random weights and prompts, and the peers' models built from our weights.

Importing this module puts this checkout's root first on sys.path (as the
launchers do), so `python benchmarks/<name>.py` measures this checkout's
rl_reason, not another one.
"""

from __future__ import annotations

import ast
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


def median_ms(calls: dict[str, tuple], repeats: int = 7) -> dict[str, float]:
    """Median wall time in ms of each (jitted fn, args) after a warm-up call, the calls
    interleaved so that a drift of the machine falls on all of them alike."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def load_average() -> float:
    """The 1-minute load average: how many runnable processes shared the cores."""
    return os.getloadavg()[0]


def override(config, assignment: str) -> None:
    """Applies a `--set key=value` (a dotted key; the value a Python literal, else a string)."""
    key, _, value = assignment.partition("=")
    *parents, leaf = key.split(".")
    section = config
    for name in parents:
        section = section[name]
    try:
        section[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        section[leaf] = value


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
    """The on-policy loop's own iteration (`on_policy.OnPolicyLearner.iteration`, the
    code `launch/train.py` runs), with its state, without logging or checkpoints.

    `start` is the loaded start model (as `sources.load_model` returns it): its
    params become the frozen reference, a copy (with a value head when PPO
    has one, and `train.remat` if set) the trained state. `full_length=True`
    samples with no EOS and no stop strings, so that every row runs
    rl.max_new_tokens tokens: the shapes, and the work, are the budget's.
    Phases are timed apart (with a wait for the devices in between):
    generate (sampler, text, rewards), reference (policy and reference
    log-probs, values, advantages), update.
    """

    def __init__(self, config, start, mesh, rules, reward_fn, *, full_length: bool = False):
        from rl_reason.experiments import on_policy

        self.learner = on_policy.OnPolicyLearner(
            config, start, mesh, rules, reward_fn=reward_fn, full_length=full_length
        )
        self.pc, self.models = self.learner.pc, self.learner.models
        self.state = self.learner.initial_state()
        self.learner.start_params = None
        self.kl_coef = float(config.rl.kl_coef)
        self.base_rng = jax.random.PRNGKey(config.seed)
        self.last: dict = {}

    def __call__(self, examples, prompts, index: int, on_phase=None) -> dict[str, float]:
        """One iteration on `prompts` (texts; `examples` their rows, for the rewards).

        Returns each phase's seconds; `on_phase(name)` is called after each phase.
        """
        sample_rng, _ = jax.random.split(jax.random.fold_in(self.base_rng, index))
        self.state, out = self.learner.iteration(
            self.state, examples, prompts, sample_rng, self.kl_coef, on_phase
        )
        self.last = {
            "loss": float(out.metrics["loss"]),
            "reward": float(out.batch.totals().mean()),
            "rows": len(out.batch.texts),
            "sequence_length": int(out.batch.sequences["tokens"].shape[1]),
            "generated_tokens": int(out.batch.samples.rollout.lengths.sum()),
            "finite": float(out.metrics["finite"]),
        }
        return out.seconds
