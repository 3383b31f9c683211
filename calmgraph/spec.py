"""The composition spec: which models, which edges, which layer pairs. Pure data (pydantic v2).

A spec is checked in two steps. Here: its shape and its composition graph (names, cycles, reachability),
every problem reported at once with its location. In `compile`: the layer references against the real
models (`resolve.py`), before anything is built.
"""
from __future__ import annotations

import json
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, PlainSerializer, PlainValidator, Strict, Tag,
                      ValidationError, create_model, field_validator, model_validator)

from .errors import Problem, SpecError
from .graph import graph_problems
from .limits import MAX_TEXT, check_data, load_json, load_yaml, short

CHECK_GRAPH = ContextVar("CHECK_GRAPH", default=True)  # off: the shape alone (`validate.py`)
NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_]*$"  # becomes part of attribute and argument names in the graph
NAME_MAX = 64

# Numbers are strict ints (`true` is not 1, `1e20` is not an int) with bounds no real composition reaches:
# a typo of a few digits is an error here, not a 128 GB allocation in `compile`.
MAX_HEADS, MAX_DIM_HEAD, MAX_INNER = 1024, 1024, 65536   # MAX_INNER: heads * dim_head, when both are given
MAX_EVERY, MAX_LAYER, MAX_WINDOW = 100_000, 100_000, 2**31 - 1


def _bounded(le: int, ge: int | None = None):
    return Annotated[int, Strict(), Field(gt=0, le=le) if ge is None else Field(ge=ge, le=le)]


Heads, DimHead, Window, EveryK = _bounded(MAX_HEADS), _bounded(MAX_DIM_HEAD), _bounded(MAX_WINDOW), _bounded(MAX_EVERY)
Seed = _bounded(2**63 - 1, ge=0)
Name = Annotated[str, Field(max_length=100)]    # names and class names: errors echo them
Text = Annotated[str, Field(max_length=1000)]   # paths, module paths, qualified block names



def _layer_ref(value: Any) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("a layer is a block index (an int, negative counts from the end) or a block's "
                         "qualified name (a str)")
    if isinstance(value, int) and abs(value) > MAX_LAYER:
        raise ValueError(f"a block index is between -{MAX_LAYER:,} and {MAX_LAYER:,}")
    if isinstance(value, str) and not 0 < len(value) <= 500:
        raise ValueError("a block's qualified name has 1 to 500 characters")
    return value


LayerRef = Annotated[Union[int, str], PlainValidator(_layer_ref)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, /, **data: Any):  # built alone in Python: its problems as one calmgraph error too
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise spec_error_from(e) from None


class CrossAttentionSpec(_Spec):
    """How each cross-attention block is built. `None` means: derive it from the models."""

    heads: Heads | None = None                # default: the target's head count if known, else dim // 64
    dim_head: DimHead | None = None           # default: dim // heads
    norm: Literal["rms", "layer", "none"] = "rms"   # pre-norm of the target's hidden states
    gate: Literal["zero", "tanh"] = "zero"    # zero: output projection starts at 0; tanh: gate starts at 0
    project_context: bool = True              # f_proj: linear map from source dim to target dim
    positions: Literal["none", "rotary"] = "none"  # rotary: RoPE on Q and K (shared-input augments only)
    window: Window | None = None              # shared augments: position t reads source positions t-window+1..t
    null_kv: bool = False                     # a learned key/value every query may attend to (read nothing)
    writes: Literal["all", "masked"] = "all"  # masked: the block adds only where the call's `write_mask` is 1

    @model_validator(mode="after")
    def _inner_bounded(self):
        _check_inner(self.heads, self.dim_head)
        return self


class _Override(_Spec):
    @model_validator(mode="after")
    def _inner_bounded(self):
        _check_inner(self.heads, self.dim_head)
        return self


# Per-edge override: CrossAttentionSpec's fields (bounds included), each optional; only those given replace
# the spec-wide defaults.
CrossAttentionOverride = create_model(
    "CrossAttentionOverride", __base__=_Override, __doc__="Per-edge override of `CrossAttentionSpec`: only the fields given apply.",
    **{name: (Optional[field.rebuild_annotation()], None) for name, field in CrossAttentionSpec.model_fields.items()})


def _check_inner(heads: int | None, dim_head: int | None) -> None:
    if heads is not None and dim_head is not None and heads * dim_head > MAX_INNER:
        raise ValueError(f"heads * dim_head is {heads * dim_head:,}; at most {MAX_INNER:,}")


class Every(_Spec):
    """The paper's layer choice: source layers k-1, 2k-1, ... paired with target layers spread uniformly."""

    every: EveryK


LayerPair = tuple[LayerRef, LayerRef]  # (source layer, target layer)


def _layers_kind(v: Any) -> str:
    return "every" if isinstance(v, (dict, Every)) else "pairs"


