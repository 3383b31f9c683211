"""torch.compile's caches carried from one process (one device machine) to the next, for benchmarks whose
compiles take minutes: `load(folder)` before compiling, `save(folder)` after. The caches are torch's own
portable artifacts (`torch.compiler.save_cache_artifacts`: inductor's compiled graphs with their Triton
kernels, AOTAutograd's, autotuning), gzipped and cut into parts of at most 15 MiB, so that a device
machine's output folder can return them and a later call can carry them back. A first call that loaded
them is not a cold first call: the benchmarks say which it was.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import torch

PART = 15 * 2**20
NAME = "compile_cache.gz."


def load(folder: Path | None) -> int:
    """Loads the artifacts saved in `folder` (a folder without parts: nothing); their size in bytes, 0 if none.
    A folder that is not there is an error (a mistyped path would otherwise time a cold compile as a warm one)."""
    if folder is not None and not Path(folder).is_dir():
        raise FileNotFoundError(f"no compile cache folder {folder} (save one with --save-cache)")
    parts = sorted(Path(folder).glob(NAME + "*")) if folder is not None else []
    if not parts:
        return 0
    data = gzip.decompress(b"".join(p.read_bytes() for p in parts))
    torch.compiler.load_cache_artifacts(data)
    return len(data)


def save(folder: Path | None) -> int:
    """Writes every artifact this process made or loaded to `folder`, replacing what was there; bytes saved."""
    saved = torch.compiler.save_cache_artifacts() if folder is not None else None
    if saved is None:
        return 0
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(NAME + "*"):
        old.unlink()
    packed = gzip.compress(saved[0], compresslevel=6)
    for i in range(0, len(packed), PART):
        (folder / f"{NAME}{i // PART:02d}").write_bytes(packed[i:i + PART])
    return len(saved[0])
