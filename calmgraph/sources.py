"""Model sources: build the models a spec names from their `source:`, so a spec file alone is enough.

    source: {hf: path/to/dir}                                a transformers `save_pretrained` folder (offline)
    source: {hf: path/to/dir, dtype: bfloat16}               ... its weights in bfloat16 (or float16, float32, float64)
    source: {hf_config: {model_type: llama, ...}}            a transformers model with random weights
    source: {python: "pkg.module:factory", kwargs: {...}}    any factory returning an nn.Module
    source: {python: "models.py:factory"}                    ... or one defined in a file

Relative paths start at `base_dir` (the CLI passes the spec file's folder). transformers is imported only
when a spec asks for it.

A `python:` source runs code (the module's import and the factory), so it is built only with the caller's
consent: `trust_code=True` (CLI: `--trust-code`), as transformers asks `trust_remote_code=True`. Without it,
nothing is imported and the source is a located `SpecError`. calmgraph's own model factories
(`calmgraph.demo.models:TinyLM`, ...) need no consent; `hf` and `hf_config` sources never run code.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import get_args

import torch
import torch.nn as nn

from .errors import ModelError, Problem, SpecError
from .spec import CompositionSpec, Dtype, HfConfigSource, HfSource, ModelSpec, PythonSource, load_spec


OWN_FACTORIES = "calmgraph.demo.models"  # calmgraph's model factories: built without `trust_code`
TRUST_FLAG = "trust_code=True"  # how the consent is given; the command line says --trust-code


def load_models(spec: CompositionSpec | str | Path | dict, models: dict[str, nn.Module] | None = None, *,
                base_dir: str | Path | None = None, trust_code: bool = False) -> dict[str, nn.Module]:
    """Every model of the spec: the one passed in `models` if any (it wins), else built from its source.
    Models passed that the spec does not name are returned as they are, for `compile` to report.
    `trust_code=True` allows `python:` sources to run (see the module docstring)."""
    if base_dir is None and isinstance(spec, (str, Path)):
        base_dir = Path(spec).parent
    spec = load_spec(spec)
    given = _given(models)
    missing = [m.name for m in spec.models if m.name not in given and m.source is None]
    if missing:
        raise ModelError(f"no model given for {missing}: give each a `source:` in the spec or pass "
                         f"models={{name: nn.Module}} to compile")
    if not trust_code:  # every source that would run code, refused before any is built
        problems = untrusted_sources(spec, skip=given)
        if problems:
            raise SpecError(problems, header="the spec runs code from its sources")
    out = {m.name: given[m.name] if m.name in given else load_model(m, base_dir, trust_code=trust_code)
           for m in spec.models}
    return {**out, **{k: v for k, v in given.items() if k not in out}}


def _given(models) -> dict[str, nn.Module]:
    """`models=` as a dict of name -> model; anything else (a list, a single model) said plainly."""
    if models is None:
        return {}
    if not isinstance(models, Mapping) or not all(isinstance(k, str) for k in models):
        kind = type(models).__name__
        raise ModelError(f"models= is a {kind}; pass a dict of the spec's model names to their nn.Modules, "
                         "e.g. models={'base': anchor, 'kv': augment}")
    return dict(models)


def untrusted_sources(spec: CompositionSpec, skip=(), flag: str = TRUST_FLAG) -> list[Problem]:
    """A located problem for each source that would run code not calmgraph's own (models in `skip` aside)."""
    locs = {spec.anchor.name: "anchor", **{a.name: f"augments[{i}]" for i, a in enumerate(spec.augments)}}
    return [Problem(f"{locs[m.name]}.source.python", _untrusted(m.source, flag)) for m in spec.models
            if m.name not in skip and isinstance(m.source, PythonSource) and not is_own_factory(m.source.python)]