Layers = Annotated[
    Union[Annotated[Every, Tag("every")], Annotated[list[LayerPair], Field(min_length=1), Tag("pairs")]],
    Discriminator(_layers_kind),
]


Dtype = Literal["float32", "bfloat16", "float16", "float64"]  # of a transformers source's weights


class HfSource(_Spec):
    """A transformers model saved with `save_pretrained`, loaded offline (no hub access)."""

    hf: Text                                   # directory; relative paths start at the spec file's folder
    auto_class: Name | None = None             # default: AutoModelForCausalLM, AutoModel for prompt augments
    dtype: Dtype | None = None                 # the weights' dtype; default: transformers' (the checkpoint's)


def _bounded(value: Any) -> Any:
    """Free-form data (a config, a factory's keywords) within the bounds of a spec file, also when the
    source is built in Python rather than read from one (where `CompositionSpec` checks the whole)."""
    try:
        check_data(value)
    except SpecError as e:
        raise ValueError(e.problems[0].msg) from None
    return value


class HfConfigSource(_Spec):
    """A transformers model with random weights, built from a config (tests, examples, dry runs)."""

    hf_config: dict[str, Any]                  # AutoConfig.for_model(**hf_config); needs `model_type`
    auto_class: Name | None = None
    dtype: Dtype | None = None                 # the weights' dtype; default float32
    seed: Seed | None = None                   # seed of the random weights (global RNG left as it was)

    _bounded = field_validator("hf_config", mode="before")(lambda value: _bounded(value))

    @model_validator(mode="after")
    def _has_model_type(self) -> "HfConfigSource":
        if not isinstance(self.hf_config.get("model_type"), str):
            raise ValueError("needs `model_type` (e.g. llama, gpt2, bert) to pick the transformers config class")
        return self


class PythonSource(_Spec):
    """Any factory returning an nn.Module: `package.module:factory` or `path/to/file.py:factory`."""

    python: Text
    kwargs: dict[str, Any] = {}
    seed: Seed | None = None

    _bounded = field_validator("kwargs", mode="before")(lambda value: _bounded(value))

    @field_validator("python")
    @classmethod
    def _module_colon_factory(cls, v: str) -> str:
        module, _, attr = v.partition(":")
        if not module or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", attr):
            raise ValueError("expected 'package.module:factory' or 'path/to/file.py:factory'")
        return v


def _source_kind(v: Any) -> str | None:
    keys = set(v) if isinstance(v, dict) else {type(v).__name__}
    for tag, cls in (("hf_config", HfConfigSource), ("hf", HfSource), ("python", PythonSource)):
        if tag in keys or cls.__name__ in keys:
            return tag
    return None


Source = Annotated[
    Union[Annotated[HfSource, Tag("hf")], Annotated[HfConfigSource, Tag("hf_config")],
          Annotated[PythonSource, Tag("python")]],
    Discriminator(_source_kind, custom_error_type="source_kind",
                  custom_error_message="a source is one of {hf: DIR}, {hf_config: {model_type: ...}} or "
                                       "{python: 'module:factory', kwargs: {...}}"),
]


def _blocks(value: Any) -> str | tuple[str, ...] | Callable | None:
    if value is None or isinstance(value, str) or callable(value):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError("blocks is the qualified name of the ModuleList of blocks, a non-empty list of each "
                     "block's qualified name (blocks not in one list), or in Python a callable model -> [modules]")


def _blocks_out(value: Any) -> Any:
    """A callable has no YAML form: a written spec names it."""
    if callable(value):
        return f"<callable {getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}>"
    return list(value) if isinstance(value, tuple) else value


Blocks = Annotated[Any, PlainValidator(_blocks), PlainSerializer(_blocks_out)]


class ModelSpec(_Spec):
    name: str = Field(pattern=NAME_PATTERN, max_length=NAME_MAX)
    source: Source | None = None               # where the model comes from; models passed to compile win
    blocks: Blocks = None                      # the ModuleList of blocks, or each block; auto if omitted
    tap: Literal["output", "input"] = "output"  # read/modify each block's output or its input

    @property
    def reads(self) -> Literal["ids", "prompt", "pixels"]:
        """What the model is called on: the shared token ids, a token prompt (ids + mask), or images."""
        return "ids"

    @property
    def is_prompt(self) -> bool:
        return self.reads != "ids"


class AnchorSpec(ModelSpec):
    pass


class AugmentSpec(ModelSpec):
    input: Literal["shared", "prompt"] = "shared"  # shared: the anchor's tokens (causal); prompt: its own
    prompt_input: Literal["input_ids", "pixel_values"] = "input_ids"  # a prompt's form: tokens (+ mask) or images

    @property
    def reads(self) -> Literal["ids", "prompt", "pixels"]:
        if self.input == "shared":
            return "ids"
        return "pixels" if self.prompt_input == "pixel_values" else "prompt"


class EdgeSpec(_Spec):
    source: Name
    target: Name
    layers: Layers
    cross_attention: CrossAttentionOverride | None = None


