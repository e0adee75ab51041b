"""Reading what users write by hand: KEY=VALUE pairs, .env files, YAML/JSON manifests.

Pure functions from text to protocol records; every mistake is an InvalidArgument
whose message names the file, the document and the field. Nothing here talks to
the broker or prints.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from .protocol import (
    MAX_NAME_LENGTH,
    NAME_PATTERN,
    VAR_NAME_PATTERN,
    EnvironmentSpec,
    SpecEntry,
    Variable,
)
from .protocol.connection import one_line, split_validation
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
    """Return the variables of a .env file (comments, quotes, ``export`` allowed).

    All or nothing: a line that is not ``KEY=VALUE``, a key without a value or a
    key given twice refuses the whole file, naming the line by its number only: a
    malformed line may be a secret pasted on its own, and errors reach CI logs.
    """
    from dotenv.parser import parse_stream

    flag = f"--env-file {path}"
    file = Path(path)
    if file.is_dir():
        raise InvalidArgument(f"{flag}: is a directory; give a .env file")
    try:
        with file.open(encoding="utf-8") as stream:
            bindings = list(parse_stream(stream))
    except FileNotFoundError:
        raise InvalidArgument(f"{flag}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise InvalidArgument(f"{flag}: cannot be read ({reason})") from None
    out: dict[str, str] = {}
    lines: dict[str, int] = {}
    for binding in bindings:
        line = binding.original.line
        if binding.error:
            raise InvalidArgument(f"{flag}: line {line} is not KEY=VALUE; nothing was "
                                  "imported (fix or remove that line)")
        key = binding.key
        if key is None:  # a comment or a blank line
            continue
        if binding.value is None:
            raise InvalidArgument(f"{flag}: line {line} has no '=' (write KEY=VALUE); "
                                  "nothing was imported")
        if not _VAR.fullmatch(key) or len(key) > 255:
            raise InvalidArgument(f"{flag}: line {line} has no valid variable name before "
                                  "'=' (letters, digits and '_', not starting with a digit); "
                                  "nothing was imported")
        if key in out:
            raise InvalidArgument(f"{flag}: line {line} sets {key} again (first set on line "
                                  f"{lines[key]}); keep one")
        out[key], lines[key] = binding.value, line
    return out


class _Entry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    value: str
    is_secret: bool = False
    description: str = ""


class _Data(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Entries stay raw here and are converted one by one, so that an error can
    # name the key (msgspec spells a dict key's path as "[...]").
    data: dict[str, Any] = {}
    description: str = ""


class _Metadata(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    description: str = ""


class _EnvironmentManifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True,
                           rename={"api_version": "apiVersion"}):
    api_version: str
    kind: str
    metadata: _Metadata
    spec: _Data = _Data()


class _SpecEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    value: str | None = None  # none: the key is required
    is_secret: bool = False
    description: str = ""


class _Workflow(msgspec.Struct, frozen=True):
    """An Agent or Workflow manifest: only ``spec.env_spec`` matters here."""

    kind: str
    spec: dict[str, Any] = {}


def read_environment_manifests(text: str, source: str) -> list[EnvironmentSpec]:
    """Return every Environment manifest in ``text`` (one or several YAML documents).

    Raises InvalidArgument naming the document and field at the first mistake;
    the caller applies nothing then.
    """
    documents = [d for d in _load_yaml(text, source, every=True) if d is not None]
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
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{where} must be a mapping")
    if doc.get("apiVersion") != API_VERSION:
        raise InvalidArgument(f"{where}: apiVersion must be {API_VERSION!r}, got "
                              f"{doc.get('apiVersion')!r}")
    if doc.get("kind") != "Environment":
        raise InvalidArgument(f"{where}: kind {doc.get('kind')!r} is not supported here "
                              "(only Environment)")
    manifest = _convert(doc, _EnvironmentManifest, where, "")
    check_name(manifest.metadata.name, f"{where}: metadata.name")
    variables: dict[str, Variable] = {}
    for key, raw in manifest.spec.data.items():
        check_var_name(key, where)
        entry = _convert(raw, _Entry, where, f"spec.data.{key}")
        variables[key] = Variable(value=entry.value, is_secret=entry.is_secret)
    return EnvironmentSpec(name=manifest.metadata.name, data=variables)


_T = TypeVar("_T")


def _convert(raw: Any, into: type[_T], where: str, path: str) -> _T:
    """``msgspec.convert`` with its error told in the manifest's own terms."""
    try:
        return msgspec.convert(raw, into, strict=True)
    except msgspec.ValidationError as exc:
        # one_line: a key quoted in the error may hold a newline or an escape sequence
        raise InvalidArgument(f"{where}: {_explain(one_line(str(exc)), path)}") from None


