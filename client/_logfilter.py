"""A logging filter that masks secret values (kept apart so importing the client
does not import logging)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from stigmer.broker.protocol import SECRET_MASK

__all__ = ["SecretFilter"]


class SecretFilter(logging.Filter):
    """Masks given values in every record it sees. Add it to your handlers."""

    def __init__(self, values: Iterable[str]) -> None:
        super().__init__()
        self._values = sorted({v for v in values if v}, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, self._values))) if self._values \
            else None

    def __repr__(self) -> str:
        return f"SecretFilter({len(self._values)} values)"

    def mask(self, text: str) -> str:
        return self._pattern.sub(SECRET_MASK, text) if self._pattern else text

    def filter(self, record: logging.LogRecord) -> bool:
        if self._pattern is None:
            return True
        record.msg = self.mask(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        if record.stack_info:
            record.stack_info = self.mask(record.stack_info)
        return True