class CompositionSpec(_Spec):
    """An anchor, its augments, and the edges (with layer pairs) through which they feed it."""

    anchor: AnchorSpec
    augments: list[AugmentSpec] = Field(min_length=1)
    edges: list[EdgeSpec] = Field(min_length=1)
    cross_attention: CrossAttentionSpec = CrossAttentionSpec()

    def __init__(self, /, **data: Any):  # every problem, located, as one calmgraph error
        check_data(data)  # bounded first: an alias bomb or deep nesting never reaches pydantic
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise spec_error_from(e) from None

    @model_validator(mode="after")
    def _check_graph(self) -> "CompositionSpec":
        # `validate.py` checks the graph itself, after a repair (CHECK_GRAPH off)
        problems = (graph_problems(self) if CHECK_GRAPH.get() else []) + self._inner_problems()
        if problems:
            raise SpecError(problems)
        return self

    def _inner_problems(self) -> list[Problem]:
        """An edge's heads and dim_head may each be in bounds and their product, with the defaults, not."""
        problems = []
        for i, edge in enumerate(self.edges):
            xattn = self.cross_attention_for(edge)
            try:
                _check_inner(xattn.heads, xattn.dim_head)
            except ValueError as e:
                problems.append(Problem(f"edges[{i}].cross_attention", str(e)))
        return problems

    # -- views --------------------------------------------------------------------------------------
    @property
    def models(self) -> list[ModelSpec]:
        return [self.anchor, *self.augments]

    def model(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)

    @property
    def prompts(self) -> list[AugmentSpec]:
        """The augments that read a prompt of their own (tokens or images), in spec order."""
        return [a for a in self.augments if a.is_prompt]

    def role(self, name: str) -> Literal["anchor", "augment"]:
        return "anchor" if name == self.anchor.name else "augment"

    def cross_attention_for(self, edge: EdgeSpec) -> CrossAttentionSpec:
        if edge.cross_attention is None:
            return self.cross_attention
        return self.cross_attention.model_copy(update=edge.cross_attention.model_dump(exclude_none=True))

    # -- serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_defaults=True)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any) -> "CompositionSpec":
        if not isinstance(data, dict):
            raise SpecError([Problem("", f"a spec is a mapping with keys anchor, augments, edges; got {type(data).__name__}")])
        check_data(data)  # also its keys: `**data` needs strings
        return cls(**data)

    @classmethod
    def from_yaml(cls, text: str) -> "CompositionSpec":
        return cls.from_dict(load_yaml(text))  # bounded: see limits.py

    @classmethod
    def from_json(cls, text: str) -> "CompositionSpec":
        return cls.from_dict(load_json(text))


def load_spec(source: str | Path | dict | CompositionSpec) -> CompositionSpec:
    """A spec from a `.yaml`/`.yml`/`.json` file, a dict, or a spec (returned as is)."""
    if isinstance(source, CompositionSpec):
        return source
    if isinstance(source, dict):
        return CompositionSpec.from_dict(source)
    path = Path(source)
    if not path.is_file():
        raise SpecError([Problem("", f"no spec file at {str(path)!r}")])
    if path.stat().st_size > 4 * MAX_TEXT:  # not read at all: a spec is at most MAX_TEXT characters
        raise SpecError([Problem("", f"{str(path)!r} is {path.stat().st_size:,} bytes; a spec has at most "
                                     f"{MAX_TEXT:,} characters")])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpecError([Problem("", f"{str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})")]) from None
    except OSError as e:
        raise SpecError([Problem("", f"cannot read {str(path)!r}: {e.strerror or e}")]) from None
    if path.suffix.lower() == ".json":
        return CompositionSpec.from_json(text)
    return CompositionSpec.from_yaml(text)


# -- pydantic errors -> located problems -------------------------------------------------------------
_TAGS = {"every", "pairs", "hf", "hf_config", "python"}


def _loc(loc: tuple) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TAGS and i > 0 and loc[i - 1] in ("layers", "source"):
            continue  # the discriminator's tag, not a key the user wrote
        else:
            out += f".{part}" if out else str(part)
    return out


def _join(prefix: str, loc: str) -> str:
    if not prefix or not loc:
        return prefix or loc
    return prefix + loc if loc.startswith("[") else f"{prefix}.{loc}"


def spec_error_from(e: ValidationError) -> SpecError:
    problems = []
    for err in e.errors():
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, SpecError):  # a nested spec or the graph check: located below this error's loc
            prefix = _loc(err["loc"])
            problems.extend(Problem(_join(prefix, p.loc), p.msg) for p in ctx_error.problems)
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; unknown keys are not ignored)"
        elif err["type"] == "missing":
            msg = "required but missing"
        if "input" in err and err["type"] not in ("missing",):
            msg += f" (got {short(err['input'])})"  # never the whole input: it may be huge
        problems.append(Problem(_loc(err["loc"]), msg))
    return SpecError(problems)
