"""The connection state machine, shared by the broker and every client.

Theory of operation (after h11): a :class:`Connection` never touches a socket.
The caller feeds it received bytes with :meth:`receive_data`, pulls decoded
messages with :meth:`next_event` (``NEED_DATA`` when it needs more bytes,
``CLOSED`` once the peer has closed) and turns outgoing messages into bytes with
:meth:`send`. The async server, the async client and the blocking client all
drive this same object, so the rules live here once.

Rules are a table, ``_TRANSITIONS[(role, state, input)] -> next state``; an input
the table does not list for the current state is a protocol error that names
both. Breaking the framing, or a body that does not say which request it is (no
known ``op``) or how to answer it (no valid ``id``), moves the connection to the
sticky ``ERROR`` state: every later call raises, and the owner should send the
error frame it was given and close. A request that names itself and its id but
breaks the schema (an unknown field, a wrong type, a value out of bounds) raises
:class:`InvalidArgument` with that id and leaves the connection usable.

The handshake is enforced on the server side: a request before ``Hello``
raises :class:`HandshakeRequired` and a ``Hello`` for an unknown version raises
:class:`UnsupportedVersion`; both leave the connection usable so the client can
retry. Those errors carry the request id, and the server answers them with
``error_reply``.
"""

from __future__ import annotations

import enum
import functools
import re
from typing import Any, Final

import msgspec

from .errors import (
    BrokerError,
    HandshakeRequired,
    InvalidArgument,
    ProtocolError,
    ResourceExhausted,
    UnsupportedVersion,
)
from .framing import DEFAULT_MAX_FRAME_SIZE, HEADER_SIZE, FrameReader
from .messages import (
    SUPPORTED_VERSIONS,
    AnyRequest,
    AnyResponse,
    Error,
    Hello,
    Request,
    Response,
    Welcome,
)

__all__ = ["CLOSED", "NEED_DATA", "Connection", "Event", "Role", "State"]


class _Singleton(enum.Enum):
    """Members hash by identity, as they compare: the transition table is looked up for
    every message, and Enum's own hash (of the member's name) is a Python call."""

    __hash__ = object.__hash__


class Role(_Singleton):
    CLIENT = "client"
    SERVER = "server"


class State(_Singleton):
    AWAIT_HELLO = "await_hello"  # nothing agreed yet
    READY = "ready"  # handshake done, requests flow
    CLOSED = "closed"  # peer closed cleanly
    ERROR = "error"  # protocol broken; sticky


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"


NEED_DATA: Final = _Sentinel.NEED_DATA
CLOSED: Final = _Sentinel.CLOSED


class _Input(_Singleton):
    HELLO = "Hello"
    WELCOME = "Welcome"
    REQUEST = "a request"
    RESPONSE = "a response"
    EOF = "end of stream"


_S, _C = Role.SERVER, Role.CLIENT
_TRANSITIONS: Final[dict[tuple[Role, State, _Input], State]] = {
    # server receiving
    (_S, State.AWAIT_HELLO, _Input.HELLO): State.READY,
    (_S, State.READY, _Input.REQUEST): State.READY,
    (_S, State.AWAIT_HELLO, _Input.EOF): State.CLOSED,
    (_S, State.READY, _Input.EOF): State.CLOSED,
    # client receiving
    (_C, State.AWAIT_HELLO, _Input.WELCOME): State.READY,
    (_C, State.READY, _Input.RESPONSE): State.READY,
    (_C, State.AWAIT_HELLO, _Input.EOF): State.CLOSED,
    (_C, State.READY, _Input.EOF): State.CLOSED,
}


class _IdOnly(msgspec.Struct):
    """Lenient view of a body, used only to find the id of a request we reject."""

    id: int | None = None


_ID_DECODER: Final = msgspec.msgpack.Decoder(_IdOnly)
_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODERS: dict[Role, msgspec.msgpack.Decoder[Any]] = {}


