"""``python -m stigmer.broker`` is the ``stigmer-broker`` command."""

from .cli import entry

entry()
