"""The ``stigmer-broker`` command line: a thin layer over the client and the daemon.

:func:`entry` is the console script; :func:`main` runs it on an argv and
returns the exit status.
"""

from .main import entry, main

__all__ = ["entry", "main"]
