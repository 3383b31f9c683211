"""Errors calmgraph raises. Problems with the user's input subclass `ValueError`."""
from __future__ import annotations

from dataclasses import dataclass


class CalmGraphError(Exception):
    """Base of every error calmgraph raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec, at a location such as `edges[1].layers[0]`."""

    loc: str
    msg: str

    def __str__(self) -> str:
        return f"{self.loc}: {self.msg}" if self.loc else self.msg


class SpecError(CalmGraphError, ValueError):
    """The composition spec is invalid. `problems` lists every problem found, each with its location."""

    def __init__(self, problems: list[Problem], header: str = "invalid composition spec"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{header} ({len(self.problems)} problem{'s' * (len(self.problems) != 1)}):\n{lines}")


class LayerRefError(SpecError):
    """A layer reference in the spec does not name a block of its model (found only once models are known)."""

    def __init__(self, problems: list[Problem]):
        super().__init__(problems, header="layer references do not match the models")


class ModelError(CalmGraphError, ValueError):
    """The models passed to `compile` do not fit the spec (missing, wrong type, device or dtype clash)."""


class TraceError(CalmGraphError, ValueError):
    """No front end could turn a model into a torch.fx graph. `model`: its name, where one model is the cause."""

    def __init__(self, *args, model: str | None = None):
        super().__init__(*args)
        self.model = model


class InputError(CalmGraphError, ValueError):
    """A composed model was called with inputs of the wrong name, shape or dtype."""


class ExportError(CalmGraphError, ValueError):
    """A composition cannot be written out as asked (unknown format, weights on the meta device)."""


class CheckpointError(CalmGraphError, ValueError):
    """A checkpoint (of new parameters, or a model's weights loaded by `load_sharded`) does not fit the
    composition it is loaded into."""


class InternalError(CalmGraphError):
    """A bug in calmgraph, not a problem with the user's input (the CLI exits with 3). Please report it."""


class DependencyError(CalmGraphError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


class WriteError(CalmGraphError, ValueError):
    """A file calmgraph was asked to write is in the way (exists, is a symlink) or named twice in one call."""


class ParallelError(CalmGraphError, ValueError):
    """A composition cannot be sharded or checkpointed as asked (no process group, not block-granular)."""


class ConfigError(SpecError):
    """A TrainConfig is invalid. `problems` lists every problem found, each with its field."""

    def __init__(self, problems: list[Problem]):
        super().__init__(problems, header="invalid TrainConfig")
