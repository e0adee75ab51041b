"""A logging filter that masks secret values (kept apart so importing the client
does not import logging)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable

from stigmer.broker.protocol import SECRET_MASK

__all__ = ["SecretFilter"]


class SecretFilter(logging.Filter):
    """Masks given values in every record it sees. Add it to your handlers."""

    def __init__(self, values: Iterable[str]) -> None:
        super().__init__()
        values = {v for v in values if v}
        self._count = len(values)
        # A value with quotes, backslashes or newlines (a PEM key, JSON credentials)
        # reaches a log escaped when it is formatted with %r or json.dumps: mask
        # those spellings too, longest first so that no fragment survives.
        forms = {form for v in values for form in _spellings(v)}
        ordered = sorted(forms, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __repr__(self) -> str:
        return f"SecretFilter({self._count} values)"

    def mask(self, text: str) -> str:
        return self._pattern.sub(SECRET_MASK, text) if self._pattern else text

    def filter(self, record: logging.LogRecord) -> bool:
        if self._pattern is None:
            return True
        record.msg = self.mask(record.getMessage())
        record.args = None
        for name, value in list(vars(record).items()):  # extra={...} fields
            if name not in _RECORD_FIELDS:
                setattr(record, name, self._masked_field(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        if record.stack_info:
            record.stack_info = self.mask(record.stack_info)
        return True

    def _masked_field(self, value: object) -> object:
        if isinstance(value, str):
            return self.mask(value)
        if isinstance(value, int | float | bool | type(None)):
            return value
        # A container or an object: if any of its spellings shows a secret, the
        # field becomes its masked text, since formatters only print it anyway.
        for text in (str(value), repr(value)):
            masked = self.mask(text)
            if masked != text:
                return masked
        return value


def _spellings(value: str) -> set[str]:
    """The value as written, and as ``repr`` and ``json.dumps`` escape it."""
    return {value, repr(value)[1:-1], json.dumps(value)[1:-1],
            json.dumps(value, ensure_ascii=False)[1:-1]} - {""}


# The attributes every LogRecord has; anything else came from ``extra=``.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) \
    | {"message", "asctime", "taskName"}
