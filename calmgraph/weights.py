"""A model's weights read from its safetensors files a few rows at a time, for `parallel.load_sharded`:
each rank reads the bytes of its own dim-0 shard of a tensor straight into that shard, and nothing else.

The format is simple (safetensors' own description): 8 bytes, the little-endian length N of a JSON header,
the header (for each tensor: dtype, shape, byte range after the header), then the data, row-major. A
sharded checkpoint (`save_pretrained(max_shard_size=...)`) is several such files and an index naming them.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

INDEX = "model.safetensors.index.json"
MAX_HEADER = 100_000_000  # bytes, as safetensors itself
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


@dataclass(frozen=True)
class Entry:
    """Where one tensor's bytes lie: file, dtype, shape, absolute byte offsets [start, end)."""
    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def index_folder(folder: Path, where: str) -> dict[str, Entry]:
    """Every tensor of the safetensors files in `folder` (those its index names, else every *.safetensors)."""
    if not folder.is_dir():
        raise CheckpointError(f"{where}: no directory at {str(folder)!r}; expected a folder written by save_pretrained")
    files = _files(folder, where)
    if not files:
        raise CheckpointError(f"{where}: {str(folder)!r} holds no .safetensors file (save the model with "
                              "save_pretrained(..., safe_serialization=True))")
    entries: dict[str, Entry] = {}
    for file in files:
        for name, entry in read_header(file, where).items():
            if name in entries:
                raise CheckpointError(f"{where}: tensor {name!r} is in both {entries[name].file.name} and "
                                      f"{file.name} of {str(folder)!r}; which to load is ambiguous")
            entries[name] = entry
    return entries


def _files(folder: Path, where: str) -> list[Path]:
    index = folder / INDEX
    if not index.is_file():
        return sorted(folder.glob("*.safetensors"))
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()), key=str)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{where}: {str(index)!r} is not a safetensors index (no weight_map)") from None
    for n in names:  # a file of the folder itself: no path leads out of it
        if not isinstance(n, str) or Path(n).name != n or not (folder / n).is_file():
            raise CheckpointError(f"{where}: {str(index)!r} names {n!r}, which is not a file of the folder")
    return [folder / n for n in names]


def read_header(file: Path, where: str) -> dict[str, Entry]:
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(MAX_HEADER, size - 8):
            raise CheckpointError(f"{where}: {str(file)!r} is not a safetensors file (no valid header)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise CheckpointError(f"{where}: {str(file)!r} is not a safetensors file (its header is not "
                                  "JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: {str(file)!r} is not a safetensors file (its header is not a table)")
    return {name: _entry(file, name, info, 8 + n, size, where) for name, info in header.items()
            if name != "__metadata__"}


def _entry(file: Path, name: str, info, base: int, size: int, where: str) -> Entry:
    bad = f"{where}: tensor {name!r} in {str(file)!r}"
    try:
        dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{bad} has a malformed header entry (the file is damaged)") from None
    if dtype_name not in DTYPES:
        raise CheckpointError(f"{bad} has dtype {dtype_name!r}, which calmgraph does not read "
                              f"(it reads {', '.join(DTYPES)})")
    dtype = DTYPES[dtype_name]
    if not all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end)) or \
            end - begin != math.prod(shape) * dtype.itemsize or base + end > size:
        raise CheckpointError(f"{bad}: its byte range does not match its shape {list(shape)} or lies past the "
                              "end of the file (the file is damaged or truncated)")
    return Entry(file, name, dtype, shape, base + begin, base + end)


def read_rows(entry: Entry, start: int, out: torch.Tensor, where: str) -> None:
    """Rows `start : start + len(out)` (dim 0) of `entry` into `out`, cast to its dtype, reading only them.
    A 0-d tensor is read whole."""
    rows = out.shape[0] if out.dim() else 1
    if out.numel() == 0:
        return
    row_bytes = math.prod(entry.shape[1:]) * entry.dtype.itemsize
    direct = out.dtype == entry.dtype and out.device.type == "cpu" and out.is_contiguous()
    buf = out if direct else torch.empty(out.shape, dtype=entry.dtype)
    view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
    with open(entry.file, "rb") as f:
        f.seek(entry.start + start * row_bytes)
        got = f.readinto(view)
    if got != rows * row_bytes:
        raise CheckpointError(f"{where}: {str(entry.file)!r} ended inside tensor {entry.name!r} "
                              "(the file is truncated)")
    if not direct:
        out.copy_(buf)
