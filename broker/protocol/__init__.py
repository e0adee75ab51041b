"""The stigmer-broker wire protocol: everything both sides of the socket share.

Its core is sans-IO: :mod:`.framing`, :mod:`.messages`, :mod:`.connection` and
:mod:`.errors` have no networking code at all and import neither sockets nor an
event loop nor ``os`` (bytes in, messages out, bytes back); the daemon, the
async client and the blocking client each own their socket and drive the same
:class:`Connection`. Beside the core, two small stdlib modules hold the rules
both sides apply to the socket itself: :mod:`.peer` (who is on the other end)
and :mod:`.paths` (where the socket is). This package imports nothing else of
``stigmer.broker``, and ``stigmer.client`` imports nothing but this package.
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