def _explain(error: str, base: str) -> str:
    """Turn ``Expected `str`, got `int` - at `$.spec.data[...].value``` into
    ``spec.data.PORT.value must be a string: quote it``."""
    what, at, inside = split_validation(error)

    def field(path: str | None) -> str:
        return ".".join(p for p in (base, path) if p) or "the document"

    if at == "key" and inside:
        return f"the keys of {field(inside)} must be strings"
    name = field(at)
    if found := re.fullmatch(r"Object contains unknown field `(.*)`", what):
        return f"unknown field '{found[1]}'" + (f" in {name}" if name != "the document" else "")
    if found := re.fullmatch(r"Object missing required field `(.*)`", what):
        parent = "" if name == "the document" else name + "."
        return f"{parent}{found[1]} is required"
    if found := re.fullmatch(r"Expected `(.*?)`, got `(.*)`", what):
        expected, got = found[1], found[2]
        if expected.startswith("str"):
            return (f"{name} must be a string, not {got}: quote it (YAML reads true, false and "
                    "null as other types)")
        if expected == "bool":
            return f"{name} must be true or false, not {got}"
        if expected == "object":
            return f"{name} must be a mapping, not {got}"
        return f"{name} must be {expected}, not {got}"
    return f"{name}: {what.replace('`', chr(39))}"


def _load_yaml(text: str, source: str, *, every: bool) -> list[Any]:
    """Parse YAML as written: every scalar is a string except true/false and null, so
    01234, 12:30, 0x1F and 1.10 stay what they look like; a duplicate key or an alias
    is an error naming its line."""
    import yaml

    loader = _strict_loader()(text)
    try:
        if every:
            return list(iter(loader.get_data, None)) if loader.check_data() else []
        return [loader.get_single_data()]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        reason = f": {problem}" if problem else ""
        raise InvalidArgument(f"{source}: not valid YAML{where}{reason}") from None
    finally:
        loader.dispose()


@functools.cache
def _strict_loader() -> type[Any]:
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                raise yaml.composer.ComposerError(
                    None, None, "aliases (*name) are not allowed here: write the value out",
                    self.peek_event().start_mark)  # type: ignore[no-untyped-call]
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[object] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, Hashable) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    StrictLoader.yaml_implicit_resolvers = {}  # none of SafeLoader's, then only these two
    StrictLoader.add_implicit_resolver(
        "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
        list("tTfF"))
    StrictLoader.add_implicit_resolver(
        "tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""])
    return StrictLoader


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
    where = f"--spec {source}"
    doc = _load_yaml(text, where, every=False)[0]
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{where} must be a mapping")
    if "kind" in doc or "spec" in doc:
        kind = doc.get("kind")
        if kind not in ("Agent", "Workflow"):
            raise InvalidArgument(f"{where}: kind {kind!r} has no env_spec "
                                  "(use an Agent or Workflow manifest, or a bare map)")
        spec = _convert(doc, _Workflow, where, "").spec
        env_spec = _convert(spec.get("env_spec", {}), _Data, where, "spec.env_spec")
        data, path = env_spec.data, "spec.env_spec.data"
    else:
        data, path = doc, ""
    out: dict[str, SpecEntry] = {}
    for key, raw in _convert(data, dict[str, Any], where, path).items():
        check_var_name(key, where)
        entry = _convert({} if raw is None else raw, _SpecEntry, where,
                         f"{path}.{key}" if path else key)
        out[key] = SpecEntry(value=entry.value, is_secret=entry.is_secret,
                             description=entry.description)
    return out