def is_own_factory(python: str) -> bool:
    """Whether `module:factory` names one of calmgraph's own model factories (no consent needed). Only a
    name defined in OWN_FACTORIES counts: `calmgraph.bench:subprocess.run` reaches another module's code."""
    module_name, _, attr = python.partition(":")
    if module_name != OWN_FACTORIES or not attr.isidentifier() or attr.startswith("_"):
        return False
    factory = getattr(importlib.import_module(module_name), attr, None)  # calmgraph's own module: safe to import
    return callable(factory) and getattr(factory, "__module__", None) == module_name


def _untrusted(source: PythonSource, flag: str = TRUST_FLAG) -> str:
    return f"{source.python!r} would import and run Python code; pass {flag} only for a spec you trust"


def load_model(model: ModelSpec, base_dir: str | Path | None = None, *, trust_code: bool = False) -> nn.Module:
    """One model from its source; a `python:` source not calmgraph's own needs `trust_code=True`."""
    source = model.source
    if isinstance(source, PythonSource) and not trust_code and not is_own_factory(source.python):
        raise SpecError([Problem("source.python", _untrusted(source))], header=f"model {model.name!r} runs code")
    where = f"model {model.name!r} (source {describe(source)})"
    prompt = getattr(model, "input", "shared") == "prompt"
    with _seeded(getattr(source, "seed", None)):
        if isinstance(source, HfSource):
            built = _from_pretrained(source, _path(source.hf, base_dir), prompt, where)
        elif isinstance(source, HfConfigSource):
            built = _from_config(source, prompt, where)
        else:
            built = _from_factory(source, base_dir, where)
    if not isinstance(built, nn.Module):
        raise ModelError(f"{where}: the factory returned a {type(built).__name__}, not a torch.nn.Module")
    return built.eval()


def describe(source) -> str:
    if isinstance(source, HfSource):
        return f"hf: {source.hf}"
    if isinstance(source, HfConfigSource):
        return f"hf_config: model_type={source.hf_config['model_type']}"
    return f"python: {source.python}"


# -- transformers ------------------------------------------------------------------------------------
def _transformers(where: str):
    from .extras import require
    require("hf", where, ModelError)
    import transformers
    return transformers


def _auto_class(transformers, name: str | None, prompt: bool, where: str):
    # An anchor or shared augment is a language model; a prompt augment is read as an encoder.
    name = name or ("AutoModel" if prompt else "AutoModelForCausalLM")
    cls = getattr(transformers, name, None)
    if not name.startswith("Auto") or cls is None:
        raise ModelError(f"{where}: auto_class {name!r} is not a transformers Auto class "
                         "(e.g. AutoModelForCausalLM, AutoModel, AutoModelForMaskedLM)")
    return cls


def _from_pretrained(source: HfSource, path: Path, prompt: bool, where: str) -> nn.Module:
    if not path.is_dir():
        raise ModelError(f"{where}: no directory at {str(path)!r}; expected a folder written by save_pretrained")
    if torch.get_default_device().type == "meta":
        # Structure only (validate, inspect, a sharded load): built on the meta device, where transformers
        # refuses from_pretrained.
        return hf_structure(source, path, prompt, where)
    transformers = _transformers(where)
    cls = _auto_class(transformers, source.auto_class, prompt, where)
    try:
        return cls.from_pretrained(str(path), local_files_only=True,  # offline: never touches a hub
                                    trust_remote_code=False,    # and never runs a folder's code
                                    **_dtype(source))
    except Exception as e:  # noqa: BLE001 - transformers raises many types; the user needs the reason
        raise ModelError(f"{where}: could not load it: {_reason(e)}") from e


def hf_structure(source: HfSource | HfConfigSource | None, path: Path, prompt: bool, where: str) -> nn.Module:
    """The model a save_pretrained folder describes, built from its config.json alone: no weight is read
    (they are left as the current device makes them). `source` gives the auto class and dtype, if any."""
    transformers = _transformers(where)
    cls = _auto_class(transformers, getattr(source, "auto_class", None), prompt, where)
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        return cls.from_config(config, trust_remote_code=False, **({} if source is None else _dtype(source)))
    except Exception as e:  # noqa: BLE001 - transformers raises many types; the user needs the reason
        raise ModelError(f"{where}: could not build it from {str(path)!r}: {_reason(e)}") from e


