"""Lazy, tensor-by-tensor reading of safetensors checkpoints (single files and sharded folders).

The header is parsed here and tensors are memory-mapped one at a time, so that bfloat16 reads into
numpy (via ml_dtypes) and a conversion never holds more than the tensor in hand.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be read as claimed; the message names the file."""


class SafetensorsFile(Mapping[str, np.ndarray]):
    """One .safetensors file as a read-only mapping name -> numpy array (memory-mapped on access)."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"checkpoint file not found: {self.path}")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise CheckpointError(f"{self.path}: truncated or not a safetensors file (header of {header_len} bytes)")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise CheckpointError(f"{self.path}: corrupt safetensors header") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries = header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self._data_start + end > size:
            raise CheckpointError(
                f"{self.path}: truncated ({size} bytes on disk, the header needs {self._data_start + end})"
            )
        for name, e in header.items():
            if e["dtype"] not in _DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def __getitem__(self, name: str) -> np.ndarray:
        e = self._entries[name]  # KeyError for unknown names, as a Mapping should
        dtype = np.dtype(_DTYPES[e["dtype"]])
        begin, end = e["data_offsets"]
        shape = tuple(e["shape"])
        if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise CheckpointError(f"{self.path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)}")
        if end == begin:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + begin, shape=shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class ShardedCheckpoint(Mapping[str, np.ndarray]):
    """All tensors of a component folder: one .safetensors file, or shards with their index json."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = pathlib.Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {self.folder}")
        indexes = sorted(self.folder.glob("*.safetensors.index.json"))
        if indexes:
            self._files, self._where = self._from_index(indexes[0])
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors file in {self.folder}")
            if len(files) > 1:
                raise CheckpointError(f"{self.folder} has several .safetensors files and no index json")
            f = SafetensorsFile(files[0])
            self._files, self._where = {files[0].name: f}, dict.fromkeys(f, files[0].name)

    def _from_index(self, index_path: pathlib.Path):
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index_path}: not a valid safetensors index (no weight_map)") from None
        files = {name: SafetensorsFile(self.folder / name) for name in sorted(set(weight_map.values()))}
        for key, name in weight_map.items():
            if key not in files[name]:
                raise CheckpointError(f"{index_path} lists {key!r} in {name}, which does not contain it")
        return files, dict(weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files[self._where[name]].shape(name)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._files[self._where[name]][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class ShapesOnly(Mapping[str, np.ndarray]):
    """Zero-stride placeholder arrays with each tensor's shape: a dry run of the key maps reads no data."""

    def __init__(self, tensors):
        self._tensors = tensors

    def __getitem__(self, key: str) -> np.ndarray:
        return np.broadcast_to(np.zeros((), np.bool_), self._tensors.shape(key))

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


class ShardSubset(Mapping[str, np.ndarray]):
    """A sharded folder whose index lists shards that may be absent (hub downloads skip shards of unused layers).

    Present shards are opened (and checked) at once; reading a tensor of an absent shard raises CheckpointError.
    """

    def __init__(self, folder: pathlib.Path, index_path: pathlib.Path):
        try:
            self._where = dict(json.loads(index_path.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index_path}: not a valid safetensors index (no weight_map)") from None
        self._files = {f: SafetensorsFile(folder / f) for f in sorted(set(self._where.values()))
                       if (folder / f).exists()}
        self.folder = folder
        for key, file in self._where.items():
            if file in self._files and key not in self._files[file]:
                raise CheckpointError(f"{index_path} lists {key!r} in {file}, which does not contain it")

    def _file(self, key: str) -> SafetensorsFile:
        file = self._where[key]
        if file not in self._files:
            raise CheckpointError(f"{self.folder / file} is missing (it holds {key!r})")
        return self._files[file]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file(key).shape(key)

    def __getitem__(self, key: str) -> np.ndarray:
        return self._file(key)[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def open_folder(folder: pathlib.Path, *, partial: bool = False):
    if partial and folder.is_dir():
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if indexes:
            return ShardSubset(folder, indexes[0])
    return ShardedCheckpoint(folder)
