"""LoRA in a run: the trained model, its checkpoint items and its recorded base.

What every learner that trains adapters shares (SFT, the on-policy learner,
the rounds loop of EI and RCRL, the ORM): the `lora` config section as a
`LoraConfig`, the adapters a run starts from (fresh, or a PEFT adapter's),
the checkpoint items (`<model>.lora`: adapters and scalar heads;
`<model>.train`: the rest of the state), the progress record
`sources.load_run` rebuilds the merged model from (the base's source and
checksum), and the resume check against another base.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from rl_reason.experiments import runs
from rl_reason.models import lora


def lora_config(config) -> lora.LoraConfig | None:
    """The run's LoRA (the `lora` section), None when lora.rank is 0 (every parameter trains)."""
    section = config.get("lora")
    if not section or not section.rank:
        return None
    return lora.LoraConfig(int(section.rank), float(section.alpha), tuple(section.targets))


def initial_params(config, learner: lora.LoraModel, base_params: Any, rng) -> dict:
    """{"base", "lora"} a run starts from: `base_params` with fresh adapters, or with
    lora.init's PEFT adapter directory's (its rank, alpha and targets must be the
    section's: a mismatch is an error, not a silent reshape)."""
    init = config.lora.get("init", "")
    if not init:
        return learner.init_from(base_params, rng)
    adapters, found = lora.import_peft(init, base_params)
    want = learner.lora
    if (found.rank, found.alpha, set(found.targets)) != (want.rank, want.alpha, set(want.targets)):
        raise ValueError(
            f"lora.init={init!r} holds rank {found.rank}, alpha {found.alpha}, targets"
            f" {sorted(found.targets)}; the lora section asks for rank {want.rank}, alpha"
            f" {want.alpha}, targets {sorted(want.targets)}."
        )
    return {"base": base_params, "lora": adapters}


def state_items(state, name: str = "policy") -> dict[str, Any]:
    """A LoRA state's checkpoint items: no copy of the base."""
    return {
        f"{name}.lora": lora.trained_part(state.params),
        f"{name}.train": state.replace(params=None),
    }


def merge_state_items(items: Mapping[str, Any], base_params: Any, name: str = "policy") -> Any:
    """Inverse of `state_items`, on the base rebuilt from its source."""
    params = lora.with_trained_part(base_params, items[f"{name}.lora"])
    return items[f"{name}.train"].replace(params=params)


def record(
    config,
    lora_settings: lora.LoraConfig,
    base_checksum: str,
    source: tuple[str, str] | None = None,
    model: str = "policy",
) -> dict[str, Any]:
    """progress["lora"]: the adapters' settings, the model they adapt (`model`, as
    `sources.load_run` names it) and the base they belong to (`source`, (kind, path);
    default the run's model_source)."""
    kind, path = source or (config.model_source.kind, config.model_source.path)
    base = {"kind": kind, "path": path, "checksum": base_checksum}
    return {**dataclasses.asdict(lora_settings), "model": model, "base": base}


def check_base(config, progress: Mapping[str, Any], base_ids: tuple) -> None:
    """A LoRA run's adapters belong to the base it began from: another one is an error."""
    recorded = progress.get("lora", {}).get("base", {})
    if recorded and recorded.get("checksum") not in base_ids:
        raise runs.ResumeConfigError(
            f"The LoRA run's base changed: {config.model_source.kind}"
            f" {config.model_source.path!r} has checksum {base_ids[0]}, but its adapters were"
            f" trained on {recorded.get('kind')} {recorded.get('path')!r} (checksum"
            f" {recorded.get('checksum')})."
        )
