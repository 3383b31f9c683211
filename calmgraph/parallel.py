"""Training at scale on the block-granular fused graph: activation checkpointing and FSDP2 sharding.

Both act on the blocks the outline pass made (`passes/outline.py`): each block of each model is one
submodule, called once from the root graph by a node marked `calmgraph_block`.

    checkpoint_blocks(composed)   # each block's activations recomputed in backward, not kept
    shard(composed)               # FSDP2: each block, then the root, sharded over the ranks

Either order works; call both before building the optimizer (sharding replaces the parameters).

An anchor larger than one process's memory: compile on the meta device (no weight is read or allocated),
shard, then each rank reads only its own rows of each weight from the models' safetensors files:

    with torch.device("meta"):
        composed = cg.compile("spec.yaml")    # hf: sources, structure only
    shard(composed)
    load_sharded(composed)                    # about 1/world of the weights per rank, never more
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils.checkpoint

from .errors import CheckpointError, ModelError, ParallelError
from .passes.outline import BLOCK_KEY
from .passes.splice import INITIAL
from .plan import ROOT

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def block_paths(composed: fx.GraphModule) -> list[str]:
    """The paths of the block submodules the root graph calls, in graph order."""
    return list(dict.fromkeys(n.meta[BLOCK_KEY] for n in composed.graph.nodes if BLOCK_KEY in n.meta))


def _require_blocks(composed: fx.GraphModule, what: str) -> list[str]:
    if not isinstance(composed, fx.GraphModule):
        raise ParallelError(f"{what} takes a composed model (cg.compile's result); got {type(composed).__name__}")
    paths = block_paths(composed)
    if not paths:
        raise ParallelError(f"{what}: the composed model's graph calls no block submodule (it was not built by "
                            "this version's cg.compile); compile the spec again")
    return paths


def checkpointed(composed: fx.GraphModule) -> list[str]:
    """The block paths whose calls already run through torch.utils.checkpoint."""
    return [n.meta[BLOCK_KEY] for n in composed.graph.nodes
            if BLOCK_KEY in n.meta and n.target is torch.utils.checkpoint.checkpoint]


def checkpoint_blocks(composed: fx.GraphModule) -> fx.GraphModule:
    """Run every block call through `torch.utils.checkpoint` (non-reentrant): a block keeps only its inputs
    for backward and recomputes the rest, so activation memory no longer grows with the blocks' insides.
    Rewrites `composed`'s graph in place (and returns it); calling it again changes nothing. The values
    and gradients are those of the plain graph; it works eager, under torch.compile and with `shard`."""
    _require_blocks(composed, "checkpoint_blocks")
    graph = composed.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or BLOCK_KEY not in node.meta:
            continue
        with graph.inserting_before(node):
            block = graph.get_attr(node.target)
            call = graph.call_function(torch.utils.checkpoint.checkpoint, (block, *node.args),
                                       {**node.kwargs, "use_reentrant": False})
        call.meta = dict(node.meta)
        block.meta = {k: v for k, v in node.meta.items() if k != BLOCK_KEY and k != "val"}
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    graph.lint()
    composed.recompile()
    return composed


def shard(composed: fx.GraphModule, mesh=None, **fsdp_options) -> fx.GraphModule:
    """FSDP2 (`torch.distributed.fsdp.fully_shard`) on each block, then on the root (embeddings, heads,
    norms and the new cross-attention blocks): each rank keeps about 1/world of every weight and gathers a
    block's weights only while that block runs. In place; returns `composed`. `mesh` and `fsdp_options`
    (e.g. `mp_policy`, `reshard_after_forward`) go to `fully_shard`; without a mesh, all ranks of the
    default process group. Gradients of the new parameters are averaged over the ranks (as DDP does)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, fully_shard

    paths = _require_blocks(composed, "shard")
    if mesh is None and not (dist.is_available() and dist.is_initialized()):
        raise ParallelError("shard needs torch.distributed initialised (launch with torchrun or accelerate, "
                            "then dist.init_process_group) or a device mesh")
    if isinstance(composed, FSDPModule):
        raise ParallelError("this composed model is already sharded; shard it once")
    for path in paths:
        fully_shard(composed.get_submodule(path), mesh=mesh, **fsdp_options)
    fully_shard(composed, mesh=mesh, **fsdp_options)
    return composed


