"""Reading what users write by hand: KEY=VALUE pairs, .env files, YAML/JSON manifests.

Pure functions from text to protocol records; every mistake is an InvalidArgument
whose message names the file, the document and the field. Nothing here talks to
the broker or prints.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .protocol import (
    MAX_NAME_LENGTH,
    NAME_PATTERN,
    VAR_NAME_PATTERN,
    EnvironmentSpec,
    SpecEntry,
    Variable,
)
from .protocol.errors import InvalidArgument

__all__ = [
    "API_VERSION", "check_name", "check_var_name", "parse_assignment", "parse_duration",
    "read_env_file", "read_env_spec", "read_environment_manifests",
]

API_VERSION = "ai.stigmer.agentic/v1"
_NAME = re.compile(NAME_PATTERN)
_VAR = re.compile(VAR_NAME_PATTERN)


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a valid environment/execution name; raise otherwise."""
    if not name or len(name) > MAX_NAME_LENGTH or not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"{what} {name!r} is not valid: use letters, digits, '-', '_' and '.', at most "
            f"{MAX_NAME_LENGTH} characters")
    return name


def check_var_name(key: str, where: str = "") -> str:
    """Return ``key`` if it is a valid environment variable name; raise otherwise."""
    if not _VAR.fullmatch(key) or len(key) > 255:
        suffix = f" in {where}" if where else ""
        raise InvalidArgument(
            f"variable name {key!r}{suffix} is not valid: use letters, digits and '_', not "
            "starting with a digit")
    return key


def parse_assignment(text: str, flag: str) -> tuple[str, str]:
    """Split ``KEY=VALUE``; raise naming the flag (never the value) when it is not one."""
    key, sep, value = text.partition("=")
    if not sep:
        raise InvalidArgument(f"{flag} expects KEY=VALUE, got {key!r} without '='")
    return check_var_name(key, flag), value


def read_env_file(path: str) -> dict[str, str]:
    """Return the variables of a .env file (comments, quotes, ``export`` allowed)."""
    from dotenv import dotenv_values

    file = Path(path)
    if not file.is_file():
        raise InvalidArgument(f"--env-file {path}: no such file")
    try:
        raw = dotenv_values(file, interpolate=False)
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"--env-file {path}: cannot be read ({type(exc).__name__})"
                              ) from None
    out: dict[str, str] = {}
    for key, value in raw.items():
        check_var_name(key, f"--env-file {path}")
        if value is None:
            raise InvalidArgument(f"--env-file {path}: {key} has no value (write {key}=...)")
        out[key] = value
    return out


def read_environment_manifests(text: str, source: str) -> list[EnvironmentSpec]:
    """Return every Environment manifest in ``text`` (one or several YAML documents).

    Raises InvalidArgument naming the document and field at the first mistake;
    the caller applies nothing then.
    """
    import yaml

    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InvalidArgument(f"{source}: not valid YAML{where}") from None
    if not documents:
        raise InvalidArgument(f"{source}: no documents found")
    specs = [_environment(doc, f"{source} document {n}") for n, doc in
             enumerate(documents, start=1)]
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise InvalidArgument(f"{source}: environment {spec.name!r} appears twice")
        seen.add(spec.name)
    return specs


