"""`calmgraph demo`: compile the bundled composition, check it against the anchor, print what was built."""
from __future__ import annotations

import importlib.resources
import time

import torch

from ..compiler import compile
from ..spec import load_spec
from .models import demo_models


def demo_spec_path():
    return importlib.resources.files("calmgraph.demo").joinpath("demo.yaml")


def run_demo(seed: int = 0, print_code: bool = False, out=None, progress=None, overwrite: bool = False) -> bool:
    """Returns whether the composition computes exactly the anchor at initialisation. With `out`, also
    writes what `calmgraph compile` writes (composed.pt2, composed.py, spec.json, picture, summary) there."""
    with importlib.resources.as_file(demo_spec_path()) as path:
        spec = load_spec(path)
    models = demo_models(seed)
    print(f"calmgraph demo: anchor {spec.anchor.name!r} + augments {[a.name for a in spec.augments]} from {path.name}\n")
    composed = compile(spec, models=models)
    print(composed.summary())

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (2, 16), generator=g)
    notes = torch.randint(0, 96, (2, 10), generator=g)
    notes_mask = torch.ones_like(notes)
    notes_mask[1, 6:] = 0  # second prompt is shorter: padded
    with torch.no_grad():
        composed(ids, notes, notes_mask)  # warm-up: the first call pays for lazy initialisation
        started = time.perf_counter()
        fused = composed(ids, notes, notes_mask)
        seconds = time.perf_counter() - started
        anchor = models["base"](ids)
    same = torch.equal(fused, anchor)
    print(f"\nidentity at init: fused output {'==' if same else '!='} anchor output "
          f"(torch.equal, shape {tuple(fused.shape)}, forward {1e3 * seconds:.1f} ms)")
    if print_code:
        print(composed.code)
    if out is not None:
        from ..export import write_bundle
        written = write_bundle(composed, out, progress=progress, overwrite=overwrite, flag="--overwrite")
        print(f"\nwrote {', '.join(str(p) for p in written)}")
    return same