def sharded(module: nn.Module) -> tuple[str, DeviceMesh] | None:
    """The name of a parameter sharded across processes (FSDP2's DTensors), if any, and its device mesh. None
    without a process group, where there is none to shard across: the walk over every parameter is left out
    of each call. (After a forward, FSDP leaves the root's own weights gathered: whole, not DTensors.)"""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return next(((n, p.device_mesh) for n, p in module.named_parameters() if hasattr(p, "device_mesh")), None)


def local_numel(module: nn.Module) -> int:
    """Elements of `module`'s parameters held by this rank (a sharded parameter counts its local shard)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in module.parameters())


# -- loading a meta-device composition rank by rank ------------------------------------------------------


def load_sharded(composed: fx.GraphModule, sources: dict | None = None, *, device=None) -> fx.GraphModule:
    """Give a composition compiled on the meta device its weights, each rank allocating and reading only
    its own shards (after `shard`; unsharded, every weight whole): the frozen weights from each model's
    safetensors files, read row range by row range (tied weights from the one tensor stored), buffers not in
    the files (rotary `inv_freq`) recomputed from the folder's config, and the new cross-attention
    parameters with the values compile drew for them (those of a compile on real weights, same seed).

    `sources`: {model name: save_pretrained folder}; a model not named reads its spec's `hf:` folder.
    `device`: where the weights go; default the device mesh's (after `shard`), else the CPU. Every file is
    checked (each tensor present, of the model's shape) before anything is allocated. Unsharded, the weights
    the composition pruned (an augment's head) are read too, for `generate`. In place; returns it."""
    if not isinstance(composed, fx.GraphModule) or not hasattr(composed, "traced_model"):  # a ComposedModel
        raise ParallelError(f"load_sharded takes a composed model (cg.compile's result); got {type(composed).__name__}")
    targets = [n for n, t in _named_tensors(composed) if t.is_meta]
    constants = [f"{m}.{k}".lstrip(".") for m, module in composed.named_modules() for k, v in vars(module).items()
                 if isinstance(v, torch.Tensor) and v.is_meta]
    if constants:  # a tensor the graph reads that is neither parameter nor buffer: to_empty would not fill it
        raise ParallelError(f"load_sharded: the graph holds the constant {constants[0]!r} on the meta device, which "
                            "no file holds; compile this composition on real weights")
    if not targets:
        raise ParallelError("load_sharded: no weight of this composed model is on the meta device, so there is "
                            "nothing to load; compile it under `with torch.device('meta'):` to load it rank by rank")
    folders = _folders(composed, sources, targets)
    plan = _plan(composed, targets, folders)  # every check, nothing allocated yet
    extra = {m: _buffers_from_config(composed, m, folder) for m, folder in folders.items()
             if _traced_meta_buffers(composed, m)}
    before = {id(t): n for n, t in _named_tensors(composed)}
    sharded = any(hasattr(t, "device_mesh") for t in composed.parameters())
    pruned = {} if sharded else _pruned_entries(composed, folders, before)
    composed.to_empty(device=_device(composed, device))
    tensors = dict(_named_tensors(composed))
    drawn = (None, {})  # the last block's initial values: drawn when its first tensor is copied
    with torch.no_grad():
        for name, source in plan.items():
            local, start = _local_rows(name, tensors[name])
            if isinstance(source, _Initial):
                if drawn[0] is not source.draw:
                    drawn = (source.draw, source.draw())
                source = drawn[1][source.key]
            if isinstance(source, torch.Tensor):
                local.copy_(source[start:start + len(local)] if source.dim() else source)
            else:
                from .weights import read_rows
                read_rows(source, start, local, f"tensor {name!r}")
    for block in composed.get_submodule(ROOT).modules():  # the initial values are loaded: free them
        if hasattr(block, INITIAL):
            delattr(block, INITIAL)
    _repoint_traced(composed, before, tensors, extra)
    _load_pruned(composed, pruned, next(iter(tensors.values())).device)
    return composed


def _pruned_entries(composed, folders: dict[str, Path], shared: dict[int, str]) -> dict:
    """{(model, parameter path): file entry} for the traced models' weights the composition pruned (an
    augment's head): generation traces the whole model again, so an unsharded load reads them too."""
    from .weights import index_folder
    out = {}
    for model, folder in folders.items():
        traced = composed.traced_model(model)
        index = index_folder(folder, f"model {model!r}") if traced is not None else {}
        for path, p in (traced.named_parameters() if traced is not None else ()):
            if p.is_meta and id(p) not in shared:
                stored = _stored_names(composed, model, path)
                entry = next((index[k] for k in stored if k in index), None)
                if entry is not None and entry.shape == tuple(p.shape):
                    out[model, path] = entry
    return out


def _load_pruned(composed, pruned: dict, device) -> None:
    from .weights import read_rows
    for (model, path), entry in pruned.items():
        traced = composed.traced_model(model)
        owner, _, key = path.rpartition(".")
        module = traced.get_submodule(owner)
        old = module._parameters[key]
        loaded = nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device=device), requires_grad=False)
        read_rows(entry, 0, loaded.data, f"tensor {model}.{path!r}")
        for m in traced.modules():  # a tied weight: every module holding it
            for k, t in m._parameters.items():
                if t is old:
                    m._parameters[k] = loaded