def _decoder(role: Role) -> msgspec.msgpack.Decoder[Any]:
    """The decoder for what ``role`` receives, built once, on first use (a client never
    pays for the request decoder)."""
    decoder = _DECODERS.get(role)
    if decoder is None:
        decoder = msgspec.msgpack.Decoder(AnyRequest if role is Role.SERVER else AnyResponse)
        _DECODERS[role] = decoder
    return decoder

Event = Request | Response | _Sentinel


class Connection:
    """One end of a broker connection, as a state machine over bytes."""

    def __init__(self, role: Role, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 supported_versions: tuple[int, ...] = SUPPORTED_VERSIONS) -> None:
        self.role = role
        self.state = State.AWAIT_HELLO
        self.supported_versions = supported_versions
        self.version: int | None = None
        self._reader = FrameReader(max_frame_size)
        self._eof = False
        self._error: ProtocolError | None = None
        self._decoder = _decoder(role)
        self._transitions = {(state, event): then for (side, state, event), then
                             in _TRANSITIONS.items() if side is role}

    # ------------------------------------------------------------------ receiving

    @property
    def buffered(self) -> int:
        """Bytes received that do not make a whole frame yet (for read timeouts)."""
        return self._reader.buffered

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the peer; ``b""`` means the peer closed.

        Raises ProtocolError (and enters ERROR) when a frame header is over the limit.
        """
        if self.state is State.ERROR:
            raise self._broken()
        if not data:
            self._eof = True
            return
        try:
            self._reader.feed(data)
        except ProtocolError as exc:
            raise self._fail(exc) from None

    def next_event(self) -> Event:
        """Return the next message, ``NEED_DATA`` or ``CLOSED``.

        Raises ProtocolError (sticky) for broken framing or schema, and on the
        server HandshakeRequired / UnsupportedVersion (not sticky) for requests
        the handshake does not allow yet.
        """
        state = self.state
        if state is not State.READY:
            if state is State.ERROR:
                raise self._broken()
            if state is State.CLOSED:
                return CLOSED
        try:
            body = self._reader.next_body()
        except ProtocolError as exc:
            raise self._fail(exc) from None
        if body is None:
            if not self._eof:
                return NEED_DATA
            if self._reader.buffered:
                raise self._fail(ProtocolError(
                    f"connection closed in the middle of a frame "
                    f"({self._reader.buffered} bytes buffered)"))
            self._advance(_Input.EOF)
            return CLOSED
        try:
            message: Request | Response = self._decoder.decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise self._undecodable(body, exc) from None
        if isinstance(message, Request):
            self._on_request(message)
        else:
            self._on_response(message)
        return message

    def _undecodable(self, body: bytes | memoryview, exc: Exception) -> BrokerError:
        """The error to raise for a body that did not decode (``exc``, msgspec's or
        Python's): an InvalidArgument the connection survives, for a request it can
        name and answer; else a sticky ProtocolError."""
        if isinstance(exc, msgspec.ValidationError):
            # msgspec quotes the peer's own field names and tag values, control
            # characters and all: escaped, so that what is told stays on one line
            error = one_line(str(exc))
            request_id = _request_id(body)
            if self.role is not Role.SERVER or request_id is None or "`$.op`" in error \
                    or error == "Object missing required field `op`":
                # not a request we know, or no id to answer it by: the stream cannot go on
                told = explain_invalid(error) if self.role is Role.SERVER else error
                return self._fail(ProtocolError(f"malformed message: {told}",
                                                request_id=request_id or 0))
            # A request we can name and answer, with a field out of bounds: the peer's
            # mistake, told in its own field names; the connection stays usable.
            invalid = InvalidArgument(explain_invalid(error))
            invalid.request_id = request_id
            return invalid
        # every way bytes can fail to be a message is one answer: an Error frame
        reason = (one_line(str(exc)) if isinstance(exc, msgspec.DecodeError)
                  else "a string is not valid UTF-8" if isinstance(exc, UnicodeDecodeError)
                  else "it is nested too deeply")
        return self._fail(ProtocolError(f"malformed message: {reason}",
                                        request_id=_request_id(body) or 0))

    def _on_request(self, request: Request) -> None:
        if isinstance(request, Hello):
            if self.state is State.READY:
                again = InvalidArgument("Hello was already exchanged on this connection")
                again.request_id = request.id
                raise again
            if request.version not in self.supported_versions:
                err = UnsupportedVersion(
                    f"protocol version {request.version} is not supported; this broker "
                    f"speaks {', '.join(map(str, self.supported_versions))}",
                    self.supported_versions,
                )
                err.request_id = request.id
                raise err
            self.version = request.version
            self._advance(_Input.HELLO)
        elif self.state is State.AWAIT_HELLO:
            err2 = HandshakeRequired("send Hello with the protocol version before any request")
            err2.request_id = request.id
            raise err2
        else:
            self._advance(_Input.REQUEST)

    def _on_response(self, response: Response) -> None:
        if type(response) is Welcome:
            if response.version not in self.supported_versions:
                raise self._fail(ProtocolError(
                    f"broker agreed to protocol version {response.version}, "
                    "which this client does not speak"))
            self.version = response.version
            self._advance(_Input.WELCOME)
        elif self.state is State.READY:
            self._advance(_Input.RESPONSE)
        elif not isinstance(response, Error):  # still awaiting Welcome
            raise self._fail(ProtocolError(
                f"broker sent {type(response).__name__} before Welcome"))

    # -------------------------------------------------------------------- sending

    def send(self, message: Request | Response) -> bytes:
        """Return the frame for ``message``, length prefix included.

        Raises ResourceExhausted (changing nothing) when the message is over the
        frame limit, which the peer would refuse, and InvalidArgument (without the
        text) when it holds a string that cannot be encoded.
        """
        if self.state is State.ERROR and not isinstance(message, Error):
            raise self._error or ProtocolError("connection is in the ERROR state")
        try:
            body = _ENCODER.encode(message)  # and a copy after the prefix: cheaper than
            unencodable = False  # encode_into a buffer past it, which grows it in steps
        except UnicodeEncodeError:  # its .object holds the whole value: it must not survive
            unencodable = True
        if unencodable:  # raised outside the handler, so not even __context__ keeps it
            raise InvalidArgument(
                f"{type(message).__name__} holds text that is not valid Unicode (a lone "
                "surrogate, as from undecodable bytes); give values as UTF-8 text")
        size = len(body)
        if size > self._reader.max_frame_size:
            raise ResourceExhausted(
                f"{type(message).__name__} would be {size} bytes, over the frame limit of "
                f"{self._reader.max_frame_size} bytes; send less at once")
        return size.to_bytes(HEADER_SIZE, "big") + body

    # -------------------------------------------------------------------- helpers

    def _advance(self, event: _Input) -> None:
        try:
            self.state = self._transitions[self.state, event]
        except KeyError:
            raise self._fail(ProtocolError(
                f"{self.role.value} cannot receive {event.value} in state "
                f"{self.state.value}")) from None

    def _fail(self, exc: ProtocolError) -> ProtocolError:
        self.state = State.ERROR
        self._error = exc
        return exc

    def _broken(self) -> ProtocolError:
        """The error that broke the connection, raised by every later call."""
        return self._error or ProtocolError("connection is in the ERROR state")



def _request_id(body: bytes | memoryview) -> int | None:
    """The id of a message that did not decode, so that the Error frame answers it (None
    when the body is not a map with a valid ``id``)."""
    try:
        request_id = _ID_DECODER.decode(body).id
    except (msgspec.DecodeError, OverflowError, UnicodeDecodeError, RecursionError):
        return None
    return request_id if request_id is not None and 0 <= request_id < 2**63 else None


# C0 and C1 controls, DEL and the Unicode line and paragraph separators, but not the
# space: each becomes a visible escape
_ESCAPES: Final = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t",
                 0x2028: "\\u2028", 0x2029: "\\u2029"})


def one_line(text: str) -> str:
    """``text`` with every control character escaped (``\\n``, ``\\x1b``): what a peer or
    a file named can neither break a message into lines nor drive a terminal."""
    return text.translate(_ESCAPES)


@functools.cache
def _patterns() -> tuple[re.Pattern[str], tuple[tuple[re.Pattern[str], str], ...]]:
    """The patterns that read msgspec's validation errors, compiled on first use (an
    error path: a client that never sends a bad field never pays for them)."""
    validation = re.compile(  # DOTALL: a field name quoted in the error may hold a newline
        r"(?P<what>.*?)(?: - at `(?:\$\.?)?(?P<at>[^`]*)`)?(?: in `\$\.?(?P<in>[^`]*)`)?",
        re.DOTALL)
    rules = ((re.compile(r"of length >= 1"), "must not be empty"),
             (re.compile(r"of length <= (\d+)"), "must be at most {0} long"),
             (re.compile(r"of length >= (\d+)"), "must be at least {0} long"),
             (re.compile(r">= (-?[\d.]+)"), "must be at least {0}"),
             (re.compile(r"<= (-?[\d.]+)"), "must be at most {0}"),
             (re.compile(r"> (-?[\d.]+)"), "must be more than {0}"),
             (re.compile(r"< (-?[\d.]+)"), "must be less than {0}"),
             (re.compile(r"matching regex"), "has characters that are not allowed"))
    return validation, rules


_KINDS = {"int": "a whole number", "float": "a number", "str": "text", "bool": "true or false",
          "array": "a list", "object": "a map", "null": "empty"}


def split_validation(error: str) -> tuple[str, str | None, str | None]:
    """A msgspec validation error as (what was wrong, where, inside what), the paths
    without their ``$.``: ``("Expected `int` >= 1", "max_uses", None)``. Shared by
    every place that tells such an error in its own terms."""
    match = _patterns()[0].fullmatch(error)
    assert match is not None  # every part is optional
    return match["what"], match["at"], match["in"]


def explain_invalid(error: str) -> str:
    """Tell a msgspec validation error in the request's field names:
    ``Expected `int` >= 1 - at `$.max_uses``` becomes ``max_uses must be at least 1``.
    A dict key's place is spelled ``*`` (``data.*.value``): msgspec does not say which."""
    what, at, inside = split_validation(error)
    field = (at or "").replace("[...]", ".*") or "the request"
    if at == "key" and inside:  # msgspec's place for a dict key: `key` in `$.data`
        field = f"a key of {inside.replace('[...]', '.*')}"
    if found := re.fullmatch(r"Object missing required field `(.*)`", what):
        return f"{found[1]} is required" + (f" in {field}" if at else "")
    if found := re.fullmatch(r"Object contains unknown field `(.*)`", what):
        return f"unknown field {found[1]}" + (f" in {field}" if at else "")
    if found := re.fullmatch(r"Expected `([^`]*)`(?:, got `([^`]*)`)?(.*)", what):
        kind, got, rule = found[1], found[2], found[3].strip()
        if got:
            told = "a float" if got == "float" else _KINDS.get(got, got)  # whole or not
            return f"{field} must be {_KINDS.get(kind, kind)}, not {told}"
        for pattern, text in _patterns()[1]:
            if (rule_match := pattern.search(rule)) is not None:
                unit = " characters" if kind == "str" and "long" in text else \
                    " items" if "long" in text else ""
                told = text.format(*(n.removesuffix(".0") for n in rule_match.groups()))
                return f"{field} {told.replace(' long', unit)}"
    return f"{field} is not valid: {what.replace('`', '')}"
