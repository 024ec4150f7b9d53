"""The trained model's state as one pytree, created directly in its shardings.

Shardings come from `jax.eval_shape` of the initialiser (EasyLM's pattern):
nothing is materialised on one device and then moved.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rl_reason.models.transformer import Transformer, init_params
from rl_reason.parallel import sharding as shd


@flax.struct.dataclass
class TrainState:
    """params, opt_state, step and rng: everything a step reads and replaces."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


# What a TrainState holds parameters of: one Transformer, or any function
# rng -> boxed params (e.g. a policy and a separate critic in one tree).
Trained = Union[Transformer, Callable[[jax.Array], Any]]


def _init_fn(model: Trained) -> Callable[[jax.Array], Any]:
    return functools.partial(init_params, model) if isinstance(model, Transformer) else model


def param_shardings(model: Trained, mesh: Mesh, rules: shd.Rules) -> Any:
    """Shardings of `model`'s unboxed params tree, from logical names and shapes alone."""
    return shd.param_shardings(_init_fn(model), mesh, rules)


def _param_shapes(model: Trained) -> Any:
    return jax.eval_shape(lambda: nn.meta.unbox(_init_fn(model)(jax.random.PRNGKey(0))))


def abstract_params(model: Trained, mesh: Mesh, rules: shd.Rules) -> Any:
    """ShapeDtypeStructs of `model`'s params with their shardings (a restore target)."""
    return shd.abstract_like(_param_shapes(model), param_shardings(model, mesh, rules))


def state_shardings(
    model: Trained, tx: optax.GradientTransformation, mesh: Mesh, rules: shd.Rules
) -> TrainState:
    """Shardings of the whole TrainState; optimizer moments follow their params."""
    params_sh = param_shardings(model, mesh, rules)
    replicated = NamedSharding(mesh, P())
    shapes = _param_shapes(model)
    abstract_opt = jax.eval_shape(tx.init, shapes)
    # A masked optimizer (LoRA's frozen base: optax.multi_transform) holds no state for
    # the masked params: an empty MaskedNode stands where their sharding would.
    masked = lambda x: isinstance(x, optax.MaskedNode)
    opt_sh = optax.tree_utils.tree_map_params(
        tx,
        lambda state, s: state if masked(state) else s,
        abstract_opt,
        params_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=masked,
    )
    return TrainState(step=replicated, params=params_sh, opt_state=opt_sh, rng=replicated)


def _new_state(
    model: Trained, tx: optax.GradientTransformation, rng: jax.Array, params: Optional[Any]
) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    if params is None:
        params = nn.meta.unbox(_init_fn(model)(init_rng))
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng
    )


def create_train_state(
    model: Trained,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: shd.Rules,
    seed: int,
    params: Optional[Any] = None,
    *,
    donate: bool = False,
) -> TrainState:
    """Initialises (or adopts `params`) and the optimizer, each array in its sharding.

    Adopted params are copied, unless `donate`: then the state takes their buffers
    (where their sharding is already the state's) and the caller's arrays are
    deleted. Donate what nothing else reads (a frozen LoRA base, a fresh copy):
    a second copy of the model is the largest thing this function can allocate.
    """
    init = functools.partial(_new_state, model, tx)
    shardings = state_shardings(model, tx, mesh, rules)
    jitted = jax.jit(init, out_shardings=shardings, donate_argnums=(1,) if donate else ())
    return jitted(jax.random.PRNGKey(seed), params)


def abstract_train_state(
    model: Trained, tx: optax.GradientTransformation, mesh: Mesh, rules: shd.Rules
) -> TrainState:
    """ShapeDtypeStructs with shardings: the target for restoring a checkpoint."""
    shapes = jax.eval_shape(functools.partial(_new_state, model, tx), jax.random.PRNGKey(0), None)
    return shd.abstract_like(shapes, state_shardings(model, tx, mesh, rules))


def jit_step(
    step_fn: Callable,
    mesh: Mesh,
    rules: shd.Rules,
    shardings: Any,
    extra_shardings: tuple[Any, ...] = (),
) -> Callable:
    """Compiles `state, metrics = step_fn(state, batch, *extra)` on the mesh.

    The state (any pytree with `shardings`, e.g. a TrainState) is donated: its
    buffers are reused for the new state. Every batch leaf is split over
    (data, fsdp) on its first axis. `extra` are further arguments with their
    own shardings: frozen reference params sharded like the policy's
    (`param_shardings`), replicated scalars (`replicated(mesh)`), a KL
    controller's state. Metrics come back replicated.
    """
    batch_sharding = NamedSharding(mesh, P(shd.BATCH_AXES))
    jitted = jax.jit(
        step_fn,
        in_shardings=(shardings, batch_sharding, *extra_shardings),
        out_shardings=(shardings, NamedSharding(mesh, P())),
        donate_argnums=0,
    )

    def call(state, batch, *extra):
        if len(extra) != len(extra_shardings):
            raise TypeError(
                f"The step takes {len(extra_shardings)} extra arguments, got {len(extra)}."
            )
        # Batch leaves computed by another program (advantages) may be laid out
        # otherwise; moving them is a no-op when they already are split this way.
        batch = jax.device_put(batch, batch_sharding)
        with shd.activation_sharding(mesh, rules):
            return jitted(state, batch, *extra)

    def lower(state, batch, *extra):
        """The step lowered for these arguments (`.compile()` gives its HLO text and
        memory analysis), under the mesh's rules as a call runs it."""
        with shd.activation_sharding(mesh, rules):
            return jitted.lower(state, jax.device_put(batch, batch_sharding), *extra)

    call.lower = lower
    return call


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of a value every device holds whole (scalars, small tables)."""
    return NamedSharding(mesh, P())
