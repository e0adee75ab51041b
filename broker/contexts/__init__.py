"""Execution contexts: the index in memory (:mod:`.index`), their rows (:mod:`.rows`),
and :class:`Contexts`, which drives the one with the other (:mod:`.service`)."""

from .index import NOT_GRANTED, UNAUTHENTICATED, Fetch, Fetched
from .service import Contexts, Created

__all__ = ["NOT_GRANTED", "UNAUTHENTICATED", "Contexts", "Created", "Fetch", "Fetched"]
