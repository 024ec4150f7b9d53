"""Files from outside are untrusted input: malformed safetensors and GGUF files, fuzzed, give
a CheckpointFormatError naming the file (never struct.error, OverflowError, MemoryError or a
reshape error) in bounded memory and work; exported files and the tokenizer are written the
way other programs expect (readable, atomically), and a broken tokenizer directory says so."""

import json
import math
import os
import stat
import struct
import subprocess
import sys
import textwrap
import tracemalloc

import flax.linen as nn
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file
from work_counter import PythonLines

from rl_reason.data import tokenizer as tokenizer_lib
from rl_reason.models import gguf_import
from rl_reason.models.config import tiny_llama
from rl_reason.models.hf_config import hf_config_dict
from rl_reason.models.hf_export import export_hf
from rl_reason.models.hf_import import load_hf
from rl_reason.models.safetensors_io import CheckpointFormatError, SafetensorsCheckpoint
from rl_reason.models.transformer import Transformer

MAX_BYTES = 64 * 2**20  # no malformed file may make a reader allocate more than this
# nor run more Python lines than this: counted, the same on every machine (the most any
# read here ran was about 21,000, a GGUF file's).
MAX_LINES = 200_000
# Dequantizing garbage scales overflows; that is not what these tests are about.
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value:RuntimeWarning", "ignore:overflow:RuntimeWarning"
)


class Bounded:
    """Runs reads under tracemalloc and a Python-line budget; fails past either bound.

    The two bound what a malformed file can make a reader do: allocate (a declared size
    believed) or loop (a declared count believed). A read over its line budget is stopped
    there, so a runaway loop fails the test instead of hanging it."""

    def __enter__(self):
        tracemalloc.start()
        self.worst_bytes = 0
        self.lines = PythonLines(MAX_LINES)
        return self

    def __call__(self, fn, *args):
        tracemalloc.reset_peak()
        try:
            return self.lines(fn, *args)
        finally:
            self.worst_bytes = max(self.worst_bytes, tracemalloc.get_traced_memory()[1])
            assert self.worst_bytes < MAX_BYTES, f"{fn.__name__} allocated {self.worst_bytes} bytes"

    def __exit__(self, *exc):
        tracemalloc.stop()


def _replace(path, data: bytes):
    """Writes a new file at `path` (a new inode: readers may still map the old one)."""
    with open(f"{path}.new", "wb") as f:
        f.write(data)
    os.replace(f"{path}.new", path)


def _expect_clear_error_or_valid(read, path, data: bytes, bounded: Bounded):
    """`read(path)` of `data` either succeeds or raises CheckpointFormatError naming the file."""
    _replace(path, data)
    try:
        bounded(read, path)
    except CheckpointFormatError as e:
        assert str(path) in str(e) and len(str(e).splitlines()) <= 3, str(e)
        return False
    return True


# ---------------------------------------------------------------- safetensors


def _valid_safetensors() -> bytes:
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": rng.standard_normal((4, 6)).astype(np.float32),
        "b.bias": rng.standard_normal(5).astype(np.float16),
        "c.ids": np.arange(3, dtype=np.int64),
        "d.mask": np.array([True, False]),
        "e.empty": np.zeros((0, 3), np.float32),
    }
    path = f"/tmp/rl_reason_valid_{os.getpid()}.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    with open(path, "rb") as f:
        data = f.read()
    os.remove(path)
    return data


def _read_safetensors(path):
    """Everything a reader does with a checkpoint: names, shapes and every tensor's data."""
    checkpoint = SafetensorsCheckpoint(os.path.dirname(path))
    for name in checkpoint.names:
        array = checkpoint.get(name)
        assert array.shape == checkpoint.shape(name)
        np.asarray(array).tobytes()
    return checkpoint


