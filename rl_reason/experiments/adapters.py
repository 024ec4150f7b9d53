"""LoRA in a run: the trained model, its checkpoint items and its recorded base.

What every learner that trains adapters shares (the on-policy learner and SFT
today): the `lora` config section as a `LoraConfig`, the checkpoint items
(`policy.lora`: adapters and scalar heads; `policy.train`: the rest of the
state), the progress record `sources.load_run` rebuilds the merged policy from
(the base's source and checksum), and the resume check against another base.
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


def state_items(state) -> dict[str, Any]:
    """A LoRA state's checkpoint items: no copy of the base."""
    return {
        "policy.lora": lora.trained_part(state.params),
        "policy.train": state.replace(params=None),
    }


def merge_state_items(items: Mapping[str, Any], base_params: Any) -> Any:
    """Inverse of `state_items`, on the base rebuilt from its source."""
    params = lora.with_trained_part(base_params, items["policy.lora"])
    return items["policy.train"].replace(params=params)


def record(config, lora_settings: lora.LoraConfig, base_checksum: str) -> dict[str, Any]:
    """progress["lora"]: the adapters' settings and the base they belong to."""
    source = config.model_source
    base = {"kind": source.kind, "path": source.path, "checksum": base_checksum}
    return {**dataclasses.asdict(lora_settings), "base": base}


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
