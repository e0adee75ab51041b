"""Environments: :class:`Environments` (:mod:`.service`), what the broker does with them,
their versions (:mod:`.history`), and their rows (:mod:`.rows`), every statement on them."""

from .history import Retention
from .service import MAX_ENVIRONMENT_BYTES, EnvironmentRecord, Environments, check_values

__all__ = ["MAX_ENVIRONMENT_BYTES", "EnvironmentRecord", "Environments", "Retention",
           "check_values"]