def _with_header(header, data: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


@pytest.fixture
def st_path(tmp_path):
    return tmp_path / "model.safetensors"


def test_valid_safetensors_reads(st_path):
    _replace(st_path, _valid_safetensors())
    checkpoint = _read_safetensors(st_path)
    assert checkpoint.shape("a.weight") == (4, 6) and checkpoint.shape("e.empty") == (0, 3)
    np.testing.assert_array_equal(checkpoint.get("c.ids"), [0, 1, 2])


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


MALFORMED_SAFETENSORS = [
        (b"", "0 bytes"),
        (b"\x01\x02\x03", "3 bytes"),
        (struct.pack("<Q", 2**64 - 1) + b"{}", "claims 18446744073709551615 bytes"),
        (struct.pack("<Q", 2**63) + b"{}" * 100, "claims"),
        (_with_header(b"{}", length=3), "claims 3 bytes but only 2"),
        (_with_header(b"not json at all"), "not JSON"),
        (_with_header(b"\xff\xfe{}"), "not JSON"),
        (_with_header(b"[" * 100_000 + b"]" * 100_000), "not JSON"),
        (_with_header([1, 2]), "JSON list"),
        (_with_header({"__metadata__": [1]}), "__metadata__"),
        (_with_header({"x": 3}), "'x'"),
        (_with_header({"x": {**F32, "dtype": "F31"}}, bytes(8)), "unsupported dtype F31"),
        (_with_header({"x": {**F32, "dtype": 7}}, bytes(8)), "dtype 7"),
        (_with_header({"x": {**F32, "shape": [-2]}}, bytes(8)), "shape"),
        (_with_header({"x": {**F32, "shape": [True, 2]}}, bytes(8)), "shape"),
        (_with_header({"x": {**F32, "shape": "2"}}, bytes(8)), "shape"),
        (_with_header({"x": {**F32, "shape": [2**62, 2**62]}}, bytes(8)), "needs"),
        (_with_header({"x": {**F32, "shape": [3]}}, bytes(8)), "8 bytes, but F32 [3] needs 12"),
        (_with_header({"x": {**F32, "data_offsets": [8, 0]}}, bytes(8)), "data_offsets"),
        (_with_header({"x": {**F32, "data_offsets": [0]}}, bytes(8)), "data_offsets"),
        (_with_header({"x": {**F32, "data_offsets": [0, 2**64]}}, bytes(8)), "hold"),
        (_with_header({"x": F32}, bytes(5)), "truncated: tensor 'x' ends at byte 8"),
        (
            _with_header({"x": {**F32, "data_offsets": [2**64 - 8, 2**64]}}, bytes(8)),
            "truncated",
        ),
        (_with_header({"x": F32}, bytes(12)), "4 bytes after the last tensor"),
        (_with_header({"x": F32, "y": F32}, bytes(8)), "overlaps"),
        (_with_header({"x": {**F32, "data_offsets": [4, 12]}}, bytes(12)), "leaves a gap"),
]


@pytest.mark.parametrize(
    "data, problem", MALFORMED_SAFETENSORS, ids=[p for _, p in MALFORMED_SAFETENSORS]
)
def test_malformed_safetensors_is_a_clear_error(st_path, data, problem):
    _replace(st_path, data)
    with Bounded() as bounded, pytest.raises(CheckpointFormatError) as e:
        bounded(SafetensorsCheckpoint, st_path.parent)
    assert str(st_path) in str(e.value) and problem in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_huge_header_is_refused_before_it_is_read(st_path):
    """A 200 MB (sparse) file whose header claims 150 MB: refused without reading it."""
    with open(st_path, "wb") as f:
        f.write(struct.pack("<Q", 150_000_000) + b"{")
        f.truncate(200_000_000)
    with Bounded() as bounded, pytest.raises(CheckpointFormatError, match="100000000-byte limit"):
        bounded(SafetensorsCheckpoint, st_path.parent)
    assert bounded.worst_bytes < 2**20


def test_safetensors_truncated_anywhere_is_a_clear_error(st_path):
    data = _valid_safetensors()
    with Bounded() as bounded:
        for end in range(len(data)):
            assert not _expect_clear_error_or_valid(_read_safetensors, st_path, data[:end], bounded)


def test_safetensors_overwritten_header_bytes(st_path):
    """Every header byte set to each of several values: a valid file (e.g. a changed
    name) or a clear error, never another exception."""
    data = bytearray(_valid_safetensors())
    (length,) = struct.unpack("<Q", data[:8])
    with Bounded() as bounded:
        for i in range(8 + length):
            for value in (0x00, 0xFF, ord("9"), ord("]"), data[i] ^ 0x01):
                mutated = bytearray(data)
                mutated[i] = value
                _expect_clear_error_or_valid(_read_safetensors, st_path, bytes(mutated), bounded)


def test_safetensors_lying_header_fields(st_path):
    """Each tensor's shape, offsets and dtype replaced by wrong values, in a valid JSON header."""
    data = _valid_safetensors()
    (length,) = struct.unpack("<Q", data[:8])
    header, payload = json.loads(data[8 : 8 + length]), data[8 + length :]
    lies = {
        "shape": [[], [0], [1], [10**6], [2**40, 2**40], [-1], [1.5], None],
        "data_offsets": [[0, 0], [0, 10**12], [10**12, 10**12 + 4], [3, 1], [-1, 4], None],
        "dtype": ["F64", "U8", "BF16", "Q4_0", "", None],  # I64 and F64 are both 8 bytes
    }
    with Bounded() as bounded:
        for name in [k for k in header if k != "__metadata__"]:
            for field, values in lies.items():
                for value in values:
                    lying = json.loads(json.dumps(header))
                    lying[name][field] = value
                    if _expect_clear_error_or_valid(
                        _read_safetensors, st_path, _with_header(lying, payload), bounded
                    ):  # only a lie that still adds up passes (I64 read as F64, an empty tensor)
                        entry = lying[name]
                        begin, end = entry["data_offsets"]
                        size = {"F64": 8, "U8": 1, "BF16": 2}.get(entry["dtype"], 0)
                        assert end - begin == math.prod(entry["shape"]) * size, (name, field, value)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=512))
