"""ExecutionContext: one execution's variables, in memory, with secrets kept out of sight.

It is a read-only mapping of key to value. ``repr``/``str`` show the keys and
mask secret values, :meth:`resolve` fills ``${VAR}`` placeholders in config
structures, and :meth:`log_filter` keeps secret values out of log records.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

from stigmer.broker.protocol import SECRET_MASK, Variable
from stigmer.broker.protocol.errors import InvalidArgument

if TYPE_CHECKING:
    from ._logfilter import SecretFilter

__all__ = ["ExecutionContext", "PlaceholderError"]

_PLACEHOLDER = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class PlaceholderError(InvalidArgument):
    """``resolve`` met placeholders it cannot fill; the message lists every one."""


class ExecutionContext(Mapping[str, str]):
    """The merged variables of one execution (``ctx["KEY"]``, ``in``, ``len``, iteration)."""

    __slots__ = ("_variables", "execution_id", "expires_at")

    def __init__(self, execution_id: str, expires_at: float,
                 variables: Mapping[str, Variable]) -> None:
        self.execution_id = execution_id
        self.expires_at = expires_at
        # Kept as given (a copy of the map, the Variables themselves are immutable), not
        # split into values and secret keys: every fetch builds one, and most read a few
        # keys of it, so each method asks the Variables instead.
        self._variables = dict(variables)

    def __getitem__(self, key: str) -> str:
        return self._variables[key].value

    def __iter__(self) -> Iterator[str]:
        return iter(self._variables)

    def __len__(self) -> int:
        return len(self._variables)

    def __contains__(self, key: object) -> bool:
        return key in self._variables

    def __repr__(self) -> str:
        shown = ", ".join(f"{k!r}: '{SECRET_MASK}'" if v.is_secret else f"{k!r}: {v.value!r}"
                          for k, v in self._variables.items())
        return f"ExecutionContext(execution_id={self.execution_id!r}, {{{shown}}})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        # A pickle is plaintext on disk or on a queue: pass the execution id instead.
        raise TypeError("ExecutionContext holds secret values and cannot be pickled; keep it "
                        "in memory, or pass its execution id and fetch it where it is needed")

    def __copy__(self) -> ExecutionContext:
        return self  # read-only

    def __deepcopy__(self, memo: object) -> ExecutionContext:
        return self

    def is_secret(self, key: str) -> bool:
        """Return whether ``key`` holds a secret. Raises KeyError for an unknown key."""
        return self._variables[key].is_secret

    def as_env(self) -> dict[str, str]:
        """Return the variables as a fresh dict, ready to merge into ``os.environ``."""
        return {key: variable.value for key, variable in self._variables.items()}

    def secret_values(self) -> frozenset[str]:
        """Return the secret values (for masking); empty values are left out."""
        return frozenset(v.value for v in self._variables.values() if v.is_secret and v.value)

    # ------------------------------------------------------------- placeholders

    def resolve(self, obj: Any) -> Any:
        """Return a copy of a str/dict/list structure with placeholders filled.

        ``${VAR}`` is any variable, ``${.secrets.VAR}`` must be a secret, ``$${``
        is a literal ``${``. Raises PlaceholderError listing every problem.
        """
        problems: list[str] = []
        result = self._resolve(obj, problems)
        if problems:
            unique = list(dict.fromkeys(problems))
            raise PlaceholderError("cannot resolve placeholders: " + "; ".join(unique))
        return result

    def _resolve(self, obj: Any, problems: list[str]) -> Any:
        if isinstance(obj, str):
            return _PLACEHOLDER.sub(lambda m: self._fill(m, problems), obj)
        if isinstance(obj, Mapping):
            return {k: self._resolve(v, problems) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return type(obj)(self._resolve(v, problems) for v in obj)
        return obj

    def _fill(self, match: re.Match[str], problems: list[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        body = match.group(1)
        want_secret = body.startswith(".secrets.")
        name = body[len(".secrets."):] if want_secret else body
        if not _NAME.fullmatch(name):
            problems.append(f"malformed placeholder ${{{body}}}")
            return match.group(0)
        variable = self._variables.get(name)
        if variable is None:
            problems.append(f"{name} is not set")
            return match.group(0)
        if want_secret and not variable.is_secret:
            problems.append(f"{name} is not a secret (use ${{{name}}})")
            return match.group(0)
        return variable.value

    # ------------------------------------------------------------------ logging

    def log_filter(self, *, also: Iterable[str] = ()) -> SecretFilter:
        """Return a logging filter masking this context's secrets (and ``also``, e.g. the token)."""
        from ._logfilter import SecretFilter

        return SecretFilter([*self.secret_values(), *also])
