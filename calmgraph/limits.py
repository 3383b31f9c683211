"""Bounds on what a spec may be, checked before anything else reads it.

A few hundred bytes of YAML can expand, through aliases, to gigabytes (a "billion laughs" bomb); a few
kilobytes of brackets nest deeper than Python's recursion limit. So a spec's text is parsed into shared
objects (PyYAML builds an alias once), then walked once, iteratively, counting every value as often as it
is reached: the walk stops at the first bound it passes, so refusing a bomb costs what the bound costs,
not what the bomb would expand to. Nothing here echoes more than a short prefix of the input.
"""
from __future__ import annotations

import json
import reprlib
from typing import Any

import yaml
from pydantic import BaseModel

from .errors import Problem, SpecError

MAX_TEXT = 1_000_000      # characters of a spec file, and of all strings in a spec once aliases are expanded
MAX_VALUES = 100_000      # values (mappings, lists, scalars) once aliases are expanded
MAX_DEPTH = 32            # nesting of mappings and lists (a spec needs about 8)
MAX_INT = 2**63 - 1       # no number in a spec is larger than an int64
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 4, 4, 2


def short(value: Any) -> str:
    """A repr of `value` that is at most about 100 characters, however large the value (computed lazily)."""
    text = _SHORT.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def load_yaml(text: str) -> Any:
    return _parse(text, yaml.safe_load, yaml.YAMLError, "YAML")


def load_json(text: str) -> Any:
    return _parse(text, json.loads, json.JSONDecodeError, "JSON")


def _parse(text: str, parse, syntax_error: type[Exception], language: str) -> Any:
    """`parse(text)` within the bounds, its every failure one SpecError line (never the text itself)."""
    _check_text(text)
    try:
        return parse(text)
    except syntax_error as e:
        raise SpecError([Problem("", f"not valid {language}: {str(e)[:500]}")]) from None
    except RecursionError:
        raise SpecError([Problem("", f"nested too deeply (a spec nests at most {MAX_DEPTH} levels)")]) from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise SpecError([Problem("", f"not a valid spec: {str(e)[:200]}")]) from None


def _check_text(text: str) -> None:
    if len(text) > MAX_TEXT:
        raise SpecError([Problem("", f"{len(text):,} characters; a spec has at most {MAX_TEXT:,}")])


def check_data(data: Any) -> None:
    """Refuse, with the location of the first excess, data beyond the bounds above or with a mapping key
    that is not a string. Validated spec objects inside `data` are taken as they are."""
    values, chars = 0, 0
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, loc, depth = stack.pop()
        values += 1
        if values > MAX_VALUES:
            _refuse(loc, f"the spec expands to more than {MAX_VALUES:,} values (YAML aliases count once per use)")
        if depth > MAX_DEPTH:
            _refuse(loc, f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, str):
            chars += len(value)
            if chars > MAX_TEXT:
                _refuse(loc, f"the spec's strings expand to more than {MAX_TEXT:,} characters")
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            digits = int(value.bit_length() * 0.30103) + 1  # str() of a huge int is itself refused by Python
            _refuse(loc, f"a number of about {digits:,} digits; no number in a spec is beyond 2**63 - 1")
        elif isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    _refuse(loc, f"key {short(key)} is a {type(key).__name__}; every key of a spec is a string")
                stack.append((item, f"{loc}.{key}" if loc else key, depth + 1))
        elif isinstance(value, (list, tuple)):
            stack.extend((item, f"{loc}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, BaseModel):
            continue


def _refuse(loc: str, msg: str) -> None:
    raise SpecError([Problem(loc[:200], msg)])
