"""The sans-IO protocol on an in-memory pair: no sockets, no event loop."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stigmer.broker.protocol import (
    CLOSED,
    NEED_DATA,
    PROTOCOL_VERSION,
    REQUEST_TYPES,
    Connection,
    Error,
    FrameReader,
    GetStatus,
    Hello,
    PutEnvironment,
    Request,
    Role,
    State,
    Variable,
    Welcome,
    error_reply,
    frame,
)
from stigmer.broker.protocol.errors import (
    ErrorCode,
    HandshakeRequired,
    InvalidArgument,
    ProtocolError,
    UnsupportedVersion,
)


class Pair:
    """A client and a server Connection wired together in memory."""

    def __init__(self, max_frame_size: int = 1024 * 1024) -> None:
        self.client = Connection(Role.CLIENT)
        self.server = Connection(Role.SERVER, max_frame_size=max_frame_size)

    def to_server(self, message: Request) -> object:
        self.server.receive_data(self.client.send(message))
        return self.server.next_event()

    def greet(self) -> None:
        assert isinstance(self.to_server(Hello(id=1, version=PROTOCOL_VERSION)), Hello)
        self.client.receive_data(self.server.send(Welcome(id=1, version=1, server_version="t")))
        assert isinstance(self.client.next_event(), Welcome)


def test_handshake_then_requests() -> None:
    pair = Pair()
    pair.greet()
    assert pair.server.state is State.READY
    assert pair.client.state is State.READY
    assert pair.to_server(GetStatus(id=2)) == GetStatus(id=2)


def test_request_before_hello_is_refused_but_connection_survives() -> None:
    pair = Pair()
    with pytest.raises(HandshakeRequired) as info:
        pair.to_server(GetStatus(id=7))
    assert info.value.request_id == 7
    assert error_reply(7, info.value).code == ErrorCode.HANDSHAKE_REQUIRED
    pair.greet()


def test_unsupported_version_lists_supported() -> None:
    pair = Pair()
    with pytest.raises(UnsupportedVersion) as info:
        pair.to_server(Hello(id=3, version=99))
    reply = error_reply(3, info.value)
    assert reply.code == "unsupported_version"
    assert reply.supported_versions == [1]
    pair.greet()


def test_second_hello_is_invalid() -> None:
    pair = Pair()
    pair.greet()
    with pytest.raises(InvalidArgument):
        pair.to_server(Hello(id=5, version=1))


def test_oversized_header_is_refused_before_the_body() -> None:
    server = Connection(Role.SERVER, max_frame_size=100)
    with pytest.raises(ProtocolError) as info:
        server.receive_data((101).to_bytes(4, "big"))
    assert info.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert server.state is State.ERROR
    with pytest.raises(ProtocolError):  # sticky
        server.next_event()


@pytest.mark.parametrize("length", [0, 2**32 - 1, 1024 * 1024 + 1])
def test_declared_lengths_do_not_buffer(length: int) -> None:
    reader = FrameReader()
    with pytest.raises(ProtocolError):
        reader.feed(length.to_bytes(4, "big") + b"x" * 10)
    assert reader.buffered <= 14


def test_bodies_come_out_whole_and_in_order_however_the_bytes_are_cut() -> None:
    """A chunk that is one whole frame is kept as it came (no copy into the buffer):
    what is fed after it still comes out after it, and a body fed alone after its
    header is a body, even when its own first bytes read like a frame's header."""
    inner = frame(b"abc")  # a body that is itself a well-formed frame
    reader = FrameReader()
    reader.feed(frame(b"first"))
    reader.feed(frame(b"second") + (len(inner)).to_bytes(4, "big"))
    assert reader.buffered == len(b"first") + len(b"second") + 4  # (headers read are not)
    reader.feed(inner)
    assert [bytes(body) for body in iter(reader.next_body, None)] == [
        b"first", b"second", inner]
    assert reader.buffered == 0
    reader.feed((len(inner)).to_bytes(4, "big"))  # a header alone, then its body
    assert reader.next_body() is None
    reader.feed(inner)
    assert bytes(reader.next_body() or b"") == inner
    assert reader.next_body() is None