def _traced_meta_buffers(composed, model: str) -> list[str]:
    traced = composed.traced_model(model)
    return [] if traced is None else [n for n, b in traced.named_buffers() if b.is_meta]


def _repoint_traced(composed, before: dict[int, str], tensors: dict, extra: dict[str, dict]) -> None:
    """The traced models (which generation traces again) hold the loaded tensors, as after a compile on real
    weights: each tensor the composition shared with them, and their buffers it does not use (e.g. rotary
    `original_inv_freq`) as recomputed. Sharded weights are not theirs: a sharded composition generates through
    its own forward (`generation/lockstep.py`), never through them."""
    for model in composed.spec.models:
        traced = composed.traced_model(model.name)
        if traced is None:
            continue
        device = next((t.device for t in tensors.values()), None)
        for path, module in traced.named_modules():
            for slots in (module._parameters, module._buffers):
                for key, t in slots.items():
                    name = before.get(id(t))
                    loaded = tensors.get(name) if name is not None else None
                    if loaded is not None and not hasattr(loaded, "device_mesh"):
                        slots[key] = loaded
                    elif t is not None and t.is_meta and slots is module._buffers:
                        value = extra.get(model.name, {}).get(f"{path}.{key}".lstrip("."))
                        if value is not None:
                            slots[key] = value.to(device)


def _named_tensors(composed: nn.Module):
    yield from composed.named_parameters()
    yield from composed.named_buffers()


def _folders(composed, sources, targets) -> dict[str, Path]:
    """{model name: folder} for each model with a weight to load: from `sources`, else the spec's `hf:` source."""
    from .spec import HfSource
    spec = composed.recorded_spec()
    names = {m.name: m for m in spec.models}
    sources = dict(sources or {})
    unknown = sorted(set(sources) - set(names))
    if unknown:
        raise ParallelError(f"load_sharded: sources= names {unknown}, which the spec does not; its models are "
                            f"{sorted(names)}")
    needed = sorted({t.partition(".")[0] for t in targets if not t.startswith(f"{ROOT}.")})
    stray = [t for t in targets if t.partition(".")[0] not in names and not t.startswith(f"{ROOT}.")]
    if stray:
        raise ParallelError(f"load_sharded: {stray[0]!r} is on the meta device and belongs to no model of the spec, "
                            "so no file holds it; compile this composition on real weights")
    folders = {}
    for name in needed:
        if name in sources:
            if not isinstance(sources[name], (str, os.PathLike)):
                raise ParallelError(f"load_sharded: sources[{name!r}] is a {type(sources[name]).__name__}; give "
                                    "the path of the folder save_pretrained wrote")
            folders[name] = Path(sources[name]).expanduser()
        elif isinstance(names[name].source, HfSource):
            folders[name] = Path(names[name].source.hf)
        else:
            raise ParallelError(f"load_sharded: model {name!r} has no `hf:` source to read its weights from; "
                                f"pass sources={{{name!r}: 'folder written by save_pretrained'}}")
    return folders


