"""`cg.load`: a saved composition rebuilt in one call, as PEFT's `PeftModel.from_pretrained`.

    composed = cg.load("ckpt/")                          # a save_new folder, or a FineTuner step folder
    composed = cg.load("ckpt/step_100.safetensors")      # a save_new file
    composed = cg.load("ckpt/", models={"base": anchor}) # models passed in win over their `source:`

A saved spec records where its models come from as absolute paths (`recorded_spec`): `save_new` and
FineTuner resolve each relative `hf:` folder and `python: file.py:factory` against the folder the spec
was read from (the working directory for a spec given in Python), so a checkpoint loads from any working
directory. The models' files are not copied (an `hf:` folder may hold many GB); moving them breaks the
record, and `cg.load(path, models=...)` then gives them. A path that is still relative in a saved spec
(written by hand, or by an older calmgraph) is resolved against the checkpoint's own folder.
"""
from __future__ import annotations

from pathlib import Path

from .checkpoint import FILE, SPEC_KEY, spec_file
from .errors import CheckpointError, SpecError
from .limits import load_json
from .sources import absolute_sources
from .spec import CompositionSpec


def saved_spec(path: str | Path) -> tuple[CompositionSpec, Path]:
    """The spec a checkpoint was saved with (its safetensors metadata, else the spec file beside it), with
    relative source paths resolved against the checkpoint's folder; and the safetensors file."""
    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / FILE
    if not file.is_file():
        raise CheckpointError(f"no checkpoint at {str(file)!r}; expected a folder or file written by "
                              "composed.save_new or FineTuner")
    text = _metadata_spec(file)
    if text is None:
        beside = spec_file(file)
        if not beside.is_file():
            raise CheckpointError(f"{str(file)!r} records no spec and {beside.name!r} is not beside it: "
                                  "compile the composition with cg.compile and use cg.load_new instead")
        text = beside.read_text()
    try:
        spec = CompositionSpec.from_dict(load_json(text))
    except SpecError as e:
        raise CheckpointError(f"the spec saved with {str(file)!r} is not a valid spec: {e}") from None
    return absolute_sources(spec, file.parent), file


def _metadata_spec(file: Path) -> str | None:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(file), framework="pt") as f:
            return (f.metadata() or {}).get(SPEC_KEY)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{str(file)!r} is not a readable safetensors file: {e}") from None


def load(path: str | Path, models: dict | None = None, *, trust_code: bool = False, prune: bool = True):
    """Rebuild the composition saved at `path` (a `save_new` folder or file, or a FineTuner step folder):
    its spec, its models (from their recorded `source:`, or `models=`), and its trained new parameters.
    `trust_code=True` lets `python:` sources run, as in `cg.compile`. Returns the ComposedModel in eval mode."""
    from .checkpoint import load_new
    from .compiler import compile
    spec, file = saved_spec(path)
    composed = compile(spec, models, trust_code=trust_code, prune=prune)
    return load_new(composed, file).eval()
