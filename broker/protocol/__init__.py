"""The stigmer-broker wire protocol, sans-IO: bytes in, messages out, bytes back.

This package has no networking code at all. It imports neither sockets nor an
event loop nor ``os``; the daemon, the async client and the blocking client
each own their socket and drive the same :class:`Connection`.
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
