"""The stigmer-broker wire protocol: the bytes and messages both sides of the socket share.

It is sans-IO: :mod:`.framing`, :mod:`.messages`, :mod:`.connection` and
:mod:`.errors` have no networking code at all and import neither sockets nor an
event loop nor ``os`` (bytes in, messages out, bytes back); the daemon, the
async client and the blocking client each own their socket and drive the same
:class:`Connection`. The rules both sides apply to the socket itself (where it
is, who is on the other end, which directories are trusted) are not the wire:
they live in :mod:`stigmer.broker.local`. This package imports nothing else of
``stigmer.broker``, and ``stigmer.client`` imports nothing of it but this package
and :mod:`~stigmer.broker.local`.
"""

from .connection import CLOSED, NEED_DATA, Connection, Event, Role, State
from .framing import DEFAULT_MAX_FRAME_SIZE, HEADER_SIZE, FrameReader, frame
from .messages import *  # noqa: F403
from .messages import __all__ as _messages_all

__all__ = [
    "CLOSED", "NEED_DATA", "Connection", "Event", "Role", "State",
    "DEFAULT_MAX_FRAME_SIZE", "HEADER_SIZE", "FrameReader", "frame",
    *_messages_all,
]
