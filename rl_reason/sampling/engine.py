"""Text in, rollouts and text out: tokenization, shape buckets, sharding, decoding.

The jitted sampler compiles one program per (batch, prompt length, sampling
config). The engine pads prompts on the left to the smallest configured
length bucket and fills the last batch with empty rows, so a whole run
compiles a handful of programs, not one per batch. Tokens that every prompt
of a call starts with (few-shot exemplars) are prefilled once and shared.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import Mesh

from rl_reason.data import templates
from rl_reason.models import precision
from rl_reason.models.config import ModelConfig
from rl_reason.models.transformer import Transformer
from rl_reason.parallel import sharding as shd
from rl_reason.sampling.continuous import Engine, EngineConfig
from rl_reason.sampling.sampler import (
    Rollout,
    SamplingConfig,
    jit_sample,
    left_pad,
    prefill_prefix_jit,
)


@dataclasses.dataclass
class Samples:
    """Everything one `Sampler.generate` call produced, on the host."""

    rollout: Rollout  # numpy arrays, N = len(prompts) * K rows, prompt-major
    texts: list[str]  # decoded completions, prompt and stop text stripped
    num_samples: int

    def texts_per_prompt(self) -> list[list[str]]:
        k = self.num_samples
        return [self.texts[i : i + k] for i in range(0, len(self.texts), k)]


_log = logging.getLogger(__name__)


def common_prefix_length(ids: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all rows share, leaving each row at least one of its own."""
    shortest = min(len(x) for x in ids)
    first = ids[0]
    length = 0
    while length < shortest - 1 and all(x[length] == first[length] for x in ids):
        length += 1
    return length


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `length` (the largest when none does)."""
    fitting = [b for b in sorted(buckets) if b >= length]
    return fitting[0] if fitting else max(buckets)


class PromptTooLongError(ValueError):
    """A prompt does not fit the sampler's largest bucket (and truncation was not asked)."""