def test_random_bytes_safetensors(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    with Bounded() as bounded:
        _expect_clear_error_or_valid(_read_safetensors, path, data, bounded)
        # The same bytes after a plausible length field.
        _expect_clear_error_or_valid(
            _read_safetensors, path, struct.pack("<Q", len(data)) + data, bounded
        )


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=8)), min_size=1, max_size=4
    )
)
def test_random_edits_safetensors(tmp_path_factory, edits):
    data = bytearray(_valid_safetensors())
    for position, chunk in edits:
        position %= len(data)
        data[position : position + len(chunk)] = chunk
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    with Bounded() as bounded:
        _expect_clear_error_or_valid(_read_safetensors, path, bytes(data), bounded)


def test_safetensors_index_problems(tmp_path):
    _replace(tmp_path / "model-00001-of-00002.safetensors", _valid_safetensors())
    index = tmp_path / "model.safetensors.index.json"
    cases = {
        "{not json": "not a safetensors index",
        "[]": "not a safetensors index",
        '{"weight_map": {"a": "model-00002-of-00002.safetensors"}}': "which is missing",
        '{"weight_map": {"a": "../model.safetensors"}}': "not a file in the checkpoint",
        '{"weight_map": {"a": 3}}': "not a file in the checkpoint",
    }
    for text, problem in cases.items():
        index.write_text(text)
        with pytest.raises(CheckpointFormatError, match=problem) as e:
            SafetensorsCheckpoint(tmp_path)
        assert str(index) in str(e.value)


def test_same_tensor_in_two_shards(tmp_path):
    shards = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    for name in shards:
        _replace(tmp_path / name, _valid_safetensors())
    index = {"weight_map": {"a": shards[0], "b": shards[1]}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointFormatError, match="00002.safetensors: tensor '.*' is also in "):
        SafetensorsCheckpoint(tmp_path)


