"""LoRA: low-rank adapters on a frozen base, for every model family, and PEFT's file format.

The trained params are {"base": the model's params, "lora": the adapters};
`merged(params, config)` is the model's params with each targeted kernel
W + (alpha / r) A B. The step never builds it whole: `LoraModel.apply` puts
the factors beside their kernels and `Transformer(adapter_scale=...)` merges
them inside each block, so merged kernels and their gradients exist one
layer at a time; the sampler reads `Merger`'s params (the adapted kernels
merged, every other leaf the base's own). Why merge rather than put adapters
into the Dense layers (qwix's and peft's way): the layers stay unchanged for
every family (Llama, Qwen2, Gemma 3, scanned or not), the sampler calls the
plain model, and the cost is one [d_in, r] x [r, d_out] product per kernel
per step (r / batch_tokens of the layer's forward: nothing at RL batch
sizes). B starts at 0, so the adapted model is the base model exactly at
step 0.

The base gets no gradient (`stop_gradient`, so XLA computes none of its
weight gradients) except the scalar heads (PPO's value, the ORM's), which
train with the adapters; `trainable_labels` says so to the optimizer
(`lora_optimizer`: state only for what trains). The frozen base is the KL
reference as it is (`params["base"]`: no second copy in memory).

`export_peft` / `import_peft`: the adapters as PEFT writes them
(adapter_config.json + adapter_model.safetensors, lora_A [r, in] and lora_B
[out, r] per module), so `peft.PeftModel.from_pretrained` loads them onto the
transformers model of the same base, and a PEFT adapter can start a run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rl_reason.models import layers
from rl_reason.models.transformer import SCALAR_HEADS, Transformer, init_params

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_IN_DIMS = {"o_proj": 2}  # [heads, head_dim, embed]; every other kernel has one input dim
_BLOCKS = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank 0 is off (full fine-tuning); alpha / rank scales the adapters' product."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        unknown = set(self.targets) - set(TARGETS)
        if self.rank < 0 or unknown or (self.rank and not self.targets):
            raise ValueError(
                f"LoraConfig(rank={self.rank}, targets={self.targets}): rank must be >= 0 and"
                f" targets a non-empty subset of {TARGETS}."
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _layers(inner: dict) -> list[tuple[str, bool]]:
    """(key, stacked) of each layer entry: "layers" (scanned, a leading layer axis) or
    "layers_<i>"."""
    return [(k, k == "layers") for k in sorted(inner) if k == "layers" or k.startswith("layers_")]


def _kernels(inner: dict, config: LoraConfig):
    """(layer key, block, name, stacked) of every targeted kernel in params["params"]."""
    for key, stacked in _layers(inner):
        for name in config.targets:
            block = _BLOCKS.get(name, "mlp")
            if name in inner[key].get(block, {}):
                yield key, block, name, stacked


def _factor_shapes(kernel_shape, name: str, stacked: bool, rank: int):
    lead = kernel_shape[:1] if stacked else ()
    rest = kernel_shape[len(lead) :]
    split = _IN_DIMS.get(name, 1)
    d_in, d_out = math.prod(rest[:split]), math.prod(rest[split:])
    return (*lead, d_in, rank), (*lead, rank, d_out), len(lead), split


def init_adapters(base_params: dict, config: LoraConfig, rng: jax.Array, boxed: bool = False):
    """{layer: {block: {name: {"a", "b"}}}} for `base_params` (unboxed, or boxed with their
    logical names when `boxed`: then the adapters are boxed alike, each factor sharded as
    the kernel's layer and input (A) or output (B) axes, the rank axis replicated).
    A ~ N(0, 1/d_in), B = 0: the adapted model equals the base at step 0."""
    inner = base_params["params"]
    out: dict = {}
    for i, (key, block, name, stacked) in enumerate(_kernels(inner, config)):
        kernel = inner[key][block][name]["kernel"]
        value = kernel.value if isinstance(kernel, nn.LogicallyPartitioned) else kernel
        a_shape, b_shape, lead, split = _factor_shapes(value.shape, name, stacked, config.rank)
        a = jax.random.normal(jax.random.fold_in(rng, i), a_shape, jnp.float32)
        a = (a / np.sqrt(a_shape[-2])).astype(value.dtype)
        b = jnp.zeros(b_shape, value.dtype)
        if boxed and isinstance(kernel, nn.LogicallyPartitioned):
            names = kernel.names
            a = nn.LogicallyPartitioned(a, (*names[:lead], names[lead], None))
            b = nn.LogicallyPartitioned(b, (*names[:lead], None, names[lead + split]))
        out.setdefault(key, {}).setdefault(block, {})[name] = {"a": a, "b": b}
    return out


def _map_adapted(base_params: dict, adapters: dict, fn) -> dict:
    """`base_params` with each adapted module m replaced by fn(m, its {"a", "b"})."""
    inner = dict(base_params["params"])
    for key, blocks in adapters.items():
        layer = dict(inner[key])
        for block, names in blocks.items():
            modules = dict(layer[block])
            for name, factors in names.items():
                modules[name] = fn(modules[name], factors)
            layer[block] = modules
        inner[key] = layer
    return {**base_params, "params": inner}


def merge(base_params: dict, adapters: dict, scale: float) -> dict:
    """`base_params` with each adapted kernel W + scale * A B (in W's dtype; A B in float32)."""
    return _map_adapted(
        base_params,
        adapters,
        lambda m, f: {**m, "kernel": layers.adapted_kernel(m["kernel"], f["a"], f["b"], scale)},
    )


def with_factors(base_params: dict, adapters: dict) -> dict:
    """`base_params` with each adapted module's factors beside its kernel ("lora_a",
    "lora_b"): what `Transformer(adapter_scale=...)` merges one layer at a time."""
    return _map_adapted(
        base_params, adapters, lambda m, f: {**m, "lora_a": f["a"], "lora_b": f["b"]}
    )


def _is_head(path) -> bool:
    return any(str(getattr(p, "key", "")).startswith(SCALAR_HEADS) for p in path)


def frozen(base_params: dict) -> dict:
    """The base with no gradient but for its scalar heads (they train with the adapters)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x if _is_head(path) else jax.lax.stop_gradient(x), base_params
    )


def merged(params: dict, config: LoraConfig) -> dict:
    """The model's params from the trained {"base", "lora"}: what every forward reads."""
    return merge(frozen(params["base"]), params["lora"], config.scale)


def _adapted_kernels(params: dict, config: LoraConfig) -> dict:
    """{layer: {block: {name: merged kernel}}}: `merged`'s new arrays, and only those."""
    inner = merged(params, config)["params"]
    return {
        key: {
            block: {name: inner[key][block][name]["kernel"] for name in names}
            for block, names in blocks.items()
        }
        for key, blocks in params["lora"].items()
    }


class Merger:
    """`merged(params, config)` for a sampler or a scorer, as a copy of the adapted
    kernels only: every other leaf (the embedding: two thirds of Gemma 3 270M) is
    the base's own array, not a second one. The result reads the state's buffers:
    use it before the next (donating) update."""

    def __init__(self, config: LoraConfig):
        self._kernels = jax.jit(lambda params: _adapted_kernels(params, config))

    def __call__(self, params: dict) -> dict:
        kernels = self._kernels(params)
        return _map_adapted(params["base"], kernels, lambda m, kernel: {**m, "kernel": kernel})


def trainable_labels(params: dict) -> Any:
    """ "train" for the adapters and the scalar heads, "frozen" for the rest of the base."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: (
            "train" if getattr(path[0], "key", None) == "lora" or _is_head(path) else "frozen"
        ),
        params,
    )


def lora_optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` on what trains; the frozen base gets no update and no optimizer state."""
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, trainable_labels)


def trained_part(params: dict) -> dict:
    """What a LoRA checkpoint keeps of {"base", "lora"}: the adapters and the scalar heads
    (the rest of the base is rebuilt from its source, checked by its checksum)."""
    inner = params["base"]["params"]
    return {
        "lora": params["lora"],
        "heads": {k: v for k, v in inner.items() if k.startswith(SCALAR_HEADS)},
    }


def with_trained_part(base_params: dict, part: dict) -> dict:
    """{"base", "lora"} from the rebuilt base and a checkpoint's `trained_part`."""
    inner = {**base_params["params"], **part["heads"]}
    return {"base": {**base_params, "params": inner}, "lora": part["lora"]}


class LoraModel:
    """A Transformer trained through adapters: params {"base", "lora"}.

    It stands where the learners take a Transformer: `apply` merges and calls
    the base model (any method), `config` is the base's, and calling it with
    an rng gives the boxed initial params (train_state's `Trained`), so
    shardings, restore targets and states come out as for the plain model.
    """

    def __init__(self, base: Transformer, config: LoraConfig):
        if not config.rank:
            raise ValueError("LoraModel needs LoraConfig.rank > 0.")
        self.base, self.lora, self.config = base, config, base.config
        self._adapted = Transformer(base.config, adapter_scale=config.scale)

    def __call__(self, rng: jax.Array) -> dict:
        base_rng, lora_rng = jax.random.split(rng)
        boxed = init_params(self.base, base_rng)
        return {"base": boxed, "lora": init_adapters(boxed, self.lora, lora_rng, boxed=True)}

    def init_from(self, base_params: dict, rng: jax.Array) -> dict:
        """{"base": base_params (not copied), "lora": fresh adapters}."""
        return {"base": base_params, "lora": init_adapters(base_params, self.lora, rng)}

    def apply(self, params: dict, *args, **kwargs):
        """The adapted model's forward (any method). The layers merge their own kernels
        inside the scan, so the merged model (and its gradient) is never whole."""
        adapted = with_factors(frozen(params["base"]), params["lora"])
        return self._adapted.apply(adapted, *args, **kwargs)


# --- PEFT's format -------------------------------------------------------------

_PEFT_PREFIX = "base_model.model.model.layers.{}.{}.{}"
_HF_BLOCK = {"attn": "self_attn", "mlp": "mlp"}


def _per_layer(adapters: dict) -> list[tuple[int, str, str, np.ndarray, np.ndarray]]:
    """(layer index, block, name, A [d_in, r], B [r, d_out]) of every adapted kernel."""
    rows = []
    for key, blocks in adapters.items():
        for block, names in blocks.items():
            for name, f in names.items():
                a, b = np.asarray(f["a"], np.float32), np.asarray(f["b"], np.float32)
                if key == "layers":
                    rows += [(i, block, name, a[i], b[i]) for i in range(a.shape[0])]
                else:
                    rows.append((int(key.split("_")[1]), block, name, a, b))
    return rows


def export_peft(directory: str, adapters: Any, config: LoraConfig, base_model: str = "") -> None:
    """adapter_config.json and adapter_model.safetensors as PEFT writes them."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for layer, block, name, a, b in _per_layer(jax.device_get(adapters)):
        prefix = _PEFT_PREFIX.format(layer, _HF_BLOCK[block], name)
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.T)  # [r, in]
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.T)  # [out, r]
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(config.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model,
    }
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(peft_config, f, indent=2)


def import_peft(directory: str, base_params: dict) -> tuple[dict, LoraConfig]:
    """A PEFT LoRA adapter directory as (adapters for `base_params`' layout, its config)."""
    from safetensors.numpy import load_file

    path = os.path.join(directory, "adapter_config.json")
    with open(path) as f:
        peft_config = json.load(f)
    if peft_config.get("peft_type") != "LORA" or peft_config.get("use_rslora"):
        raise ValueError(f"{path}: not a plain LoRA adapter (peft_type LORA, no rsLoRA).")
    targets = peft_config["target_modules"]
    targets = tuple(sorted(targets if isinstance(targets, list) else [targets]))
    config = LoraConfig(int(peft_config["r"]), float(peft_config["lora_alpha"]), targets)
    tensors = load_file(os.path.join(directory, "adapter_model.safetensors"))
    adapters = init_adapters(base_params, config, jax.random.PRNGKey(0))
    out: dict = {}
    for key, blocks in adapters.items():
        for block, names in blocks.items():
            for name, f in names.items():
                layers = range(f["a"].shape[0]) if key == "layers" else [int(key.split("_")[1])]
                read = lambda i, part: tensors[
                    f"{_PEFT_PREFIX.format(i, _HF_BLOCK[block], name)}.lora_{part}.weight"
                ]
                a = np.stack([read(i, "A").T for i in layers])
                b = np.stack([read(i, "B").T for i in layers])
                if key != "layers":
                    a, b = a[0], b[0]
                out.setdefault(key, {}).setdefault(block, {})[name] = {
                    "a": jnp.asarray(a, f["a"].dtype),
                    "b": jnp.asarray(b, f["b"].dtype),
                }
    return out, config
