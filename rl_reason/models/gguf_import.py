"""Import Gemma 3 GGUF files (llama.cpp's format), dequantized, with their tokenizer.

The GGUF tensors are presented under their HF names and in HF conventions,
so the Hugging Face importer's checks and sharded placement apply unchanged:
names are mapped with gguf's own table, shapes are numpy order (GGUF lists
them innermost first), and Gemma norms lose the 1 that llama.cpp's
converter added to them (transformers' GGUF loader does the same).

Fields llama.cpp does not store but hard-codes for Gemma 3 (a global layer
every 6, local RoPE base 10000, the query scale) are filled in as llama.cpp
computes them.

The `gguf` package's reader trusts the file: a truncated or lying header
makes it loop for as long as a count says, or fail with an IndexError or a
reshape error that names no file. `read_gguf` therefore walks the header
first, checking every count, length, type code, shape and tensor extent
against the file size before the reader sees it, and any problem is a
`CheckpointFormatError` naming the file.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from typing import Any

import gguf
import numpy as np
import transformers
from jax.sharding import Mesh

from rl_reason.models import hf_weights
from rl_reason.models.hf_config import model_config_from_hf
from rl_reason.models.hf_import import LoadedModel, place_params
from rl_reason.models.safetensors_io import CheckpointFormatError
from rl_reason.parallel import sharding as shd

SUPPORTED_ARCHITECTURES = ("gemma3",)
_GEMMA3_GLOBAL_EVERY = 6
_GEMMA3_LOCAL_ROPE_BASE = 10_000.0
_GEMMA3_27B_LAYERS = 62  # llama.cpp scales 27B's queries by (hidden / heads) ** -0.5


_T = gguf.GGUFValueType
_Q = gguf.GGMLQuantizationType
_SCALAR_BYTES = {
    _T.UINT8: 1, _T.INT8: 1, _T.BOOL: 1, _T.UINT16: 2, _T.INT16: 2, _T.UINT32: 4,
    _T.INT32: 4, _T.FLOAT32: 4, _T.UINT64: 8, _T.INT64: 8, _T.FLOAT64: 8,
}  # fmt: skip
_VALUE_TYPES = {t.value for t in _T}
_TENSOR_TYPES = {t.value for t in _Q}
# Types the reader maps to a numpy dtype of their own; all others it reads as blocks of bytes.
_PLAIN_TYPES = {_Q.F32, _Q.F16, _Q.F64, _Q.I8, _Q.I16, _Q.I32, _Q.I64}
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, dims count, type, offset
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ARRAY_NESTING = 8
_REQUIRED = object()


class _HeaderCheck:
    """Walks a GGUF header (the layout GGUFReader reads) with every read bounded by the file."""

    def __init__(self, path: str, buf, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0
        self.order = "<"

    def fail(self, problem: str):
        raise CheckpointFormatError(self.path, problem)

    def take(self, n: int, what: str) -> int:
        """The offset of the next n bytes (which hold `what`), checked to lie in the file."""
        start = self.pos
        if n > self.size - start:
            self.fail(
                f"truncated or corrupt header: {what} at byte {start} needs {n} bytes,"
                f" but the file has {self.size}"
            )
        self.pos = start + n
        return start

    def uint(self, fmt: str, what: str) -> int:
        offset = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(self.order + fmt, self.buf, offset)[0]

    def count(self, what: str, min_bytes: int) -> int:
        """A count of items of at least min_bytes each, checked against the bytes left."""
        n = self.uint("Q", what)
        if n * min_bytes > self.size - self.pos:
            self.fail(
                f"corrupt header: {what} is {n}, but {self.size - self.pos} bytes remain at"
                f" byte {self.pos} (at least {min_bytes} per item)"
            )
        return n

    def string(self, what: str, decode: bool) -> str | None:
        n = self.uint("Q", f"the length of {what}")
        start = self.take(n, f"{what} ({n} bytes)")
        if not decode:
            return None
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            pass
        self.fail(f"corrupt header: {what} at byte {start} is not UTF-8")

    def value_type(self, what: str) -> gguf.GGUFValueType:
        code = self.uint("I", f"the type of {what}")
        if code not in _VALUE_TYPES:
            self.fail(f"corrupt header: {what} has unknown value type {code}")
        return _T(code)

    def value(self, vtype: gguf.GGUFValueType, what: str, depth: int = 0) -> None:
        if vtype in _SCALAR_BYTES:
            self.take(_SCALAR_BYTES[vtype], what)
        elif vtype == _T.STRING:
            self.string(what, decode=False)
        else:  # ARRAY: item type, count, items
            if depth >= _MAX_ARRAY_NESTING:
                self.fail(f"corrupt header: {what} nests arrays deeper than {_MAX_ARRAY_NESTING}")
            item_type = self.value_type(f"the items of {what}")
            if item_type in _SCALAR_BYTES:
                n = self.count(f"the length of {what}", _SCALAR_BYTES[item_type])
                self.take(n * _SCALAR_BYTES[item_type], what)
                return
            min_bytes = 8 if item_type == _T.STRING else 12
            for _ in range(self.count(f"the length of {what}", min_bytes)):
                self.value(item_type, f"an item of {what}", depth + 1)


def check_gguf_header(path: str | os.PathLike) -> None:
    """Raises CheckpointFormatError unless `path` is a GGUF file the gguf package can read safely.

    Checks the magic and version, that every count, length and type code of
    the key-value section and the tensor infos fits the file, that keys and
    tensor names are unique UTF-8, that alignment is a power of two, and that
    every tensor's shape suits its type and its data lies within the file.
    Nothing is allocated in proportion to what the header claims.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size < 24:
        raise CheckpointFormatError(
            path, f"not a GGUF file: {size} bytes, fewer than a GGUF header's 24"
        )
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        _check_gguf_header(_HeaderCheck(path, buf, size))