def test_truncated_frame_at_eof_is_an_error() -> None:
    server = Connection(Role.SERVER)
    data = Connection(Role.CLIENT).send(Hello(id=1, version=1))
    server.receive_data(data[:-2])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(ProtocolError):
        server.next_event()


def test_clean_eof_is_closed() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(b"")
    assert server.next_event() is CLOSED


def test_garbage_body_names_the_request_id_when_it_can() -> None:
    server = Connection(Role.SERVER)
    body = msgspec.msgpack.encode({"op": "NoSuchThing", "id": 42})
    server.receive_data(frame(body))
    with pytest.raises(ProtocolError) as info:
        server.next_event()
    assert info.value.request_id == 42
    assert server.state is State.ERROR


def test_unknown_fields_are_rejected() -> None:
    server = Connection(Role.SERVER)
    body = msgspec.msgpack.encode({"op": "Hello", "id": 1, "version": 1, "extra": True})
    server.receive_data(frame(body))
    with pytest.raises(InvalidArgument, match="unknown field extra"):
        server.next_event()


def test_limits_in_types() -> None:
    pair = Pair()
    pair.greet()
    body = msgspec.msgpack.encode({"op": "PutEnvironment", "id": 2, "name": "bad name",
                                   "data": {}})
    pair.server.receive_data(frame(body))
    with pytest.raises(InvalidArgument, match="name has characters that are not allowed"):
        pair.server.next_event()


def test_byte_by_byte_equals_whole() -> None:
    client = Connection(Role.CLIENT)
    messages = [Hello(id=1, version=1), GetStatus(id=2),
                PutEnvironment(id=3, name="e", data={"K": Variable(value="v", is_secret=True)})]
    wire = b"".join(client.send(m) for m in messages)
    server = Connection(Role.SERVER)
    got = []
    for byte in wire:
        server.receive_data(bytes([byte]))
        while (event := server.next_event()) is not NEED_DATA:
            got.append(event)
    assert got == messages


def test_client_refuses_responses_before_welcome() -> None:
    client = Connection(Role.CLIENT)
    client.receive_data(Connection(Role.SERVER).send(Error(id=1, code="internal", message="x")))
    assert isinstance(client.next_event(), Error)  # errors are fine before Welcome
    from stigmer.broker.protocol import Ok

    client.receive_data(Connection(Role.SERVER).send(Ok(id=1)))
    with pytest.raises(ProtocolError):
        client.next_event()


def test_secret_variable_repr_is_masked() -> None:
    assert "hunter2" not in repr(Variable(value="hunter2", is_secret=True))
    assert "plain" in repr(Variable(value="plain"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048), st.integers(min_value=1, max_value=64))
def test_random_bytes_only_yield_protocol_errors_or_messages(data: bytes, chunk: int) -> None:
    server = Connection(Role.SERVER, max_frame_size=4096)
    try:
        for i in range(0, len(data), chunk):
            server.receive_data(data[i:i + chunk])
            while (event := server.next_event()) is not NEED_DATA:
                assert isinstance(event, Request) or event is CLOSED
                if event is CLOSED:
                    return
    except (ProtocolError, HandshakeRequired, UnsupportedVersion, InvalidArgument):
        pass
    assert server.buffered <= len(data)


def _request_strategy() -> st.SearchStrategy[Request]:
    return st.one_of(*[st.builds(t, id=st.integers(min_value=0, max_value=2**63 - 1))
                       for t in REQUEST_TYPES if not t.__struct_fields__[1:]],
                     st.builds(Hello, id=st.integers(min_value=0, max_value=2**31),
                               version=st.just(1)),
                     st.builds(PutEnvironment, id=st.integers(min_value=0, max_value=2**31),
                               name=st.from_regex(r"\A[A-Za-z0-9._-]{1,20}\Z"),
                               data=st.dictionaries(
                                   st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,10}\Z"),
                                   st.builds(Variable, value=st.text(max_size=50),
                                             is_secret=st.booleans()), max_size=5)))


@settings(max_examples=200, deadline=None)
@given(st.lists(_request_strategy(), min_size=1, max_size=8),
       st.integers(min_value=1, max_value=97))
