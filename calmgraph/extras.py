"""Optional dependencies, grouped as the extras of pyproject.toml: an error for a missing one names the
extra that installs it (`pip install -e ".[onnx]"`)."""
from __future__ import annotations

import importlib

EXTRAS = {
    "onnx": ("onnx", "onnxscript", "onnxruntime"),
    "hf": ("transformers",),
    "train": ("accelerate", "tqdm"),
}


def missing(modules) -> list[str]:
    """The modules of `modules` that cannot be imported."""
    gone = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            gone.append(name)
    return gone


def install_hint(extra: str) -> str:
    return f'install the [{extra}] extra: pip install -e ".[{extra}]" (or pip install {" ".join(EXTRAS[extra])})'


def require(extra: str, what: str, error: type[Exception], modules=None) -> None:
    """Raise `error` naming the extra if any of `modules` (default: the extra's) is not installed."""
    gone = missing(modules or EXTRAS[extra])
    if gone:
        raise error(f"{what} needs {' and '.join(gone)}; {install_hint(extra)}")
