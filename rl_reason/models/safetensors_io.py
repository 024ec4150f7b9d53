"""Reading and writing safetensors checkpoints (one file or shards with an index).

Reading memory-maps the files and hands out numpy views, so that an importer
copies only the slice of each tensor that one device needs. The `safetensors`
package cannot do this for the common case: its numpy backend has no
bfloat16, and its flax backend lands every tensor on one device first.

Every header is checked as the `safetensors` package checks it (header length
within the file and below 100 MB, a JSON object, each tensor's bytes matching
its dtype and shape, offsets contiguous and covering the data exactly) before
anything is allocated or mapped, so a truncated, random or lying file is a
`CheckpointFormatError` naming the file and the problem.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Mapping

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from rl_reason.files import fsync_path

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
# The safetensors package refuses larger headers (safetensors/src/tensor.rs).
MAX_HEADER_BYTES = 100_000_000


class CheckpointFormatError(ValueError):
    """A weights file (safetensors, GGUF, or an index) that is malformed, truncated or unsupported.

    The message names the file and what is wrong with it.
    """

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def _nonnegative_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors_header(path: str | os.PathLike) -> tuple[int, dict[str, dict]]:
    """(data start offset, {tensor name: {"dtype", "shape", "data_offsets"}}) of one file.

    Raises CheckpointFormatError unless the file is well formed: the header is
    checked against the file size before it is read, and every tensor's
    offsets against its dtype, its shape and the data that follows the header.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size < 8:
        raise CheckpointFormatError(
            path, f"not a safetensors file: {size} bytes, fewer than the 8-byte header length"
        )
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > size - 8:
            raise CheckpointFormatError(
                path,
                f"not a safetensors file, or truncated: its header claims {length} bytes"
                f" but only {size - 8} follow the length field",
            )
        if length > MAX_HEADER_BYTES:
            raise CheckpointFormatError(
                path, f"header of {length} bytes exceeds the {MAX_HEADER_BYTES}-byte limit"
            )
        raw = f.read(length)
    if len(raw) != length:
        raise CheckpointFormatError(path, "the file shrank while its header was read")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointFormatError(
            path, f"not a safetensors file: its {length}-byte header is not JSON ({e})"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(
            path, f"not a safetensors file: its header is a JSON {type(header).__name__}"
        )
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict):
        raise CheckpointFormatError(path, "__metadata__ is not a JSON object")
    data_bytes = size - 8 - length
    spans = []
    for name, entry in header.items():
        problem = _entry_problem(entry)
        if problem:
            raise CheckpointFormatError(path, f"tensor {name!r}: {problem}")
        begin, end = entry["data_offsets"]
        nbytes = math.prod(entry["shape"]) * _DTYPES[entry["dtype"]].itemsize
        if end - begin != nbytes:
            raise CheckpointFormatError(
                path,
                f"tensor {name!r}: data_offsets [{begin}, {end}] hold {end - begin} bytes,"
                f" but {entry['dtype']} {entry['shape']} needs {nbytes}",
            )
        if end > data_bytes:
            raise CheckpointFormatError(
                path,
                f"truncated: tensor {name!r} ends at byte {end} of the data, which has only"
                f" {data_bytes} bytes",
            )
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else "leaves a gap"
            raise CheckpointFormatError(
                path, f"tensor {name!r} starts at byte {begin} of the data and {what}"
            )
        position = end
    if position != data_bytes:
        raise CheckpointFormatError(
            path, f"{data_bytes - position} bytes after the last tensor belong to no tensor"
        )
    return 8 + length, header


def _entry_problem(entry) -> str | None:
    """What is wrong with one tensor's header entry, or None."""
    if not isinstance(entry, dict):
        return f"its entry is a JSON {type(entry).__name__}, not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        return f"dtype {dtype!r} is not a string"
    if dtype not in _DTYPES:
        return f"unsupported dtype {dtype} (supported: {', '.join(_DTYPES)})"
    if not isinstance(shape, list) or not all(_nonnegative_int(n) for n in shape):
        return f"shape {shape!r} is not a list of non-negative integers"
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_nonnegative_int(n) for n in offsets)
        or offsets[0] > offsets[1]
    ):
        return f"data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end"
    return None


