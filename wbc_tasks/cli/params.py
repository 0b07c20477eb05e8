"""``--param NAME=VALUE`` on the ``wbc`` command line, read by the same table as the trigger form.

Owns turning each text value into the type its param declares (the JSON-schema ``type`` of
:mod:`wbc_tasks.pipelines.params`): a string stays text (``model=2`` is the string ``"2"``), an
integer, number or boolean is parsed, an empty value (or ``null``) is none where the param allows
it, and the result is checked against the param's enum and bounds as the form checks it. A value
that does not fit, or an unknown name, is one :class:`ParamInputError` line naming the param and
what it accepts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from jsonschema import Draft202012Validator

#: The keys of a param's spec that only the trigger form shows (not part of its schema).
_FORM_ONLY = ("default", "description", "title")
#: JSON-schema bounds in words.
_BOUNDS = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


class ParamInputError(ValueError):
    """A ``--param`` the table refuses: its message is the one line the user sees."""


def parse_params(pairs: Iterable[str], specs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``NAME=VALUE`` strings as a params mapping, each value converted by its declared type."""
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep:
            raise ParamInputError(f"--param {pair!r}: expected NAME=VALUE")
        if name not in specs:
            raise ParamInputError(f"--param {pair}: unknown param {name!r}; known: {', '.join(sorted(specs))}")
        params[name] = convert_param(name, text, specs[name])
    return params


def convert_param(name: str, text: str, spec: Mapping[str, Any]) -> Any:
    """``text`` as the value of param ``name``, or :class:`ParamInputError` saying what it accepts."""
    value = _typed(text, _types(spec))
    schema = {key: rule for key, rule in spec.items() if key not in _FORM_ONLY}
    if value is _UNPARSED or any(True for _ in Draft202012Validator(schema).iter_errors(value)):
        raise ParamInputError(f"--param {name}={text}: {name} accepts {describe_accepted(spec)}")
    return value


def describe_accepted(spec: Mapping[str, Any]) -> str:
    """What a param accepts, in words: ``one of a, b``, ``an integer >= 0 and <= 500``, ..."""
    types = _types(spec)
    if "enum" in spec:
        accepted = "one of " + ", ".join(str(choice) for choice in spec["enum"] if choice is not None)
    else:
        kinds = {"string": "any text", "integer": "an integer", "number": "a number", "boolean": "true or false"}
        accepted = " or ".join(kinds.get(kind, kind) for kind in types if kind != "null") or "any text"
        bounds = [f"{symbol} {spec[key]}" for key, symbol in _BOUNDS.items() if key in spec]
        if bounds:
            accepted += " " + " and ".join(bounds)
    return accepted + (" (empty: none)" if "null" in types else "")


class _Unparsed:
    """The text fits none of the declared types."""


_UNPARSED = _Unparsed()


def _types(spec: Mapping[str, Any]) -> list[str]:
    declared = spec.get("type", "string")
    return [declared] if isinstance(declared, str) else list(declared)


def _typed(text: str, types: list[str]) -> Any:
    """``text`` as the first declared type it parses as (none for an empty value if allowed)."""
    if "null" in types and text.strip().lower() in ("", "null"):
        return None
    for kind in types:
        value = _parse(text, kind)
        if value is not _UNPARSED:
            return value
    return _UNPARSED


def _parse(text: str, kind: str) -> Any:
    stripped = text.strip()
    if kind == "string":
        return text
    if kind == "boolean":
        word = stripped.lower()
        return True if word in _TRUE else False if word in _FALSE else _UNPARSED
    try:
        if kind == "integer":
            return int(stripped)
        if kind == "number":
            number = float(stripped)
            return number if math.isfinite(number) else _UNPARSED
    except ValueError:
        return _UNPARSED
    return _UNPARSED
