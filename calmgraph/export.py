"""Export: the fused graph -> a portable artifact that needs only torch (`.pt2`) or an ONNX runtime.

    composed.export("out/composed.pt2")                  # torch.export program
    composed.export("out/composed.onnx", format="onnx")  # torch.onnx.export(..., dynamo=True)

Beside the artifact go `composed.py` (the fused graph's code, for reading) and `composed.spec.json` (the
spec): each named after the artifact, so artifacts in one folder never share a file. An existing file is
replaced only with `overwrite=True`; each file is written whole or not at all (`files.py`).
Batch and sequence lengths are dynamic. The `.pt2` takes its inputs by name, those of
`composed.input_names`: `input_ids`, then each prompt augment's `<name>_input_ids` (or
`<name>_pixel_values`), then each one's `<name>_mask`, in any order. An exported program fixes whether
each input comes by position or by name (torch refuses the other way), and names are what the ONNX
file's inputs carry too. In the artifact the masks are required (pass `torch.ones_like(ids)` for no
padding): its signature is fixed, so the optional-mask default of `composed` cannot come along.

    program = torch.export.load("out/composed.pt2").module()
    logits = program(input_ids=ids, notes_input_ids=notes, notes_mask=torch.ones_like(notes))
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch.export import Dim

from .errors import ExportError
from .files import check_targets, write_folder, write_text, write_with
from .tracing.entry import model_device
from .tracing.frontends import drop_dtype_asserts


FORMATS = ("pt2", "onnx")
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8  # prompts are 2 longer: no two dims are unified by accident


def example_inputs(composed) -> tuple[torch.Tensor, ...]:
    return composed.signature.examples(EXAMPLE_BATCH, EXAMPLE_SEQ, model_device(composed))


def dynamic_shapes(composed) -> tuple[dict, ...]:
    # Dim.AUTO lets export find which dims are equal (every input shares the batch); min=1 keeps batch 1.
    return composed.signature.dynamic_shapes(Dim.AUTO(min=1))


def export_program(composed) -> torch.export.ExportedProgram:
    """The composition as a torch.export program whose inputs are keywords named by its signature. It runs
    under autocast as the composition does: export's dtype asserts, written again here, go."""
    _check_weights(composed)
    names = composed.signature.names
    program = torch.export.export(composed, (), dict(zip(names, example_inputs(composed))), strict=False,
                                  dynamic_shapes=dict(zip(names, dynamic_shapes(composed))))
    drop_dtype_asserts(program.graph_module)
    return program


def export(composed, path: str | Path, format: str = "pt2", *, overwrite: bool = False) -> Path:
    """Write the artifact to `path`, and `<stem>.py` (its code) and `<stem>.spec.json` beside it. Returns `path`.
    Refuses, before writing anything, to replace an existing file unless `overwrite=True`."""
    path = Path(path)
    return _export(composed, path, format, path.with_name(f"{path.stem}.spec.json"), overwrite)


def _export(composed, path: Path, format: str, spec_path: Path, overwrite: bool,
            flag: str = "overwrite=True") -> Path:
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    code_path = path.with_suffix(".py")
    if code_path == path or path == spec_path:
        raise ExportError(f"{str(path)!r} would be overwritten by its own code listing or spec; name the artifact "
                          f"with its format's suffix (e.g. {path.with_suffix('.' + format).name!r})")
    check_targets([path, code_path, spec_path], overwrite=overwrite, flag=flag)  # before the slow part
    training = composed.training
    composed.eval()  # the artifact is for inference
    try:
        if format == "pt2":
            program = export_program(composed)
            write_with(path, lambda tmp: torch.export.save(program, str(tmp)), overwrite=overwrite, flag=flag)
        else:
            write_folder({path.name: lambda tmp: _export_onnx(composed, tmp)}, path.parent, overwrite=overwrite, flag=flag)
    finally:
        composed.train(training)
    write_text(code_path, f"# The fused graph of a calmgraph composition (spec: {spec_path.name}), as torch.fx wrote it.\n"
                          f"# For reading; the runnable artifact is {path.name}.\n\n{composed.code.lstrip()}",
               overwrite=overwrite, flag=flag)
    write_text(spec_path, composed.recorded_spec().to_json() + "\n", overwrite=overwrite, flag=flag)
    return path


# -- ONNX --------------------------------------------------------------------------------------------
ONNX_NEEDS = ("onnx", "onnxscript")  # to write the file; the [onnx] extra also brings onnxruntime to run it


def require_onnx() -> None:
    from .extras import require
    require("onnx", "ONNX export", ExportError, ONNX_NEEDS)


def _export_onnx(composed, path: Path) -> None:
    require_onnx()
    _check_weights(composed)
    n_bytes = sum(t.numel() * t.element_size() for t in composed.state_dict().values())
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # it warns about every torchvision op it cannot register
    try:
        torch.onnx.export(composed, example_inputs(composed), f=str(path), dynamo=True,
                          dynamic_shapes=dynamic_shapes(composed), input_names=list(composed.input_names),
                          output_names=["logits"], external_data=n_bytes > 1 << 30, verbose=False)
    finally:
        onnx_logger.setLevel(level)
    _name_dims(composed, path)


def _name_dims(composed, path: Path) -> None:
    """Give the dynamic dims readable names (batch, seq, <augment>_seq) instead of export's s24, s70."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    names = {i.name: ("batch", "seq" if i.owner is None else f"{i.owner}_seq")[:len(i.dynamic_dims)]
             for i in composed.signature.inputs}
    rename = {}
    for value in model.graph.input:
        for dim, name in zip(value.type.tensor_type.shape.dim, names.get(value.name, ())):
            if dim.dim_param:
                rename[dim.dim_param] = name
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]
    onnx.save(model, str(path))


def _check_weights(composed) -> None:
    meta = [n for n, t in (*composed.named_parameters(), *composed.named_buffers()) if t.is_meta]
    if meta:
        raise ExportError(f"{len(meta)} weights are on the meta device (e.g. {meta[0]!r}): an artifact holds real "
                          "weights; load them (e.g. model.to_empty(device=...) and a state dict) before exporting")


def bundle_files(out: str | Path, format: str = "pt2") -> list[Path]:
    """The files `write_bundle` writes, in its order."""
    out = Path(out)
    return [out / f"composed.{format}", out / "composed.py", out / "spec.json", out / "composition.png",
            out / "composition.svg", out / "summary.txt"]


def write_bundle(composed, out: str | Path, format: str = "pt2", progress=None, *,
                 overwrite: bool = False, flag: str = "overwrite=True") -> list[Path]:
    """Everything `calmgraph compile` writes into `out`: the artifact (`composed.pt2` or `.onnx`), its code
    (`composed.py`), `spec.json`, the picture (`composition.png`, `.svg`) and `summary.txt`. Refuses, before
    writing anything, to replace any of them unless `overwrite`."""
    from .inspect import draw, mermaid, report
    files = check_targets(bundle_files(out, format), overwrite=overwrite, flag=flag)
    artifact = files[0]
    progress = progress or (lambda message: contextlib.nullcontext())
    with progress(f"exporting {artifact}"):
        _export(composed, artifact, format, files[2], overwrite, flag)
    with progress("drawing the composition"):
        for picture in files[3:5]:
            write_with(picture, lambda tmp: draw(composed, tmp), overwrite=overwrite, flag=flag)
    write_text(files[5], f"{composed.summary()}\n\n{report(composed)}\n\n{mermaid(composed)}\n",
               overwrite=overwrite, flag=flag)
    return files