class SafetensorsCheckpoint:
    """The tensors of a checkpoint directory, by name, as read-only memory-mapped arrays."""

    def __init__(self, directory: str | os.PathLike):
        directory = os.fspath(directory)
        index_path = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index_path):
            files = _index_files(index_path)
        elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            raise FileNotFoundError(
                f"Neither {SINGLE_FILE} nor {INDEX_FILE} in {directory}; rl_reason reads"
                " safetensors only (convert pickled pytorch_model.bin checkpoints with"
                " transformers first)."
            )
        self._entries: dict[str, tuple[np.ndarray, dict]] = {}
        self._files: dict[str, str] = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise CheckpointFormatError(
                    index_path, f"names the weight file {name}, which is missing"
                )
            self._read_header(path)

    def _read_header(self, path: str) -> None:
        start, header = read_safetensors_header(path)
        if os.path.getsize(path) > start:
            data = np.memmap(path, dtype=np.uint8, mode="r", offset=start)
        else:  # mmap refuses an empty region
            data = np.zeros(0, np.uint8)
        for name, entry in header.items():
            if name in self._entries:
                raise CheckpointFormatError(
                    path, f"tensor {name!r} is also in {self._files[name]}"
                )
            self._entries[name] = (data, entry)
            self._files[name] = path

    @property
    def names(self) -> set[str]:
        return set(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    def get(self, name: str) -> np.ndarray:
        data, entry = self._entries[name]
        begin, end = entry["data_offsets"]
        return data[begin:end].view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _index_files(index_path: str) -> list[str]:
    """The weight files a model.safetensors.index.json names, checked to be plain file names."""
    try:
        with open(index_path, "rb") as f:
            weight_map = json.loads(f.read().decode("utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
        raise CheckpointFormatError(
            index_path, 'not a safetensors index: expected JSON with a "weight_map" object'
        ) from None
    for name in files:
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise CheckpointFormatError(
                index_path, f"weight_map names {name!r}, not a file in the checkpoint directory"
            )
    return files


def _default_file_mode() -> int:
    """0o666 less the process umask: the mode open() gives a new file."""
    try:  # Linux says it without changing it (another thread may be creating files)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)  # elsewhere the only way to read it is to set it
    os.umask(umask)
    return 0o666 & ~umask


def _save_file(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str]) -> None:
    """safetensors' save_file, leaving the file readable as open() would (it writes 0600)."""
    save_file(tensors, path, metadata=metadata)
    os.chmod(path, _default_file_mode())


def write_checkpoint(
    directory: str | os.PathLike, tensors: Mapping[str, np.ndarray], max_shard_bytes: int
) -> list[str]:
    """Writes model.safetensors, or shards plus an index when larger than max_shard_bytes.

    Shards are filled in the order of `tensors` and named as transformers names
    them (model-00001-of-00003.safetensors). Every new file is written and synced
    in a staging directory inside `directory` first; only then are they renamed
    into place (the index last, after the previous index is removed, so that a
    reader never takes a mixture for a checkpoint) and a previous export's
    weight files that are not part of the new one removed. A failure while
    writing leaves the previous export untouched and no staging directory. Files
    get the mode open() gives (0o666 less the umask), as transformers'
    save_pretrained leaves them. Returns the file names written.
    """
    directory = os.fspath(directory)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = np.ascontiguousarray(array)
        size += array.nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    staging = tempfile.mkdtemp(prefix=".export-staging-", dir=directory)
    try:
        if len(shards) == 1:
            names = [SINGLE_FILE]
            _save_file(shards[0], os.path.join(staging, SINGLE_FILE), metadata)
        else:
            names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
            weight_map = {}
            for file_name, shard in zip(names, shards):
                _save_file(shard, os.path.join(staging, file_name), metadata)
                weight_map.update(dict.fromkeys(shard, file_name))
            index = {
                "metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
                "weight_map": weight_map,
            }
            with open(os.path.join(staging, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2)
            names.append(INDEX_FILE)
        for name in names:
            fsync_path(os.path.join(staging, name))
        previous = [
            name
            for name in os.listdir(directory)
            if name in (SINGLE_FILE, INDEX_FILE) or _SHARD_FILE.fullmatch(name)
        ]
        if INDEX_FILE in previous:  # no index while the shards it names are being replaced
            os.remove(os.path.join(directory, INDEX_FILE))
        for name in names:  # the new index (if any) is last
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
        for name in previous:  # a previous export's files would shadow or mix in
            if name not in names and os.path.exists(os.path.join(directory, name)):
                os.remove(os.path.join(directory, name))
        fsync_path(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return names