@pytest.mark.parametrize(
    "data",
    [b"", bytes(7), os.urandom(4096), struct.pack("<Q", 2**60) + b"{}"],
    ids=["empty", "short", "random", "huge header"],
)
def test_load_hf_names_the_broken_weights_file(tmp_path, data):
    """Through the importer: fails before anything is compiled, naming model.safetensors."""
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(tiny_llama())))
    _replace(tmp_path / "model.safetensors", data)
    with pytest.raises(CheckpointFormatError, match="model.safetensors: "):
        load_hf(tmp_path)


# ---------------------------------------------------------------- GGUF

HIDDEN, VOCAB = 32, 16
Q = gguf.GGMLQuantizationType


def _write_gguf(path, endianess=gguf.GGUFEndian.LITTLE):
    """A small but complete Gemma 3 GGUF: every key gguf_hf_config reads, a vocabulary,
    and F16, F32, Q8_0 and Q4_K tensors."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "gemma3", endianess=endianess)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(1)
    writer.add_feed_forward_length(256)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_key_length(16)
    writer.add_value_length(16)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1e6)
    writer.add_sliding_window(4)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    writer.add_token_scores([float(-i) for i in range(VOCAB)])
    writer.add_token_types([1] * VOCAB)
    writer.add_tensor("token_embd.weight", rng.standard_normal((VOCAB, HIDDEN)).astype(np.float16))
    writer.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(HIDDEN).astype(np.float32))
    q = rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32)
    writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(q, Q.Q8_0), raw_dtype=Q.Q8_0)
    # gguf cannot quantize to Q4_K (only dequantize): one block of bytes, its f16 scales small.
    blocks = rng.integers(0, 256, (1, 144), dtype=np.uint8)
    blocks[:, :4] = np.array([0.01, 0.001], np.float16).view(np.uint8)
    writer.add_tensor("blk.0.ffn_up.weight", blocks, raw_dtype=Q.Q4_K)
    writer.add_tensor("output_norm.weight", rng.standard_normal(HIDDEN).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "valid.gguf"
    _write_gguf(path)
    _read_gguf(path)  # imports what transformers imports lazily, outside the bounds
    return path.read_bytes()


def _read_gguf(path):
    """Everything the importer does with a GGUF file short of building the model."""
    reader = gguf_import.read_gguf(path)
    config = gguf_import.gguf_hf_config(reader)
    source = gguf_import.GGUFTensors(reader, [], "gemma3", config.num_hidden_layers)
    for name in source.names:
        assert source.get(name).shape == source.shape(name)
    return config


@pytest.fixture
def gguf_path(tmp_path):
    return tmp_path / "model.gguf"


def test_valid_gguf_reads(gguf_path, gguf_bytes):
    _replace(gguf_path, gguf_bytes)
    config = _read_gguf(gguf_path)
    assert (config.hidden_size, config.vocab_size, config.intermediate_size) == (HIDDEN, VOCAB, 256)


def test_big_endian_gguf_passes_the_check(gguf_path):
    _write_gguf(gguf_path, gguf.GGUFEndian.BIG)
    gguf_import.check_gguf_header(gguf_path)
    assert gguf_import.read_gguf(gguf_path).endianess == gguf.GGUFEndian.BIG


def _gguf_header(tensor_count=0, kv_count=0, version=3, magic=b"GGUF") -> bytes:
    return magic + struct.pack("<IQQ", version, tensor_count, kv_count)


def _kv(key: bytes, vtype: int, value: bytes, key_length: int | None = None) -> bytes:
    n = len(key) if key_length is None else key_length
    return struct.pack("<Q", n) + key + struct.pack("<I", vtype) + value


def _tensor_info(name=b"w", dims=(4,), qtype=0, offset=0, n_dims=None) -> bytes:
    n_dims = len(dims) if n_dims is None else n_dims
    return (
        struct.pack("<Q", len(name)) + name + struct.pack("<I", n_dims)
        + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", qtype, offset)
    )  # fmt: skip


def _padded(header: bytes, data: bytes = b"") -> bytes:
    return header + bytes(-len(header) % 32) + data


T = gguf.GGUFValueType
ARCH = _kv(b"general.architecture", T.STRING, struct.pack("<Q", 6) + b"gemma3")
NOT_UTF8 = struct.pack("<Q", 1) + b"\xff"


MALFORMED_GGUF = [
        (b"", "0 bytes"),
        (b"GGUF", "4 bytes"),
        (b"GGUF" + bytes(19), "23 bytes"),
        (b"GGML" + bytes(40), "not a GGUF file: it starts with b'GGML'"),
        (_gguf_header(version=1) + bytes(8), "version 1 is not supported"),
        (_gguf_header(version=7) + bytes(8), "version 7"),
        (_gguf_header(tensor_count=2**64 - 1), "the tensor count is 18446744073709551615"),
        (_gguf_header(kv_count=2**60) + bytes(100), "the key-value count is"),
        (_gguf_header(kv_count=1) + _kv(b"k", 4, b"", key_length=2**63), f"key 0 ({2**63} bytes)"),
        (_gguf_header(kv_count=1) + _kv(b"k", 4, b"", key_length=90), "key 0 (90 bytes)"),
        (_gguf_header(kv_count=1) + _kv(b"\xff\xfe", 4, bytes(4)), "not UTF-8"),
        (_gguf_header(kv_count=1) + _kv(b"k", 13, bytes(8)), "unknown value type 13"),
        (_gguf_header(kv_count=1) + _kv(b"k", 4, b"\x01"), "the value of 'k'"),
        (_gguf_header(kv_count=1) + _kv(b"k", 8, struct.pack("<Q", 2**62)), "the value of 'k'"),
        (_gguf_header(kv_count=1) + _kv(b"k", 9, struct.pack("<IQ", 4, 2**61)), "the length of"),
        (_gguf_header(kv_count=1) + _kv(b"k", 9, struct.pack("<IQ", 8, 2**40)), "the length of"),
        (_gguf_header(kv_count=1) + _kv(b"k", 9, struct.pack("<IQ", 99, 0)), "value type 99"),
        (
            _gguf_header(kv_count=1) + _kv(b"k", 9, struct.pack("<IQ", 9, 1) * 20 + bytes(12)),
            "nests arrays deeper than 8",
        ),
        (_gguf_header(kv_count=2) + _kv(b"k", 0, b"\x01") * 2, "key 'k' appears twice"),
        (_gguf_header(kv_count=1) + _kv(b"GGUF.version", 0, b"\x01"), "appears twice"),
        (_gguf_header(kv_count=1) + _kv(b"general.alignment", 0, b"\x01"), "not UINT32"),
        (_gguf_header(kv_count=1) + _kv(b"general.alignment", 4, b"\x18\0\0\0"), "not a power"),
        (_gguf_header(kv_count=1) + _kv(b"general.alignment", 4, bytes(4)), "not a power"),
        (_padded(_gguf_header(1) + _tensor_info(n_dims=5, dims=(4,) * 5)), "5 dimensions"),
        (_gguf_header(1) + _tensor_info(n_dims=3), "a dimension of tensor 'w'"),
        (_padded(_gguf_header(1) + _tensor_info(qtype=4), bytes(16)), "unknown type code 4"),
        (_padded(_gguf_header(1) + _tensor_info(qtype=2**32 - 1), bytes(16)), "unknown type code"),
        (_padded(_gguf_header(2) + _tensor_info() * 2, bytes(16)), "tensor 'w' appears twice"),
        (_padded(_gguf_header(1) + _tensor_info(), bytes(15)), "truncated: tensor 'w'"),
        (_padded(_gguf_header(1) + _tensor_info(offset=2**63), bytes(16)), "truncated: tensor 'w'"),
        (_padded(_gguf_header(1) + _tensor_info(dims=(2**32, 2**32)), bytes(16)), "more than the"),
        (_padded(_gguf_header(1) + _tensor_info(dims=(0, 2**62)), bytes(16)), "more than the"),
        (_padded(_gguf_header(1) + _tensor_info(dims=(2**64 - 1,)), bytes(16)), "more than the"),
        (_padded(_gguf_header(1) + _tensor_info(dims=(33,), qtype=8), bytes(64)), "blocks of 32"),
        (_padded(_gguf_header(1) + _tensor_info(dims=(), qtype=8), bytes(64)), "blocks of 32"),
        (_padded(_gguf_header(1) + _tensor_info(b"\xc3")), "not UTF-8"),
        (
            _padded(_gguf_header(0, 1) + ARCH),
            "no gemma3.embedding_length field",
        ),
        (
            _padded(_gguf_header(0, 2) + ARCH + _kv(b"gemma3.embedding_length", 8, bytes(8))),
            "gemma3.embedding_length is '', not a int",
        ),
        (
            _padded(_gguf_header(0, 1) + _kv(b"general.architecture", 4, bytes(4))),
            "general.architecture is 0, not a str",
        ),
        (
            _padded(_gguf_header(0, 1) + _kv(b"general.architecture", 8, NOT_UTF8)),
            "general.architecture is unreadable",
        ),
]


@pytest.mark.parametrize("data, problem", MALFORMED_GGUF, ids=[p for _, p in MALFORMED_GGUF])
def test_malformed_gguf_is_a_clear_error(gguf_path, data, problem):
    _replace(gguf_path, data)
    with Bounded() as bounded, pytest.raises(CheckpointFormatError) as e:
        bounded(_read_gguf, gguf_path)
    assert str(gguf_path) in str(e.value) and problem in str(e.value), str(e.value)
    assert len(str(e.value).splitlines()) == 1


def _gguf_header_end(path, data: bytes) -> int:
    _replace(path, data)
    return min(t.data_offset for t in gguf_import.read_gguf(path).tensors)


def test_gguf_truncated_anywhere_is_a_clear_error(gguf_path, gguf_bytes):
    """At every byte of the header, every 8th of the data and each of the last 64."""
    header_end = _gguf_header_end(gguf_path, gguf_bytes)
    ends = sorted(
        {*range(header_end), *range(header_end, len(gguf_bytes), 8)}
        | {*range(len(gguf_bytes) - 64, len(gguf_bytes))}
    )
    with Bounded() as bounded:
        valid = [
            end
            for end in ends
            if _expect_clear_error_or_valid(_read_gguf, gguf_path, gguf_bytes[:end], bounded)
        ]
    # Only the alignment padding after the last tensor may go.
    assert all(end > len(gguf_bytes) - 32 for end in valid)


def _gguf_number_fields(path) -> list[tuple[int, str]]:
    """(offset, struct format) of every integer in the header: each length, count, value type,
    dimension count, dimension, tensor type and data offset (and integer values)."""
    reader = gguf_import.read_gguf(path)
    base = reader.data.ctypes.data
    parts = [p for f in reader.fields.values() for p in f.parts]
    parts += [p for t in reader.tensors for p in t.field.parts]
    out = set()
    for part in parts:
        if part.dtype.kind in "ui" and part.dtype.itemsize in (4, 8):
            for k in range(part.size):
                offset = part.ctypes.data - base + k * part.dtype.itemsize
                out.add((offset, {4: "<I", 8: "<Q"}[part.dtype.itemsize]))
    return sorted(out)


def test_gguf_lying_header_fields(gguf_path, gguf_bytes):
    """Every integer of the header (lengths, counts, type codes, dimensions, offsets) set
    to a lie: the largest value, zero, one more, one less, 2**32."""
    _replace(gguf_path, gguf_bytes)
    fields = _gguf_number_fields(gguf_path)
    assert len(fields) > 100
    with Bounded() as bounded:
        for offset, fmt in fields:
            bits = 8 * struct.calcsize(fmt)
            (old,) = struct.unpack_from(fmt, gguf_bytes, offset)
            for value in {2**bits - 1, 0, old + 1, old - 1, 2**32}:
                mutated = bytearray(gguf_bytes)
                struct.pack_into(fmt, mutated, offset, value % 2**bits)
                _expect_clear_error_or_valid(_read_gguf, gguf_path, bytes(mutated), bounded)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=512))
def test_random_bytes_gguf(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    with Bounded() as bounded:
        _expect_clear_error_or_valid(_read_gguf, path, data, bounded)
        _expect_clear_error_or_valid(_read_gguf, path, _gguf_header(1, 2) + data, bounded)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=8)), min_size=1, max_size=4
    )
)
def test_random_edits_gguf(tmp_path_factory, gguf_bytes, edits):
    data = bytearray(gguf_bytes)
    for position, chunk in edits:
        position %= 1024  # mostly the header
        data[position : position + len(chunk)] = chunk
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    with Bounded() as bounded:
        _expect_clear_error_or_valid(_read_gguf, path, bytes(data), bounded)


def test_unsupported_quantization_is_a_clear_error(gguf_path):
    writer = gguf.GGUFWriter(str(gguf_path), "gemma3")
    writer.add_tensor("w", np.zeros(4, np.int32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    source = gguf_import.GGUFTensors(gguf_import.read_gguf(gguf_path), [], "gemma3", 1)
    with pytest.raises(CheckpointFormatError, match="tensor w has type I32, which the gguf"):
        source.get("w")


@pytest.mark.parametrize(
    "data", [b"", os.urandom(64), b"GGUF" + bytes(60)], ids=["empty", "random", "version 0"]
)
def test_load_gguf_names_the_broken_file(gguf_path, data):
    _replace(gguf_path, data)
    with pytest.raises(CheckpointFormatError, match="model.gguf: "):
        gguf_import.load_gguf(gguf_path, with_tokenizer=False)


def test_load_gguf_of_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="No GGUF file at .*nothing.gguf"):
        gguf_import.load_gguf(tmp_path / "nothing.gguf", with_tokenizer=False)


# ---------------------------------------------------------------- export


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def tiny_model():
    config = tiny_llama()
    tokens = jnp.zeros((1, 2), jnp.int32)
    init = lambda: nn.meta.unbox(Transformer(config).init(jax.random.PRNGKey(0), tokens, tokens))
    # The values do not matter here: shapes only, so nothing is compiled.
    params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), jax.eval_shape(init))
    tokenizer = tokenizer_lib.train_tokenizer(["one two three", "1 + 2 = 3"], vocab_size=300)
    return config, params, tokenizer


@pytest.mark.parametrize("umask", [0o022, 0o027])
@pytest.mark.parametrize("max_shard_bytes", [2**40, 100_000])
def test_exported_files_are_readable_like_save_pretrained(
    tiny_model, tmp_path, umask, max_shard_bytes
):
    config, params, tokenizer = tiny_model
    old = os.umask(umask)
    try:
        export_hf(tmp_path / "out", config, params, tokenizer, max_shard_bytes=max_shard_bytes)
    finally:
        os.umask(old)
    files = sorted((tmp_path / "out").iterdir())
    assert any(p.name.endswith(".safetensors") for p in files)
    assert {p.name: oct(_mode(p)) for p in files} == {p.name: oct(0o666 & ~umask) for p in files}


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.train_tokenizer(["Ann has 3 apples.", "12 + 30 = 42"], vocab_size=300)


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_tokenizer_save_is_readable_and_leaves_nothing_behind(tok, tmp_path):
    target = tmp_path / "run" / "tokenizer"
    tokenizer_lib.save_tokenizer(tok, target)
    assert sorted(p.name for p in target.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert _mode(target) == 0o777 & ~_current_umask()  # not mkdtemp's 0700
    assert _leftovers(target.parent) == []
    assert tokenizer_lib.load_tokenizer(target).get_vocab() == tok.get_vocab()


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_tokenizer_save_fills_an_empty_directory(tok, tmp_path):
    tokenizer_lib.save_tokenizer(tok, tmp_path)  # what a crashed older save left behind
    assert tokenizer_lib.load_tokenizer(tmp_path).get_vocab() == tok.get_vocab()


def test_tokenizer_save_keeps_an_existing_complete_directory(tok, tmp_path):
    tokenizer_lib.save_tokenizer(tok, tmp_path / "tokenizer")
    other = tokenizer_lib.train_tokenizer(["completely different text"], vocab_size=270)
    tokenizer_lib.save_tokenizer(other, tmp_path / "tokenizer")
    assert tokenizer_lib.load_tokenizer(tmp_path / "tokenizer").get_vocab() == tok.get_vocab()
    assert _leftovers(tmp_path) == []


def test_tokenizer_save_moves_a_partial_directory_aside(tok, tmp_path):
    partial = tmp_path / "tokenizer"
    partial.mkdir()
    (partial / "tokenizer_config.json").write_text("{}")
    tokenizer_lib.save_tokenizer(tok, partial)
    assert tokenizer_lib.load_tokenizer(partial).get_vocab() == tok.get_vocab()
    (aside,) = tmp_path.glob("tokenizer.incomplete-*")
    assert [p.name for p in aside.iterdir()] == ["tokenizer_config.json"]


def test_tokenizer_save_that_fails_leaves_no_directory(tok, tmp_path, monkeypatch):
    def save_pretrained(directory):
        (tmp_path / "staging_seen").write_text(str(directory))
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            f.write("{}")
        raise OSError("disk full")

    monkeypatch.setattr(tok, "save_pretrained", save_pretrained)
    with pytest.raises(OSError, match="disk full"):
        tokenizer_lib.save_tokenizer(tok, tmp_path / "tokenizer")
    assert not (tmp_path / "tokenizer").exists()
    assert _leftovers(tmp_path) == []


def test_tokenizer_save_killed_midway_leaves_no_directory(tmp_path, repo_root):
    """The process dies (no cleanup at all) after writing one file: no tokenizer/ appears."""
    script = textwrap.dedent(
        f"""
        import os
        from rl_reason.data import tokenizer as t
        tok = t.train_tokenizer(["a b c"], vocab_size=270)
        def dying_save(directory):
            open(os.path.join(directory, "tokenizer_config.json"), "w").write("{{}}")
            os._exit(9)
        tok.save_pretrained = dying_save
        t.save_tokenizer(tok, {str(tmp_path / "tokenizer")!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=repo_root, timeout=120)
    assert result.returncode == 9
    assert not (tmp_path / "tokenizer").exists()
    with pytest.raises(FileNotFoundError, match="No tokenizer directory"):
        tokenizer_lib.load_tokenizer(tmp_path / "tokenizer")


@pytest.mark.parametrize(
    "files, problem",
    [
        ({}, "holds no files but no vocabulary"),
        ({"tokenizer_config.json": "{}"}, "holds tokenizer_config.json but no vocabulary"),
        (
            {"tokenizer_config.json": "{}", "tokenizer.json": '{"version": "1.0", "trunc'},
            "tokenizer.json is not valid JSON",
        ),
    ],
    ids=["empty", "config only", "truncated tokenizer.json"],
)
def test_load_tokenizer_from_an_incomplete_directory(tmp_path, files, problem):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(tokenizer_lib.IncompleteTokenizerError) as e:
        tokenizer_lib.load_tokenizer(tmp_path)
    message = str(e.value)
    assert str(tmp_path) in message and "incomplete" in message and problem in message
    assert "sentencepiece" not in message
