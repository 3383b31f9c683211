"""Checkpoints of the new parameters only: the cross-attention blocks, as safetensors, plus the spec.

    composed.save_new("ckpt/")                  # ckpt/new_params.safetensors + ckpt/spec.json
    composed.save_new("ckpt/step_100.safetensors")   # + ckpt/step_100.spec.json: files never shared
    cg.load_new(composed, "ckpt/")              # bit for bit; refuses a checkpoint of another composition
    cg.load("ckpt/")                            # the whole composition rebuilt from the folder (load.py)

An existing file is replaced only with `overwrite=True`, and each file is written whole or not at all. A
composition sharded across processes (`calmgraph.parallel.shard`) saves from every process: each gathers
the shards (a collective), and the first process writes.
FineTuner's step folders hold the same two files (plus the optimizer's), so `load_new` reads them too.

The frozen models are not saved: they are the user's (or their `source:`). The spec travels inside the
safetensors metadata too, so the file alone says what it belongs to. Nothing is ever unpickled.
Loading validates every tensor before it copies any: a refused checkpoint changes nothing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, SpecError
from .files import check_targets, write_text, write_with
from .limits import load_json
from .spec import CompositionSpec


FILE = "new_params.safetensors"
SPEC_KEY = "calmgraph_spec"  # safetensors metadata key holding the spec as JSON


def _file(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / FILE


def spec_file(file: Path) -> Path:
    """The spec's file beside a checkpoint: `spec.json` in a checkpoint's own folder, else `<stem>.spec.json`."""
    return file.with_name("spec.json") if file.name == FILE else file.with_name(f"{file.stem}.spec.json")


def save_new(composed, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write the new parameters to `path` (a folder, or a `.safetensors` file) and the spec beside them.
    Sharded: call it on every process; the shards are gathered and process 0 writes."""
    from .parallel import sharded
    named = list(composed.named_new_parameters())
    tensors = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().contiguous()
               for name, p in named}
    # the new parameters may all be whole here (FSDP leaves the root's gathered after a forward): ask the model
    if sharded(composed) is not None and torch.distributed.get_rank() != 0:
        return _file(path)
    spec = composed.recorded_spec() if hasattr(composed, "recorded_spec") else composed.spec
    return write_new(tensors, _file(path), spec, overwrite=overwrite)


def write_new(tensors: dict[str, torch.Tensor], file: Path, spec: CompositionSpec | None, *,
              overwrite: bool = False) -> Path:
    """The one writer of new parameters (`save_new`, FineTuner): safetensors with the spec in its metadata,
    and the spec as JSON beside it. Both files are checked before either is written."""
    files = [file] + ([spec_file(file)] if spec is not None else [])
    check_targets(files, overwrite=overwrite)
    metadata = {SPEC_KEY: spec.to_json(indent=None)} if spec is not None else None
    write_with(file, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), overwrite=overwrite)
    if spec is not None:
        write_text(files[1], spec.to_json() + "\n", overwrite=overwrite)
    return file


def load_new(composed, path: str | Path):
    """Copy a checkpoint of new parameters into `composed` (in place; returned for chaining)."""
    file = _file(path)
    if not file.is_file():
        raise CheckpointError(f"no checkpoint at {str(file)!r}; expected a file written by composed.save_new")
    try:
        staged = load_file(str(file))                     # plain tensors: safetensors cannot hold code
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{str(file)!r} is not a readable safetensors file: {e}") from None

    expected = dict(composed.named_new_parameters())
    problems = _spec_problems(metadata.get(SPEC_KEY), composed) + tensor_problems(staged, expected)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise CheckpointError(f"checkpoint {str(file)!r} does not fit this composition; nothing was loaded:\n{lines}")

    with torch.no_grad():
        for name, p in expected.items():
            p.copy_(staged[name])
    return composed


def tensor_problems(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], owner: str = "the composition",
                    extra: str = "the composition does not have") -> list[str]:
    """What keeps `tensors` (a file's) from being loaded into `expected` (the owner's): names, shapes, kinds."""
    problems = []
    missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_some(missing)}")
    if unknown:
        problems.append(f"{len(unknown)} tensor(s) {extra}: {_some(unknown)}")
    for name in sorted(set(expected) & set(tensors)):
        want, got = expected[name], tensors[name]
        if tuple(got.shape) != tuple(want.shape):
            problems.append(f"{name}: shape {tuple(got.shape)} in the checkpoint, {tuple(want.shape)} in {owner}")
        elif got.is_floating_point() != want.is_floating_point():
            problems.append(f"{name}: dtype {got.dtype} in the checkpoint, {want.dtype} in {owner}")
    return problems


def _spec_problems(saved: str | None, composed) -> list[str]:
    if saved is None:  # e.g. written by another tool: names and shapes are still checked
        return []
    try:
        theirs = load_json(saved)  # bounded: a crafted file's metadata may be deep or huge
    except SpecError:
        return ["its spec metadata is not valid JSON (or beyond what a spec may be)"]
    try:
        theirs = CompositionSpec.from_dict(theirs).model_dump(mode="json")  # with defaults, like ours
    except SpecError:
        pass  # e.g. from another calmgraph version: compared as written
    diffs = _diff(_without_sources(theirs), _without_sources(composed.spec.model_dump(mode="json")), "")
    if not diffs:
        return []
    shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
    return [f"it was saved from a different spec ({shown})"]


def _without_sources(spec: dict) -> dict:
    """Where the models come from does not change the new parameters; everything else does."""
    if not isinstance(spec, dict):
        return spec
    spec = json.loads(json.dumps(spec))
    for model in [spec.get("anchor", {}), *spec.get("augments", [])]:
        if isinstance(model, dict):
            model.pop("source", None)
    return spec


def _diff(a: Any, b: Any, loc: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _diff(a.get(k), b.get(k), f"{loc}.{k}" if loc else k)]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{loc}[{i}]")]
    return [] if a == b else [f"{loc}: checkpoint {json.dumps(a)}, composition {json.dumps(b)}"]


def _some(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")