def _plan(composed, targets: list[str], folders: dict[str, Path]) -> dict:
    """{tensor name: a weights.Entry to read, or a CPU tensor (new parameters, recomputed buffers)}."""
    from .weights import index_folder
    initial = _initial_values(composed)
    indexes = {m: index_folder(folder, f"model {m!r}") for m, folder in folders.items()}
    buffers = {n for n, _ in composed.named_buffers()}
    rebuilt: dict[str, dict] = {}
    plan = {}
    for name in targets:
        meta = composed.get_buffer(name) if name in buffers else composed.get_parameter(name)
        if name.startswith(f"{ROOT}."):
            if name not in initial:
                raise ParallelError(f"load_sharded: the new parameter {name!r} has no initial values; compile "
                                    "the spec again with this calmgraph version")
            plan[name] = initial[name]
            continue
        model, _, path = name.partition(".")
        stored = _stored_names(composed, model, path)
        entry = next((indexes[model][k] for k in stored if k in indexes[model]), None)
        if entry is None and name in buffers:
            if model not in rebuilt:
                rebuilt[model] = _buffers_from_config(composed, model, folders[model])
            if path in rebuilt[model]:
                plan[name] = rebuilt[model][path]
                continue
        if entry is None:
            tied = f" (tied: also {', '.join(map(repr, stored[1:]))})" if stored[1:] else ""
            raise CheckpointError(f"model {model!r}: tensor {path!r}{tied} is in none of the safetensors files of "
                                  f"{str(folders[model])!r}; the folder does not hold this model's weights")
        if entry.shape != tuple(meta.shape):
            raise CheckpointError(f"model {model!r}: tensor {entry.name!r} in {str(entry.file)!r} has shape "
                                  f"{list(entry.shape)}, the model's {path!r} has {list(meta.shape)}; the folder "
                                  "holds another model's weights")
        plan[name] = entry
    return plan


@dataclass(frozen=True)
class _Initial:
    """A new parameter's (or buffer's) initial value: `draw()[key]`, drawn with its block's as it is loaded
    (`splice.build_block`), so a block's values are in memory only while they are copied."""
    draw: Callable[[], dict[str, torch.Tensor]]
    key: str


def _initial_values(composed) -> dict[str, _Initial]:
    """How to draw each new parameter's (and buffer's) initial value, for a meta-device compile."""
    out = {}
    for path, block in composed.get_submodule(ROOT).named_modules():
        draw = getattr(block, INITIAL, None)
        if draw is not None:
            for key in block.state_dict():
                out[".".join(p for p in (ROOT, path, key) if p)] = _Initial(draw, key)
    return out


def _stored_names(composed, model: str, path: str) -> list[str]:
    """`path` and every other name of the same tensor in the model (a tied lm_head is stored once, as the
    embedding, under either name)."""
    traced = composed.traced_model(model)
    if traced is None:
        return [path]
    try:
        tensor = traced.get_parameter(path)
    except AttributeError:
        return [path]
    return [path, *(n for n, p in traced.named_parameters(remove_duplicate=False) if p is tensor and n != path)]


def _buffers_from_config(composed, model: str, folder: Path) -> dict[str, torch.Tensor]:
    """The buffers of `model` as its folder's config builds them, on the CPU (parameters on meta)."""
    from .sources import hf_structure
    spec = next(m for m in composed.spec.models if m.name == model)
    where = f"model {model!r}"
    prompt = getattr(spec, "input", "shared") == "prompt"
    try:
        with _parameters_on_meta():
            built = hf_structure(spec.source if hasattr(spec.source, "auto_class") else None, folder, prompt, where)
    except ModelError as e:
        raise CheckpointError(f"{where}: its buffers are not in {str(folder)!r} and cannot be recomputed: "
                              f"{e}") from None
    return {n: b for n, b in built.named_buffers() if not b.is_meta}


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside keep their parameters on the meta device and their buffers where they are made
    (as accelerate's init_empty_weights(include_buffers=False)): a model's buffers without its weights."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _device(composed, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    from torch.distributed.tensor import DTensor
    sharded = next((p for p in composed.parameters() if isinstance(p, DTensor)), None)
    if sharded is None:
        return torch.device("cpu")
    kind = sharded.device_mesh.device_type
    module = getattr(torch, kind, None)
    index = module.current_device() if kind != "cpu" and hasattr(module, "current_device") else None
    return torch.device(kind, index) if index is not None else torch.device(kind)


def _local_rows(name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's part of `tensor` (all of it, unsharded) and the global row its first row is."""
    from torch.distributed.tensor import DTensor
    if not isinstance(tensor, DTensor):
        return tensor, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    if tuple(shape[1:]) != tuple(tensor.shape[1:]) or any(offset[1:]):
        raise ParallelError(f"load_sharded: {name!r} is sharded along a dimension other than 0 "
                            f"({tensor.placements}); it reads the dim-0 shards FSDP2 makes")
    return tensor.to_local(), (offset[0] if offset else 0)
