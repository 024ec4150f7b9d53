"""Reading and writing safetensors checkpoints (one file or shards with an index).

Reading memory-maps the files and hands out numpy views, so that an importer
copies only the slice of each tensor that one device needs. The `safetensors`
package cannot do this for the common case: its numpy backend has no
bfloat16, and its flax backend lands every tensor on one device first.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

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
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


class SafetensorsCheckpoint:
    """The tensors of a checkpoint directory, by name, as read-only memory-mapped arrays."""

    def __init__(self, directory: str | os.PathLike):
        directory = os.fspath(directory)
        index_path = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            raise FileNotFoundError(
                f"Neither {SINGLE_FILE} nor {INDEX_FILE} in {directory}; rl_reason reads"
                " safetensors only (convert pickled pytorch_model.bin checkpoints with"
                " transformers first)."
            )
        self._entries: dict[str, tuple[np.memmap, dict]] = {}
        for name in files:
            self._read_header(os.path.join(directory, name))

    def _read_header(self, path: str) -> None:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + length)
        for name, entry in header.items():
            if entry["dtype"] not in _DTYPES:
                raise ValueError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}.")
            self._entries[name] = (data, entry)

    @property
    def names(self) -> set[str]:
        return set(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    def get(self, name: str) -> np.ndarray:
        data, entry = self._entries[name]
        begin, end = entry["data_offsets"]
        return data[begin:end].view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def write_checkpoint(
    directory: str | os.PathLike, tensors: Mapping[str, np.ndarray], max_shard_bytes: int
) -> list[str]:
    """Writes model.safetensors, or shards plus an index when larger than max_shard_bytes.

    Shards are filled in the order of `tensors` and named as transformers names
    them (model-00001-of-00003.safetensors); a previous export's weight files in
    `directory` are removed first. Returns the file names written.
    """
    directory = os.fspath(directory)
    for name in os.listdir(directory):  # a previous export's files would shadow or mix in
        if name in (SINGLE_FILE, INDEX_FILE) or _SHARD_FILE.fullmatch(name):
            os.remove(os.path.join(directory, name))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = np.ascontiguousarray(array)
        size += array.nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, SINGLE_FILE), metadata=metadata)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards):
        save_file(shard, os.path.join(directory, file_name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file_name))
    index = {
        "metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
        "weight_map": weight_map,
    }
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
    return names + [INDEX_FILE]