def _from_config(source: HfConfigSource, prompt: bool, where: str) -> nn.Module:
    transformers = _transformers(where)
    cls = _auto_class(transformers, source.auto_class, prompt, where)
    fields = dict(source.hf_config)
    try:
        config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
        return cls.from_config(config, trust_remote_code=False, **_dtype(source))
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{where}: could not build it from the config: {_reason(e)}") from e


def _dtype(source: HfSource | HfConfigSource) -> dict:
    """transformers' keyword for the weights' dtype, where the spec names one."""
    return {} if source.dtype is None else {"dtype": getattr(torch, source.dtype)}


# -- Python factories --------------------------------------------------------------------------------
def _from_factory(source: PythonSource, base_dir: str | Path | None, where: str) -> nn.Module:
    module_name, _, attr = source.python.partition(":")
    if module_name.endswith(".py"):
        module = _module_from_file(_path(module_name, base_dir), where)
    else:
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # noqa: BLE001 - ImportError, or whatever the module raises on import
            raise ModelError(f"{where}: cannot import {module_name!r}: {_reason(e)}") from e
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ModelError(f"{where}: {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ModelError(f"{where}: {attr!r} is a {type(factory).__name__}, not a callable factory")
    try:
        return factory(**source.kwargs)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{where}: the factory raised {_reason(e)}") from e


def _module_from_file(path: Path, where: str):
    if not path.is_file():
        raise ModelError(f"{where}: no Python file at {str(path)!r}")
    # A name unique to the file, registered so that dataclasses and pickling inside it work.
    name = f"_calmgraph_source_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001
        del sys.modules[name]
        raise ModelError(f"{where}: importing {str(path)!r} failed: {_reason(e)}") from e
    return module


# -- helpers -----------------------------------------------------------------------------------------
def _path(path: str, base_dir: str | Path | None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or base_dir is None else Path(base_dir) / p


@contextlib.contextmanager
def _seeded(seed: int | None):
    """Seed the random weights of one model without changing the caller's global RNG."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# -- recorded paths ----------------------------------------------------------------------------------
def absolute_sources(spec: CompositionSpec, base_dir: str | Path) -> CompositionSpec:
    """`spec` with each relative source path (an `hf:` folder, a `python:` file) made absolute under `base_dir`."""
    base = Path(base_dir).expanduser().resolve()
    return _each_source(spec, lambda source: _absolute(source, base))


def cast_sources(spec: CompositionSpec, dtype: torch.dtype) -> CompositionSpec:
    """`spec` with each `hf:` and `hf_config:` source's weights in `dtype`: what a cast composition records, so
    that `cg.load` builds its models in the dtype it was saved in. A `python:` source's factory says its own."""
    name = str(dtype).removeprefix("torch.")
    if name not in get_args(Dtype):
        return spec
    return _each_source(spec, lambda source: source.model_copy(update={"dtype": name})
                        if isinstance(source, (HfSource, HfConfigSource)) and source.dtype != name else source)


def _each_source(spec: CompositionSpec, change) -> CompositionSpec:
    """`spec` with `change(source)` for each model's source (the spec itself where none changes)."""
    models = {"anchor": spec.anchor, **{i: a for i, a in enumerate(spec.augments)}}
    changed = {}
    for key, model in models.items():
        source = change(model.source)
        if source is not model.source:
            changed[key] = model.model_copy(update={"source": source})
    if not changed:
        return spec
    augments = [changed.get(i, a) for i, a in enumerate(spec.augments)]
    return spec.model_copy(update={"anchor": changed.get("anchor", spec.anchor), "augments": augments})


def _absolute(source, base: Path):
    if isinstance(source, HfSource):
        path = Path(source.hf).expanduser()
        return source if path.is_absolute() else source.model_copy(update={"hf": str(base / path)})
    if isinstance(source, PythonSource):
        module, _, attr = source.python.partition(":")
        path = Path(module).expanduser()
        if module.endswith(".py") and not path.is_absolute():
            return source.model_copy(update={"python": f"{base / path}:{attr}"})
    return source