def _check_gguf_header(h: _HeaderCheck) -> None:
    if bytes(h.buf[:4]) != b"GGUF":
        h.fail(f"not a GGUF file: it starts with {bytes(h.buf[:4])!r}, not b'GGUF'")
    h.pos = 4
    (version,) = struct.unpack_from("<I", h.buf, 4)
    if version & 0xFFFF == 0:  # written on a machine of the other byte order, as the reader infers
        h.order = ">"
        (version,) = struct.unpack_from(">I", h.buf, 4)
    if version not in gguf.gguf_reader.READER_SUPPORTED_VERSIONS:
        h.fail(
            f"GGUF version {version} is not supported (the gguf package reads versions"
            f" {gguf.gguf_reader.READER_SUPPORTED_VERSIONS})"
        )
    h.pos = 8
    tensor_count = h.count("the tensor count", _MIN_TENSOR_INFO_BYTES)
    kv_count = h.count("the key-value count", _MIN_KV_BYTES)
    keys = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}  # the reader's own fields
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    for i in range(kv_count):
        key = h.string(f"key {i}", decode=True)
        if key in keys:
            h.fail(f"corrupt header: key {key!r} appears twice")
        keys.add(key)
        vtype = h.value_type(f"key {key!r}")
        start = h.pos
        h.value(vtype, f"the value of {key!r}")
        if key == "general.alignment":
            if vtype != _T.UINT32:
                h.fail(f"general.alignment has type {vtype.name}, not UINT32")
            (alignment,) = struct.unpack_from(h.order + "I", h.buf, start)
            if alignment == 0 or alignment & (alignment - 1):
                h.fail(f"general.alignment {alignment} is not a power of two")
    tensors, names = [], set()
    for i in range(tensor_count):
        name = h.string(f"the name of tensor {i}", decode=True)
        if name in names:
            h.fail(f"corrupt header: tensor {name!r} appears twice")
        names.add(name)
        n_dims = h.uint("I", f"the dimension count of tensor {name!r}")
        if n_dims > _MAX_DIMS:
            h.fail(f"corrupt header: tensor {name!r} has {n_dims} dimensions (at most {_MAX_DIMS})")
        dims = [h.uint("Q", f"a dimension of tensor {name!r}") for _ in range(n_dims)]
        code = h.uint("I", f"the type of tensor {name!r}")
        if code not in _TENSOR_TYPES:
            h.fail(f"corrupt header: tensor {name!r} has unknown type code {code}")
        qtype = _Q(code)
        offset = h.uint("Q", f"the data offset of tensor {name!r}")
        tensors.append((name, dims, qtype, offset))
    data_start = -(-h.pos // alignment) * alignment
    for name, dims, qtype, offset in tensors:
        block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
        if qtype not in _PLAIN_TYPES and (not dims or dims[0] % block):
            h.fail(
                f"corrupt header: tensor {name!r} of type {qtype.name} has shape {dims},"
                f" whose rows are not whole blocks of {block}"
            )
        # Shape checked with empty axes counted as 1, so that no axis is absurd either.
        extent = math.prod(max(d, 1) for d in dims)
        nbytes = math.prod(dims) * type_bytes // block
        if -(-extent // block) * type_bytes > h.size:
            h.fail(
                f"corrupt header: tensor {name!r} has shape {dims} of {qtype.name},"
                f" more than the {h.size}-byte file holds"
            )
        if data_start + offset + nbytes > h.size:
            h.fail(
                f"truncated: tensor {name!r} ({qtype.name} {dims}, {nbytes} bytes) at data"
                f" offset {offset} ends at byte {data_start + offset + nbytes}, but the file"
                f" has {h.size}"
            )


def read_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """A GGUFReader (memory-mapped) of `path`, after check_gguf_header; errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No GGUF file at {path}")
    check_gguf_header(path)
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # what the check above misses, said with the file's name
        raise CheckpointFormatError(path, f"the gguf package cannot read it: {e!r}") from e


def _path(reader: gguf.GGUFReader) -> str:
    return getattr(reader.data, "filename", None) or "<GGUF file>"


def _field(reader: gguf.GGUFReader, key: str, default: Any = _REQUIRED, kind: type = object):
    """A key's value, checked to be a `kind`; a missing key is an error without a default."""
    field = reader.get_field(key)
    if field is None:
        if default is _REQUIRED:
            raise CheckpointFormatError(_path(reader), f"the GGUF file has no {key} field")
        return default
    try:
        value = field.contents()
    except (ValueError, IndexError, TypeError) as e:
        raise CheckpointFormatError(_path(reader), f"field {key} is unreadable ({e})") from None
    ok = {
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }.get(kind, lambda v: True)
    if not ok(value):
        raise CheckpointFormatError(
            _path(reader), f"field {key} is {value!r}, not a {kind.__name__}"
        )
    return value


def gguf_hf_config(reader: gguf.GGUFReader) -> transformers.PretrainedConfig:
    """The transformers config of the model in a GGUF file."""
    arch = _field(reader, "general.architecture", kind=str)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointFormatError(
            _path(reader),
            f"GGUF architecture {arch!r} is not supported; rl_reason imports"
            f" {SUPPORTED_ARCHITECTURES} from GGUF (Llama and Qwen2 from HF checkpoints).",
        )

    def get(key, default=_REQUIRED, kind=int):
        value = _field(reader, f"{arch}.{key}", default, kind)
        if kind is int and value <= 0 and reader.get_field(f"{arch}.{key}"):  # sizes, counts
            raise CheckpointFormatError(_path(reader), f"field {arch}.{key} is {value}")
        return value

    hidden, heads = get("embedding_length"), get("attention.head_count")
    num_layers = get("block_count")
    shapes = {t.name: t.shape for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise CheckpointFormatError(_path(reader), "the GGUF file has no token_embd.weight tensor")
    if len(shapes["token_embd.weight"]) != 2 or shapes["token_embd.weight"][0] != hidden:
        raise CheckpointFormatError(
            _path(reader),
            f"token_embd.weight has shape {[int(n) for n in shapes['token_embd.weight']]},"
            f" not [{arch}.embedding_length={hidden}, vocabulary size]",
        )
    # Checked before transformers builds per-layer lists of this length.
    blocks = {name.split(".")[1] for name in shapes if name.startswith("blk.")}
    if num_layers != len(blocks):
        raise CheckpointFormatError(
            _path(reader),
            f"{arch}.block_count is {num_layers}, but the file has tensors of {len(blocks)} blocks",
        )
    head_dim = get("attention.key_length", hidden // heads)
    token_id = lambda key: _field(reader, f"tokenizer.ggml.{key}", None, int)
    fields = {
        "vocab_size": int(shapes["token_embd.weight"][-1]),
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", kind=float),
        "max_position_embeddings": get("context_length"),
        "sliding_window": get("attention.sliding_window"),
        "sliding_window_pattern": _GEMMA3_GLOBAL_EVERY,
        "rope_theta": get("rope.freq_base", kind=float),
        "rope_local_base_freq": _GEMMA3_LOCAL_ROPE_BASE,
        "query_pre_attn_scalar": hidden // heads if num_layers == _GEMMA3_27B_LAYERS else head_dim,
        "tie_word_embeddings": "output.weight" not in shapes,
        "bos_token_id": token_id("bos_token_id"),
        "eos_token_id": token_id("eos_token_id"),
        "pad_token_id": token_id("padding_token_id"),
    }
    scaling = get("rope.scaling.type", "none", kind=str)
    if scaling != "none":
        fields["rope_scaling"] = {
            "rope_type": scaling,
            "factor": get("rope.scaling.factor", kind=float),
        }
    try:
        return transformers.Gemma3TextConfig(**fields)
    except Exception as e:  # e.g. a hidden size the head count does not divide
        problem = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        raise CheckpointFormatError(
            _path(reader), f"its fields make no Gemma 3 config: {problem}"
        ) from None


_DEQUANTIZE_ROWS = 8192


def _dequantize(data: np.ndarray, qtype: Any) -> np.ndarray:
    """gguf's dequantize, _DEQUANTIZE_ROWS rows at a time into one float32 array: at
    once, Gemma 3's 262k-row embedding held several float32 copies of itself (1.5 GB
    above the result) at the load's peak. Rows are whole blocks: the values are the same."""
    if data.ndim < 2 or len(data) <= _DEQUANTIZE_ROWS:
        return gguf.quants.dequantize(data, qtype).astype(np.float32)
    out = None
    for start in range(0, len(data), _DEQUANTIZE_ROWS):
        block = gguf.quants.dequantize(data[start : start + _DEQUANTIZE_ROWS], qtype)
        if out is None:
            out = np.empty((len(data), *block.shape[1:]), np.float32)
        out[start : start + len(block)] = block
    return out


class GGUFTensors:
    """A GGUF file's tensors under HF names, dequantized to float32 on demand.

    Tensors the HF names do not cover keep their GGUF names, so that the
    importer reports them as unexpected.
    """

    def __init__(self, reader: gguf.GGUFReader, hf_names: list[str], arch: str, num_layers: int):
        self._path = _path(reader)
        arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
        name_map = gguf.get_tensor_name_map(arch_id, num_layers)
        to_hf = {}
        for hf_name in hf_names:
            stem, suffix = hf_name.rsplit(".", 1)
            to_hf[f"{name_map.get_name(stem)}.{suffix}"] = hf_name
        self._tensors = {to_hf.get(t.name, t.name): t for t in reader.tensors}

    @property
    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensors[name].shape))

    def get(self, name: str) -> np.ndarray:
        tensor = self._tensors[name]
        if tensor.n_elements == 0:  # gguf's dequantize cannot reshape an empty tensor
            return np.zeros(self.shape(name), np.float32)
        try:
            array = _dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise CheckpointFormatError(
                self._path,
                f"tensor {tensor.name} has type {tensor.tensor_type.name}, which the gguf"
                " package cannot dequantize",
            ) from None
        array = array.reshape(self.shape(name))
        # Every Gemma norm (the only architecture here) carries llama.cpp's + 1.
        return array - 1.0 if name.endswith("norm.weight") else array


def load_gguf(
    path: str | os.PathLike,
    mesh: Mesh | None = None,
    rules: shd.Rules = shd.DEFAULT_RULES,
    *,
    with_tokenizer: bool = True,
    **overrides,
) -> LoadedModel:
    """Imports a Gemma 3 GGUF file; `overrides` as in `load_hf` (param_dtype float32 by default).

    The tokenizer is rebuilt by transformers from the file's vocabulary
    (about 20 s for Gemma's 262k tokens); with_tokenizer=False skips it.
    """
    path = os.fspath(path)
    reader = read_gguf(path)
    config = model_config_from_hf(gguf_hf_config(reader), **overrides)
    hf_names = [
        n for spec in hf_weights.tensor_specs(config) for n in spec.hf_names(config.num_layers)
    ]
    arch = _field(reader, "general.architecture", kind=str)
    source = GGUFTensors(reader, hf_names, arch, config.num_layers)
    params = place_params(config, source, mesh, rules)
    tokenizer = None
    if with_tokenizer:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path)
            )
        except Exception as e:  # e.g. a vocabulary field that is missing or mistyped
            raise CheckpointFormatError(
                path, f"transformers cannot build the tokenizer from it: {e!r}"
            ) from e
    return LoadedModel(config, params, tokenizer)