class Sampler:
    """Batched generation for one model architecture and tokenizer."""

    def __init__(
        self,
        model_config: ModelConfig,
        tokenizer: Any,
        *,
        batch_size: int = 32,
        prompt_buckets: Sequence[int] = (64, 128, 256, 512),
        mesh: Mesh | None = None,
        rules: shd.Rules = shd.DEFAULT_RULES,
        stop_strings: Sequence[str] | None = None,
        progress: bool = False,
        min_shared_prefix: int = 32,
        compiler_options: Mapping[str, Any] | None = None,
        dtype: str | None = None,
        truncate_prompts: bool = False,
        engine: EngineConfig | None = None,
        min_rows: int = SamplingConfig.min_rows,
    ):
        """stop_strings: the texts that end a sample (None: the task template's,
        `templates.STOP_SEQUENCES`; () for none). truncate_prompts: a prompt longer
        than the largest bucket is an error (`PromptTooLongError`) unless this asks
        to cut its start. min_shared_prefix: prefill a common prompt prefix once when
        it is at least this many tokens long (0 never shares). compiler_options: XLA
        options for the sampling program alone (None: XLA's defaults).
        dtype: the sampler's own precision ("bfloat16", "float32"), apart from
        the learner's: each `generate` computes with a copy of the weights cast
        to it and a KV cache in it; None computes as model_config says, with
        the weights as given (see rl_reason/models/precision.py).
        min_rows: the static decode batch shrinks, as rows end, to multiples of this
        (`SamplingConfig.min_rows`; rounded up to the mesh's batch shards). Each
        smaller batch is one more copy of the decode step to compile.
        engine: decode with the continuous-batching engine over a paged KV cache
        (sampling/continuous.py: `engine.slots` rows at once, each finished row's
        slot refilled at once; on a mesh, split over its batch shards) instead of
        static batches of batch_size prompts."""
        self.model_config = model_config
        self.dtype = None if dtype is None else str(jax.numpy.dtype(dtype))
        self.model = Transformer(precision.sampler_config(model_config, self.dtype))
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.prompt_buckets = tuple(sorted(prompt_buckets))
        self.mesh = mesh
        self.rules = rules
        self.stop_strings = tuple(
            templates.STOP_SEQUENCES if stop_strings is None else stop_strings
        )
        self.truncate_prompts = truncate_prompts
        self.progress = progress
        self.min_shared_prefix = min_shared_prefix
        self.min_rows = min_rows
        self._sample = jit_sample(compiler_options)
        self.engine = None
        if engine is not None:  # on a mesh, its slots split over the batch shards
            self.engine = Engine(self.model.config, engine, mesh=mesh)
        if mesh is not None:
            shd.check_batch_divides(batch_size, mesh, "sampling batch")

    def _batch_shards(self) -> int:
        return 1 if self.mesh is None else shd.batch_shards(self.mesh)

    def sampling_config(self, **options) -> SamplingConfig:
        """A SamplingConfig with this tokenizer's EOS, pad and stop strings filled in,
        and a decode batch that shrinks only to multiples of the mesh's batch shards."""
        tok = self.tokenizer
        stops = tuple(
            tuple(tok(s, add_special_tokens=False)["input_ids"]) for s in self.stop_strings
        )
        shards = self._batch_shards()
        defaults = {
            "eos_ids": (tok.eos_token_id,) if tok.eos_token_id is not None else (),
            "pad_id": tok.pad_token_id if tok.pad_token_id is not None else 0,
            "stop_sequences": stops,
            "min_rows": math.lcm(self.min_rows, shards),
        }
        return SamplingConfig(**{**defaults, **options})

    def token_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """Each prompt's token ids, BOS first when the tokenizer has one."""
        tok = self.tokenizer
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        if tok.bos_token_id is not None:
            ids = [[tok.bos_token_id] + x for x in ids]
        return ids

    def pad(self, ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Token id lists, left-padded to the smallest bucket that holds them all."""
        ids, length = self._fit(ids)
        pad = self.tokenizer.pad_token_id
        return left_pad(ids, length, pad if pad is not None else 0)

    def _fit(self, ids: Sequence[Sequence[int]]) -> tuple[list[Sequence[int]], int]:
        """(ids with over-long starts cut when truncation is on, the bucket that holds them)."""
        length = pick_bucket(max(len(x) for x in ids), self.prompt_buckets)
        too_long = sum(len(x) > length for x in ids)
        if too_long and not self.truncate_prompts:
            longest = max(range(len(ids)), key=lambda i: len(ids[i]))
            raise PromptTooLongError(
                f"{too_long} prompts are longer than the largest prompt bucket ({length}"
                f" tokens); the longest (prompt {longest} of this call) has"
                f" {len(ids[longest])}. Add a larger bucket (prompt_buckets), shorten the"
                " prompts, or pass truncate_prompts=True to cut their starts."
            )
        if too_long:
            _log.warning(
                "%d prompts are longer than the largest bucket (%d tokens); their starts are cut.",
                too_long,
                length,
            )
        return [x[-length:] for x in ids], length

    def generate(
        self,
        params: Any,
        prompts: Sequence[str],
        rng: jax.Array,
        config: SamplingConfig,
        prompt_offset: int = 0,
        prefix_length: int | None = None,
    ) -> Samples:
        """config.num_samples completions for every prompt, in prompt-major order.

        For a larger set of prompts split over several calls: prompt_offset is
        the index of prompts[0] in the set (a prompt's random draws depend on
        its index, not on how the set was split), and prefix_length the number
        of leading tokens the whole set shares (by default, those these
        prompts share), so that every call prefills the same shared prefix.
        """
        params = self.sampling_params(params)
        shards = self._batch_shards()
        if config.min_rows % shards:
            raise ValueError(
                f"min_rows={config.min_rows} is not a multiple of the mesh's {shards} batch"
                " shards: a shrunk decode batch would not split evenly (sampling_config()"
                " rounds it)."
            )
        ids = self.token_ids(prompts)
        if self.engine is not None:  # its prefix cache shares common starts by itself
            ids, width = self._fit(ids)
            rollout = self.engine.generate(
                params, ids, rng, config, row_offset=prompt_offset, prompt_width=width
            )
            return Samples(rollout, self.decode(rollout), config.num_samples)
        if prefix_length is None:
            prefix_length = common_prefix_length(ids)
        shared = prefix_length if self.min_shared_prefix else 0
        prefix = None
        if shared >= self.min_shared_prefix > 0:
            prefix = prefill_prefix_jit(self.model, params, np.asarray(ids[0][:shared], np.int32))
            ids = [x[shared:] for x in ids]
        tokens, mask = self.pad(ids)
        n, b = len(prompts), self.batch_size
        parts = []
        batches = tqdm.trange(
            0, n, b, desc=f"sampling x{config.num_samples}", disable=not self.progress, leave=False
        )
        for start in batches:
            t, m = tokens[start : start + b], mask[start : start + b]
            fill = b - len(t)
            if fill:  # empty rows keep the batch shape; their output is dropped
                t = np.concatenate([t, np.zeros((fill, t.shape[1]), t.dtype)])
                m = np.concatenate([m, np.zeros((fill, m.shape[1]), bool)])
            rollout = self._run(params, t, m, rng, config, prompt_offset + start, prefix)
            keep = (b - fill) * config.num_samples
            parts.append(jax.tree.map(lambda x, keep=keep: x[:keep], shd.to_host(rollout)))
        rollout = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
        return Samples(rollout, self.decode(rollout), config.num_samples)

    def sampling_params(self, params: Any) -> Any:
        """The weights the sampler computes with: without scalar heads, and a copy in
        its dtype when it has one that differs from the model config's param dtype.

        Weights already in the sampler's dtype are used as given, so a loop that
        samples in chunks can cast once and pass the copy to every `generate`.
        """
        params = precision.without_heads(params)
        if not precision.needs_cast(self.model_config, self.dtype):
            return params
        floating = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
        if all(x.dtype == jnp.dtype(self.dtype) for x in floating):
            return params
        with shd.activation_sharding(self.mesh, self.rules):
            return precision.cast_floating_jit(params, self.dtype)

    def _run(self, params, tokens, mask, rng, config, row_offset, prefix):
        with shd.activation_sharding(self.mesh, self.rules):
            if self.mesh is not None:
                tokens, mask = shd.shard_batch((tokens, mask), self.mesh)
            offset = jnp.int32(row_offset)
            return self._sample(self.model, params, tokens, mask, rng, config, offset, prefix)

    def decode(self, rollout: Rollout) -> list[str]:
        """Completion text: up to its length, special tokens and anything from a stop string on removed."""
        texts = []
        for tokens, length in zip(rollout.completion_tokens, rollout.lengths):
            text = self.tokenizer.decode(tokens[:length].tolist(), skip_special_tokens=True)
            cuts = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
            texts.append(text[: min(cuts)] if cuts else text)
        return texts