def test_random_valid_messages_round_trip_in_any_chunking(messages: list[Request],
                                                           chunk: int) -> None:
    client = Connection(Role.CLIENT)
    wire = client.send(Hello(id=0, version=1)) + b"".join(client.send(m) for m in messages)
    server = Connection(Role.SERVER)
    got: list[object] = []
    for i in range(0, len(wire), chunk):
        server.receive_data(wire[i:i + chunk])
        while True:
            try:
                event = server.next_event()
            except InvalidArgument:  # a second Hello in the list
                continue
            if event is NEED_DATA:
                break
            got.append(event)
    expected = [Hello(id=0, version=1)] + [m for m in messages if not isinstance(m, Hello)]
    assert got == expected


def test_sending_over_the_frame_limit_is_refused_locally() -> None:
    from stigmer.broker.protocol.errors import ResourceExhausted

    client = Connection(Role.CLIENT, max_frame_size=1000)
    with pytest.raises(ResourceExhausted, match="over the frame limit"):
        client.send(PutEnvironment(id=1, name="e", data={"A": Variable(value="x" * 2000)}))
    assert client.state is State.AWAIT_HELLO  # nothing changed: the connection is usable
    assert client.send(Hello(id=1, version=1))


@pytest.mark.parametrize("name", ["prod\n", "exec-1\n"])
def test_names_with_a_trailing_newline_are_refused_on_the_wire(name: str) -> None:
    from stigmer.broker.protocol import GetEnvironment, PutEnvironment, Variable

    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"id": 1, "name": name}, GetEnvironment)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"id": 1, "name": "e", "data": {"GITHUB_TOKEN\n": {"value": "x"}}},
                        PutEnvironment)
    assert Variable(value="x")


def test_a_lone_surrogate_is_refused_without_the_value() -> None:
    from stigmer.broker.protocol import Connection, FetchContext, Role
    from stigmer.broker.protocol.errors import InvalidArgument

    conn = Connection(Role.CLIENT)
    with pytest.raises(InvalidArgument) as caught:
        conn.send(FetchContext(id=1, token="stg_\udc80SENTINEL"))
    assert "SENTINEL" not in str(caught.value)
    assert caught.value.__context__ is None  # the UnicodeEncodeError held the whole token


@pytest.mark.parametrize(("fields", "message"), [
    ({"op": "IssueToken", "execution_id": "x", "ttl_s": 60.0, "max_uses": 0},
     "max_uses must be at least 1"),
    # issue 26: 0 is the default (as absent is), so the bound is below it
    ({"op": "IssueToken", "execution_id": "x", "ttl_s": -1.0}, "ttl_s must be at least 0"),
    ({"op": "IssueToken", "execution_id": "bad name", "ttl_s": 1.0},
     "execution_id has characters that are not allowed"),
    ({"op": "PutEnvironment", "name": "e", "data": {"A": {"value": 3}}},
     "data.*.value must be text, not a whole number"),
    ({"op": "IssueToken"}, "execution_id is required"),
    ({"op": "FetchContext", "token": ""}, "token must not be empty"),
    # issue 23: a field name with a newline made the error reader assert, so the server
    # aborted the connection with a traceback instead of answering
    ({"op": "GetStatus", "a\nb": 1}, "unknown field a\\nb"),
    ({"op": "PutEnvironment", "name": "e", "data": {"A": {"val\nue": "x"}}},
     "unknown field val\\nue in data.*"),
    ({"op": "PutEnvironment", "name": "e", "data": {"A\nB": {"value": "x"}}},
     "a key of data has characters that are not allowed"),
    ({"op": "GetStatus", "x\x1b[2J\u2028": 1}, "unknown field x\\x1b[2J\\u2028"),
])
def test_out_of_bounds_fields_are_told_by_name_and_keep_the_connection(
        fields: dict[str, object], message: str) -> None:
    from stigmer.broker.protocol import Connection, GetStatus, Role, frame
    from stigmer.broker.protocol.errors import InvalidArgument

    conn = Connection(Role.SERVER)
    conn.state = conn.state.READY
    conn.receive_data(frame(msgspec.msgpack.encode({**fields, "id": 7})))
    with pytest.raises(InvalidArgument) as caught:
        conn.next_event()
    assert caught.value.message == message and caught.value.request_id == 7
    conn.receive_data(frame(msgspec.msgpack.encode({"op": "GetStatus", "id": 8})))
    assert conn.next_event() == GetStatus(id=8)


