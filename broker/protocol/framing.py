"""Length-prefixed framing: a 4-byte big-endian length, then that many bytes of body.

:class:`FrameReader` buffers bytes and yields whole bodies. The declared length
is checked against ``max_frame_size`` as soon as the 4-byte header is in, before
any of the body is kept, so a peer cannot make us buffer more than the limit
whatever length it claims.
"""

from __future__ import annotations

from .errors import ErrorCode, ProtocolError

__all__ = ["DEFAULT_MAX_FRAME_SIZE", "HEADER_SIZE", "FrameReader", "frame"]

HEADER_SIZE = 4
DEFAULT_MAX_FRAME_SIZE = 1024 * 1024


def frame(body: bytes) -> bytes:
    """Return ``body`` with its length prefix."""
    return len(body).to_bytes(HEADER_SIZE, "big") + body


class FrameReader:
    """Incremental frame parser; feed bytes, take bodies."""

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if not 0 < max_frame_size < 2**32:
            raise ValueError("max_frame_size must be between 1 and 2**32 - 1")
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._need: int | None = None  # body length once the header is read
        # a body that came whole in one chunk, ahead of the buffer, not yet taken: kept
        # as a view of that chunk, neither copied into the buffer nor sliced out of it
        self._whole: memoryview | None = None

    @property
    def buffered(self) -> int:
        """Bytes held that have not been taken as bodies yet."""
        whole = self._whole
        return len(self._buffer) + (len(whole) if whole is not None else 0)

    def feed(self, data: bytes) -> None:
        """Add received bytes. Raises ProtocolError when a header declares too much."""
        buffer = self._buffer
        if not buffer and self._need is None and self._whole is None and type(data) is bytes:
            length = int.from_bytes(data[:HEADER_SIZE], "big")  # the usual case: a chunk
            if 0 < length == len(data) - HEADER_SIZE and length <= self.max_frame_size:
                self._whole = memoryview(data)[HEADER_SIZE:]  # that is one whole frame
                return
        buffer += data
        if self._need is None and len(buffer) >= HEADER_SIZE:
            self._read_header()

    def next_body(self) -> bytes | memoryview | None:
        """Return the next whole body, or None if more bytes are needed."""
        whole = self._whole
        if whole is not None:
            self._whole = None
            return whole
        need = self._need
        buffer = self._buffer
        if need is None or len(buffer) < need:
            return None
        if len(buffer) == need:  # the usual case, one whole frame: no slice to copy
            body = bytes(buffer)
            buffer.clear()
        else:
            body = bytes(buffer[:need])
            del buffer[:need]
        self._need = None
        if len(buffer) >= HEADER_SIZE:
            self._read_header()
        return body

    def _read_header(self) -> None:
        """Take the header off the buffer (which holds one), checking its length."""
        length = int.from_bytes(self._buffer[:HEADER_SIZE], "big")
        if length == 0:
            raise ProtocolError("empty frame: every frame carries a message",
                                ErrorCode.INVALID_ARGUMENT)
        if length > self.max_frame_size:
            raise ProtocolError(
                f"frame of {length} bytes is over the limit of {self.max_frame_size} bytes",
                ErrorCode.RESOURCE_EXHAUSTED,
            )
        del self._buffer[:HEADER_SIZE]
        self._need = length
