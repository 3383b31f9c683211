"""Export: the fused graph -> a portable artifact that needs only torch (`.pt2`) or an ONNX runtime.

    composed.export("out/composed.pt2")                  # torch.export program
    composed.export("out/composed.onnx", format="onnx")  # torch.onnx.export(..., dynamo=True)

Beside the artifact go `composed.py` (the fused graph's code, for reading) and `spec.json` (the spec).
Batch and sequence lengths are dynamic. The artifact takes every input positionally, in the order of
`composed.input_names`: `input_ids`, then each prompt augment's `<name>_input_ids`, then each one's
`<name>_mask`. In the artifact the masks are required (pass `torch.ones_like(ids)` for no padding):
an exported program has a fixed signature, so the optional-mask default of `composed` cannot come along.

    program = torch.export.load("out/composed.pt2").module()
    logits = program(input_ids, notes_input_ids, notes_mask)
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch.export import Dim

from .errors import ExportError
from .tracing.entry import model_device


FORMATS = ("pt2", "onnx")
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8  # prompts are 2 longer: no two dims are unified by accident


def example_inputs(composed) -> tuple[torch.Tensor, ...]:
    return composed.signature.examples(EXAMPLE_BATCH, EXAMPLE_SEQ, model_device(composed))


def dynamic_shapes(composed) -> tuple[dict, ...]:
    # Dim.AUTO lets export find which dims are equal (every input shares the batch); min=1 keeps batch 1.
    return composed.signature.dynamic_shapes(Dim.AUTO(min=1))


def export_program(composed: "ComposedModel") -> torch.export.ExportedProgram:
    _check_weights(composed)
    return torch.export.export(composed, example_inputs(composed), strict=False,
                               dynamic_shapes=dynamic_shapes(composed))


def export(composed: "ComposedModel", path: str | Path, format: str = "pt2") -> Path:
    """Write the artifact to `path`, and `<stem>.py` and `spec.json` beside it. Returns `path`."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    training = composed.training
    composed.eval()  # the artifact is for inference
    try:
        if format == "pt2":
            torch.export.save(export_program(composed), str(path))
        else:
            _export_onnx(composed, path)
    finally:
        composed.train(training)
    path.with_suffix(".py").write_text(
        f"# The fused graph of a calmgraph composition (spec: spec.json), as torch.fx wrote it.\n"
        f"# For reading; the runnable artifact is {path.name}.\n\n{composed.code.lstrip()}")
    (path.parent / "spec.json").write_text(composed.spec.to_json() + "\n")
    return path


# -- ONNX --------------------------------------------------------------------------------------------
ONNX_NEEDS = ("onnx", "onnxscript")  # to write the file; the [onnx] extra also brings onnxruntime to run it


def require_onnx() -> None:
    from .extras import require
    require("onnx", "ONNX export", ExportError, ONNX_NEEDS)


def _export_onnx(composed: "ComposedModel", path: Path) -> None:
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


def _name_dims(composed: "ComposedModel", path: Path) -> None:
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


def _check_weights(composed: "ComposedModel") -> None:
    meta = [n for n, t in (*composed.named_parameters(), *composed.named_buffers()) if t.is_meta]
    if meta:
        raise ExportError(f"{len(meta)} weights are on the meta device (e.g. {meta[0]!r}): an artifact holds real "
                          "weights; load them (e.g. model.to_empty(device=...) and a state dict) before exporting")


def write_bundle(composed: "ComposedModel", out: str | Path, format: str = "pt2", progress=None) -> list[Path]:
    """Everything `calmgraph compile` writes into `out`: the artifact (`composed.pt2` or `.onnx`), its code
    (`composed.py`), `spec.json`, the picture (`composition.png`, `.svg`) and `summary.txt`."""
    from .inspect import draw, mermaid, report
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    progress = progress or (lambda message: contextlib.nullcontext())
    with progress(f"exporting {out / f'composed.{format}'}"):
        artifact = export(composed, out / f"composed.{format}", format)
    with progress("drawing the composition"):
        pictures = [draw(composed, out / "composition.png"), draw(composed, out / "composition.svg")]
    summary = out / "summary.txt"
    summary.write_text(f"{composed.summary()}\n\n{report(composed)}\n\n{mermaid(composed)}\n")
    return [artifact, artifact.with_suffix(".py"), out / "spec.json", *pictures, summary]