def test_the_client_names_an_oversized_value() -> None:
    from stigmer.broker.protocol import MAX_VALUE_LENGTH, SpecEntry
    from stigmer.broker.protocol.errors import InvalidArgument
    from stigmer.client._common import checked_values

    fine = {"A": Variable(value="x" * MAX_VALUE_LENGTH)}
    assert checked_values(fine, "runtime") == fine
    assert checked_values({"S": SpecEntry()}, "env_spec") == {"S": SpecEntry()}
    with pytest.raises(InvalidArgument, match=r"the value of BIG \(runtime\) is 131073 "):
        checked_values({"BIG": Variable(value="y" * (MAX_VALUE_LENGTH + 1))}, "runtime")
    # issue 26: the limit is in UTF-8 bytes, as the broker counts it (3 bytes a euro sign)
    euros = {"EUR": Variable(value="\u20ac" * (MAX_VALUE_LENGTH // 3))}
    assert checked_values(euros, "runtime") == euros
    with pytest.raises(InvalidArgument, match=r"the value of EUR \(runtime\) is 131073 bytes"):
        checked_values({"EUR": Variable(value="\u20ac" * (MAX_VALUE_LENGTH // 3 + 1))}, "runtime")


def test_an_unknown_op_with_a_newline_is_a_one_line_protocol_error() -> None:
    conn = Connection(Role.SERVER)
    conn.receive_data(frame(msgspec.msgpack.encode({"op": "Hel\nlo", "id": 3})))
    with pytest.raises(ProtocolError) as caught:
        conn.next_event()
    assert "Hel\\nlo" in caught.value.message and caught.value.request_id == 3
    assert len(caught.value.message.splitlines()) == 1


def test_protocol_md_states_the_brokers_real_limits() -> None:
    """Issue 23: PROTOCOL.md said 256 connections while the broker allowed 1,024."""
    import re
    from pathlib import Path

    from stigmer.broker.config import Limits
    from stigmer.broker.daemon import server
    from stigmer.broker.daemon.listen import LISTEN_BACKLOG

    text = " ".join((Path(__file__).resolve().parents[2] / "proto" / "PROTOCOL.md")
                    .read_text().split())
    limits = Limits()

    def stated(pattern: str) -> int:
        found = re.search(pattern, text)
        assert found is not None, pattern
        return int(found[1].replace(",", ""))

    assert stated(r"at most ([\d,]+) connections at once") == limits.max_connections
    assert stated(r"at most (\d+) for any uid other than") == limits.max_connections_per_uid
    assert stated(r"listen backlog \((\d+)\)") == LISTEN_BACKLOG
    assert stated(r"admits at most (\d+) new connections of one uid") == \
        server._ADMISSIONS_PER_UID
    assert stated(r"completed `Hello` within (\d+) s") == limits.handshake_timeout
    assert stated(r"frame unfinished for (\d+) s") == limits.frame_timeout
    assert stated(r"idle for (\d+) s") == limits.idle_timeout
    assert stated(r"maximum is 1 MiB \(([\d,]+) bytes\)") == limits.max_frame_size
    # issue 26: the limits of the messages, which the spec did not give
    from stigmer.broker import environments, protocol

    assert stated(r"\| ([\d,]+) bytes \(128 KiB\) in UTF-8") == protocol.MAX_VALUE_LENGTH
    assert stated(r"1 to (\d+) characters of `\[A-Za-z0-9._-\]`") == protocol.MAX_NAME_LENGTH
    assert stated(r"a variable name \| 1 to (\d+) characters") == \
        protocol.messages.MAX_VAR_NAME_LENGTH
    assert stated(r"\| ([\d,]+) \(`UnsetVariables.keys`") == protocol.messages.MAX_VARIABLES
    assert stated(r"(\d+) KiB \(`resource_exhausted`\)") * 1024 == \
        environments.MAX_ENVIRONMENT_BYTES
    assert stated(r"`ListAudit.limit` \| 0 \(the default\) to ([\d,]+)") == \
        protocol.MAX_PAGE_SIZE
    assert "the third answer" in text and limits.max_auth_failures == 3


@pytest.mark.parametrize(("fields", "expected"), [
    ({"op": "CreateContext", "execution_id": "x", "ttl_s": 0, "token_ttl_s": 0.0},
     {"ttl_s": 86400.0, "token_ttl_s": 900.0}),
    ({"op": "IssueToken", "execution_id": "x", "ttl_s": 0.0}, {"ttl_s": 900.0}),
    ({"op": "ListAudit", "limit": 0}, {"limit": 100}),
    ({"op": "ListEnvironments", "page_size": 0}, {"page_size": 500}),
    ({"op": "ListContexts", "page_size": 0}, {"page_size": 500}),
])
def test_zero_means_the_default_as_absent_does(fields: dict[str, object],
                                               expected: dict[str, object]) -> None:
    """Issue 26: a protobuf-struct peer cannot leave a number out, so 0 asks for the
    default; it was invalid_argument, and the defaults were nowhere in the spec."""
    conn = Connection(Role.SERVER)
    conn.state = State.READY
    for body in ({**fields, "id": 1}, {k: v for k, v in fields.items() if k not in expected}
                 | {"id": 2}):
        conn.receive_data(frame(msgspec.msgpack.encode(body)))
        event = conn.next_event()
        assert {name: getattr(event, name) for name in expected} == expected


@pytest.mark.parametrize("body", [
    [1, 2],  # not a map
    {"op": "GetStatus"},  # no id
    {"op": "GetStatus", "id": 1.0},  # an id that is not an int
    {"op": "GetStatus", "id": -1},
    {"op": "PutEnvironment", "name": 3, "id": "1"},  # a bad field before a bad id
])
def test_a_request_without_an_id_to_answer_by_closes(body: object) -> None:
    """Issue 26: these were answered invalid_argument with id 0 and the connection kept,
    though the spec said an Error with id 0 is followed by the close."""
    conn = Connection(Role.SERVER)
    conn.state = State.READY
    conn.receive_data(frame(msgspec.msgpack.encode(body)))
    with pytest.raises(ProtocolError) as caught:
        conn.next_event()
    assert caught.value.request_id == 0 and conn.state is State.ERROR


def test_a_client_ignores_reply_fields_it_does_not_know() -> None:
    """Issue 26: a newer broker may add reply fields within v1 (ApplyEnvironments gained
    dry_run); an older client must read on, at the top and in the records."""
    client = Connection(Role.CLIENT)
    body = {"op": "Welcome", "id": 1, "version": 1, "server_version": "9", "later": [1]}
    client.receive_data(frame(msgspec.msgpack.encode(body)))
    assert client.next_event() == Welcome(id=1, version=1, server_version="9")
    listing = {"op": "ContextList", "id": 2, "next_page_token": "", "shard": "b",
               "contexts": [{"execution_id": "e", "created_at": 1.0, "expires_at": 2.0,
                             "keys": 1, "secrets": 0, "tokens": 1, "labels": {"a": "b"}}]}
    client.receive_data(frame(msgspec.msgpack.encode(listing)))
    from stigmer.broker.protocol import ContextList, ContextSummary

    assert client.next_event() == ContextList(id=2, contexts=[ContextSummary(
        execution_id="e", created_at=1.0, expires_at=2.0, keys=1, secrets=0, tokens=1)])


def test_the_broker_still_refuses_unknown_request_fields_in_records() -> None:
    """A misspelt is_secret must not store a secret as a plain value."""
    conn = Connection(Role.SERVER)
    conn.state = State.READY
    body = {"op": "PutEnvironment", "id": 4, "name": "e",
            "data": {"K": {"value": "v", "is_secrt": True}}}
    conn.receive_data(frame(msgspec.msgpack.encode(body)))
    with pytest.raises(InvalidArgument, match=r"unknown field is_secrt in data\.\*"):
        conn.next_event()