def _environment(doc: Any, where: str) -> EnvironmentSpec:
    doc = _mapping(doc, where)
    _only(doc, {"apiVersion", "kind", "metadata", "spec"}, where)
    if doc.get("apiVersion") != API_VERSION:
        raise InvalidArgument(f"{where}: apiVersion must be {API_VERSION!r}, got "
                              f"{doc.get('apiVersion')!r}")
    if doc.get("kind") != "Environment":
        raise InvalidArgument(f"{where}: kind {doc.get('kind')!r} is not supported here "
                              "(only Environment)")
    metadata = _mapping(doc.get("metadata"), f"{where} metadata")
    _only(metadata, {"name", "labels", "annotations", "description"}, f"{where} metadata")
    name = metadata.get("name")
    if not isinstance(name, str):
        raise InvalidArgument(f"{where}: metadata.name is required")
    check_name(name, f"{where}: metadata.name")
    spec = _mapping(doc.get("spec", {}), f"{where} spec")
    _only(spec, {"data", "description"}, f"{where} spec")
    data = _mapping(spec.get("data", {}), f"{where} spec.data")
    variables: dict[str, Variable] = {}
    for key, entry in data.items():
        field = f"{where} spec.data.{key}"
        check_var_name(str(key), where)
        entry = _mapping(entry, field)
        _only(entry, {"value", "is_secret", "description"}, field)
        value = entry.get("value")
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise InvalidArgument(f"{field}.value must be a string")
        is_secret = entry.get("is_secret", False)
        if not isinstance(is_secret, bool):
            raise InvalidArgument(f"{field}.is_secret must be true or false")
        variables[str(key)] = Variable(value=str(value), is_secret=is_secret)
    return EnvironmentSpec(name=name, data=variables)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{where} must be a mapping")
    return value


def _only(mapping: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(map(str, mapping)) - set(allowed))
    if unknown:
        raise InvalidArgument(f"{where}: unknown field {unknown[0]!r}")


_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[dhms])+|\d+(?:\.\d+)?")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([dhms]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
YEAR = 366 * 86400.0


def parse_duration(text: str, flag: str, *, longest: float = YEAR) -> float:
    """Return seconds for ``30s``, ``15m``, ``2h``, ``1d`` or compounds such as ``1h30m``
    (a bare number is seconds)."""
    value = text.strip()
    if not _DURATION.fullmatch(value):
        raise InvalidArgument(f"{flag} {text!r} is not a duration: use e.g. 30s, 15m, 1h30m, 2d")
    seconds = sum(float(n) * _UNITS[unit] for n, unit in _DURATION_PART.findall(value))
    if seconds <= 0:
        raise InvalidArgument(f"{flag} {text!r} is zero, which would end it at once: give a "
                              "positive duration such as 30s")
    if seconds > longest:
        raise InvalidArgument(f"{flag} {text!r} is longer than {longest / 86400:.0f} days")
    return seconds


def read_env_spec(text: str, source: str) -> dict[str, SpecEntry]:
    """Return the env_spec of an Agent/Workflow manifest (``spec.env_spec.data``) or of a
    bare ``{KEY: {value?, is_secret?, description?}}`` map, in YAML or JSON."""
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        raise InvalidArgument(f"--spec {source}: not valid YAML or JSON") from None
    doc = _mapping(doc, f"--spec {source}")
    if "kind" in doc or "spec" in doc:
        kind = doc.get("kind")
        if kind not in ("Agent", "Workflow"):
            raise InvalidArgument(f"--spec {source}: kind {kind!r} has no env_spec "
                                  "(use an Agent or Workflow manifest, or a bare map)")
        spec = _mapping(doc.get("spec", {}), f"--spec {source} spec")
        env_spec = _mapping(spec.get("env_spec", {}), f"--spec {source} spec.env_spec")
        _only(env_spec, {"data", "description"}, f"--spec {source} spec.env_spec")
        data = _mapping(env_spec.get("data", {}), f"--spec {source} spec.env_spec.data")
        where = f"--spec {source} spec.env_spec.data"
    else:
        data, where = doc, f"--spec {source}"
    out: dict[str, SpecEntry] = {}
    for key, entry in data.items():
        check_var_name(str(key), where)
        field = f"{where}.{key}"
        entry = _mapping(entry if entry is not None else {}, field)
        _only(entry, {"value", "is_secret", "description"}, field)
        value = entry.get("value")
        if value is not None and (isinstance(value, bool) or
                                  not isinstance(value, str | int | float)):
            raise InvalidArgument(f"{field}.value must be a string")
        is_secret = entry.get("is_secret", False)
        if not isinstance(is_secret, bool):
            raise InvalidArgument(f"{field}.is_secret must be true or false")
        description = entry.get("description", "")
        out[str(key)] = SpecEntry(value=None if value is None else str(value),
                                  is_secret=is_secret, description=str(description or ""))
    return out
