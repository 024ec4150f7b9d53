"""Files from outside are untrusted input: malformed safetensors and GGUF files, fuzzed, give
a CheckpointFormatError naming the file (never struct.error, OverflowError, MemoryError or a
reshape error) in bounded memory and time; exported files and the tokenizer are written the
way other programs expect (readable, atomically), and a broken tokenizer directory says so."""

import json
import math
import os
import stat
import struct
import subprocess
import sys
import textwrap
import time
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

from rl_reason.data import tokenizer as tokenizer_lib
from rl_reason.models import gguf_import
from rl_reason.models.config import tiny_llama
from rl_reason.models.hf_config import hf_config_dict
from rl_reason.models.hf_export import export_hf
from rl_reason.models.hf_import import load_hf
from rl_reason.models.safetensors_io import CheckpointFormatError, SafetensorsCheckpoint
from rl_reason.models.transformer import Transformer

MAX_BYTES = 64 * 2**20  # no malformed file may make a reader allocate more than this
MAX_SECONDS = 5.0  # nor take longer than this
# Dequantizing garbage scales overflows; that is not what these tests are about.
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value:RuntimeWarning", "ignore:overflow:RuntimeWarning"
)


class Bounded:
    """Runs reads under tracemalloc and a clock; fails if a peak or a time exceeds the bounds."""

    def __enter__(self):
        tracemalloc.start()
        self.worst_bytes, self.worst_seconds = 0, 0.0
        return self

    def __call__(self, fn, *args):
        tracemalloc.reset_peak()
        start = time.monotonic()
        try:
            return fn(*args)
        finally:
            self.worst_seconds = max(self.worst_seconds, time.monotonic() - start)
            self.worst_bytes = max(self.worst_bytes, tracemalloc.get_traced_memory()[1])
            assert self.worst_bytes < MAX_BYTES, f"{fn.__name__} allocated {self.worst_bytes} bytes"
            assert self.worst_seconds < MAX_SECONDS, f"{fn.__name__} took {self.worst_seconds} s"

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
