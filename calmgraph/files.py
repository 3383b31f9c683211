"""Writing the user's files: only the files named, nothing replaced unless told, each file whole or not at all.

Every file calmgraph writes for a user (artifacts, checkpoints, pictures, summaries) goes through here:

- the targets of one call are checked together before any is written: two that are the same file, a
  symlink or a folder in the way, or an existing file without `overwrite=True`, refuse the whole call;
- a symlink is never written through (nor replaced): it may point anywhere;
- each file is written to a temporary name in its own folder, flushed to disk, then renamed into place,
  so a crash leaves the old file or the new one, never half of either. Without `overwrite`, the rename
  is a hard link, which fails if a file appeared meanwhile. A temporary file a killed process left behind
  is removed by the next write into its folder (`sweep`).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterable

from .errors import WriteError

TMP_PREFIX = ".calmgraph-tmp-"  # temporary names: <prefix><host>.<pid>.<random>-<name>
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _tmp_name(name: str = "") -> str:
    """A temporary name that says who wrote it: this host and process (so a later write can tell a kill's
    leftover from another writer's file in progress)."""
    return f"{TMP_PREFIX}{_HOST}.{os.getpid()}.{secrets.token_hex(4)}" + (f"-{name}" if name else "")


def sweep(folder: Path) -> list[Path]:
    """Remove the temporary files and folders a killed calmgraph process left in `folder` (written on this
    host by a process that no longer runs); another live writer's, or another host's, are left alone."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            if not entry.name.startswith(f"{TMP_PREFIX}{_HOST}."):
                continue
            pid = entry.name[len(TMP_PREFIX) + len(_HOST) + 1:].split(".", 1)[0]
            if not pid.isdigit() or _alive(int(pid)) or entry.is_symlink():
                continue
            with contextlib.suppress(OSError):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # it exists (another user's), or cannot be asked: leave its files alone
    return True


def check_targets(paths: Iterable[str | Path], *, overwrite: bool = False, flag: str = "overwrite=True") -> list[Path]:
    """The paths, checked as one write: distinct, no symlink or folder in the way, none existing unless
    `overwrite`. `flag` is how the caller's user says overwrite (`--overwrite` on the command line)."""
    paths = [Path(p) for p in paths]
    seen: dict[Path, Path] = {}
    for p in paths:
        key = Path(os.path.abspath(p))
        if key in seen:
            raise WriteError(f"{str(seen[key])!r} would be written twice in one call (as two of its files); "
                             "give the artifact another name")
        seen[key] = p
        if p.is_symlink():
            raise WriteError(f"{str(p)!r} is a symbolic link; calmgraph never writes through one (it may point "
                             "anywhere): remove it or choose another path")
        if p.exists() and not p.is_file():
            raise WriteError(f"{str(p)!r} exists and is not a file; choose another path")
        if p.exists() and not overwrite:
            raise WriteError(f"{str(p)!r} already exists; pass {flag} to replace it, or choose another path")
    return paths


def write_text(path: str | Path, text: str, *, overwrite: bool = False, flag: str = "overwrite=True") -> Path:
    return write_bytes(path, text.encode(), overwrite=overwrite, flag=flag)


def write_bytes(path: str | Path, data: bytes, *, overwrite: bool = False, flag: str = "overwrite=True") -> Path:
    return write_with(path, lambda tmp: tmp.write_bytes(data), overwrite=overwrite, flag=flag)


def write_with(path: str | Path, write: Callable[[Path], object], *, overwrite: bool = False,
               flag: str = "overwrite=True") -> Path:
    """`write(tmp)` writes the file at a temporary path (same folder, same suffix); it then takes `path`'s place."""
    (path,) = check_targets([path], overwrite=overwrite, flag=flag)
    tmp = path.with_name(_tmp_name(path.name))
    with _os_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep(path.parent)
        try:
            write(tmp)
            fsync(tmp)
            place(tmp, path, overwrite=overwrite, flag=flag)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        fsync(path.parent)
    return path


@contextlib.contextmanager
def _os_errors(path: Path):
    """The operating system's refusal (no permission, disk full, not a folder) as one calmgraph error line."""
    try:
        yield
    except OSError as e:
        raise WriteError(f"could not write {str(path)!r}: {e.strerror or e}"
                         + (f" ({e.filename})" if e.filename and str(e.filename) != str(path) else "")) from e


def place(tmp: Path, path: Path, *, overwrite: bool, flag: str = "overwrite=True") -> None:
    """Move the finished `tmp` to `path`: replacing it only with `overwrite`, and never a symlink."""
    check_targets([path], overwrite=overwrite, flag=flag)  # again: something may have appeared meanwhile
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic create-if-absent: fails if a file appeared since the check
    except FileExistsError:
        raise WriteError(f"{str(path)!r} already exists; pass {flag} to replace it, or choose another path") from None
    except OSError:  # a file system without hard links: the check above is the best there is
        os.replace(tmp, path)


def write_folder(files: dict[str, Callable[[Path], object]], folder: str | Path, *, overwrite: bool = False,
                 flag: str = "overwrite=True") -> list[Path]:
    """Several files written into one temporary folder beside `folder`'s files, then each moved into place.
    For writers that name companion files after the file they write (ONNX external data)."""
    folder = Path(folder)
    targets = check_targets([folder / name for name in files], overwrite=overwrite, flag=flag)
    with _os_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
        sweep(folder)
        staging = folder / _tmp_name()
        staging.mkdir()
    with _os_errors(folder), _cleaned(staging):
        for name, write in files.items():
            write(staging / name)
        produced = sorted(p for p in staging.iterdir() if p.is_file())
        extra = check_targets([folder / p.name for p in produced if p.name not in files], overwrite=overwrite, flag=flag)
        for p in produced:
            fsync(p)
        for p in produced:
            place(p, folder / p.name, overwrite=overwrite, flag=flag)
    fsync(folder)
    return [*targets, *extra]


@contextlib.contextmanager
def _cleaned(staging: Path):
    try:
        yield
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk; a no-op where the platform cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
