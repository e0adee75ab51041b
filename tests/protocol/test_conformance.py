"""The conformance suite (proto/conformance/) replayed against the real broker, both stores.

Each conversation is data: a setup (requests whose replies fill placeholders),
then steps on one or more connections: frames to send, frames to expect, closes
to expect. PROTOCOL.md ("Replaying the conformance suite") is the format; this
module is one runner of it, written as an implementer in another language would
write theirs, with plain sockets and a MessagePack codec, so that the suite
cannot drift from the broker.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from conftest import RunningBroker

from stigmer.broker.protocol import Connection, Role

SUITE = Path(__file__).resolve().parents[2] / "proto" / "conformance"
TIMEOUT = 10.0  # seconds a read may take before the conversation fails

pytestmark = pytest.mark.anyio


def _no_json_floats(text: str) -> float:
    raise ValueError(f"the suite writes doubles as {{\"$double\": ...}}, not {text}: JSON "
                     "cannot tell 3600.0 from 3600 in every language")


def _conversations() -> Iterator[Any]:
    for path in sorted(SUITE.glob("*.json")):
        topic = json.loads(path.read_text(), parse_float=_no_json_floats)
        for conversation in topic["conversations"]:
            yield pytest.param(conversation, id=f"{path.stem}:{conversation['name']}")


class Mismatch(AssertionError):
    pass


class Conversation:
    """One conversation's connections and placeholders."""

    def __init__(self, socket_path: Path) -> None:
        self.path = str(socket_path)
        self.values: dict[str, Any] = {}
        self.conns: dict[str, tuple[socket.socket, bytearray]] = {}

    # ------------------------------------------------------------------ values

    def build(self, value: Any) -> Any:
        """A value of a frame to send, its escapes ($double, $var, $repeat, $repeat_list,
        $map) applied."""
        if isinstance(value, list):
            return [self.build(v) for v in value]
        if not isinstance(value, dict):
            return value
        if "$double" in value:
            return float(value["$double"])
        if "$var" in value:
            return self.values[value["$var"]]
        if "$repeat" in value:
            text, count = value["$repeat"]
            return text * count
        if "$repeat_list" in value:
            item, count = value["$repeat_list"]
            return [self.build(item) for _ in range(count)]
        if "$map" in value:
            spec = value["$map"]
            return {f"{spec['prefix']}{n}": self.build(spec["value"])
                    for n in range(spec["count"])}
        return {k: self.build(v) for k, v in value.items()}

    def match(self, expected: Any, actual: Any, where: str) -> None:
        """Check ``actual`` (a decoded frame or part of it) against ``expected``."""
        if isinstance(expected, dict) and _BUILT & expected.keys():
            expected = self.build(expected)
        if isinstance(expected, dict) and any(k.startswith("$") for k in expected) \
                and "$more" not in expected:
            self._match_special(expected, actual, where)
        elif isinstance(expected, dict):
            if not isinstance(actual, dict):
                raise Mismatch(f"{where}: expected a map, got {actual!r}")
            wanted = {k: v for k, v in expected.items() if k != "$more"}
            missing = set(wanted) - set(actual)
            extra = set(actual) - set(wanted)
            if missing or (extra and not expected.get("$more")):
                raise Mismatch(f"{where}: keys missing {sorted(missing)}, unexpected "
                               f"{sorted(extra)} in {actual!r}")
            for key, want in wanted.items():
                self.match(want, actual[key], f"{where}.{key}")
        elif isinstance(expected, list):
            if not isinstance(actual, list) or len(actual) != len(expected):
                raise Mismatch(f"{where}: expected {len(expected)} items, got {actual!r}")
            for n, (want, got) in enumerate(zip(expected, actual, strict=True)):
                self.match(want, got, f"{where}[{n}]")
        elif type(expected) is not type(actual) or expected != actual:
            raise Mismatch(f"{where}: expected {expected!r}, got {actual!r}")

    def _match_special(self, expected: dict[str, Any], actual: Any, where: str) -> None:
        """A matcher map: each of its keys is one check, and all must hold."""
        for key, arg in expected.items():
            if key == "$capture":
                self.values[arg] = actual
            elif key == "$var":
                self.match(self.values[arg], actual, where)
            elif not _SPECIAL[key](self, arg, actual):
                raise Mismatch(f"{where}: expected {key} {arg!r}, got {actual!r}")

    # ------------------------------------------------------------------- wires

    def conn(self, name: str) -> tuple[socket.socket, bytearray]:
        if name not in self.conns:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(TIMEOUT)
            sock.connect(self.path)
            self.conns[name] = (sock, bytearray())
        return self.conns[name]

    def send(self, name: str, data: bytes) -> None:
        sock, _ = self.conn(name)
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed by the broker: the next expect says whether that was right

    def read_frame(self, name: str) -> Any | None:
        """The next frame's decoded body, or None once the broker has closed."""
        sock, buffer = self.conn(name)
        while True:
            if len(buffer) >= 4:
                length = int.from_bytes(buffer[:4], "big")
                if len(buffer) >= 4 + length:
                    body = bytes(buffer[4:4 + length])
                    del buffer[:4 + length]
                    return msgspec.msgpack.decode(body)
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                if buffer:
                    raise Mismatch(f"{name}: closed in the middle of a frame")
                return None
            buffer += chunk

    def close(self) -> None:
        for sock, _ in self.conns.values():
            sock.close()

    # ------------------------------------------------------------------- steps

    def setup(self, requests: list[dict[str, Any]]) -> None:
        self.send("setup", _frame({"op": "Hello", "id": 1, "version": 1}))
        assert (self.read_frame("setup") or {}).get("op") == "Welcome"
        for n, item in enumerate(requests):
            request = self.build(item["send"])
            self.send("setup", _frame(request))
            reply = self.read_frame("setup")
            if reply is None or reply.get("op") == "Error" or reply["id"] != request["id"]:
                raise Mismatch(f"setup[{n}] {request['op']}: answered {reply!r}")
            for name, field in item.get("capture", {}).items():
                self.values[name] = reply[field]
        self.conns.pop("setup")[0].close()

    def step(self, n: int, step: dict[str, Any]) -> None:
        name = step.get("conn", "main")
        where = f"step {n} ({name})"
        if "send" in step:
            self.send(name, _frame(self.build(step["send"])))
        elif "send_raw" in step:
            self.send(name, bytes.fromhex(step["send_raw"]))
        elif "expect" in step or "expect_error" in step:
            frame = self.read_frame(name)
            if frame is None:
                raise Mismatch(f"{where}: the broker closed instead of answering")
            expected = step.get("expect") or _error(step["expect_error"])
            self.match(expected, frame, where)
        elif "expect_close" in step:
            frame = self.read_frame(name)
            if frame is not None:
                raise Mismatch(f"{where}: expected the close, got {frame!r}")
        else:
            raise ValueError(f"{where}: unknown step {step!r}")


#: the escapes that make a value, in a frame to send or in one expected
_BUILT = {"$repeat", "$repeat_list", "$map"}
_KINDS = {"string": str, "int": int, "double": float, "bool": bool, "null": type(None),
          "array": list, "map": dict}
_SPECIAL: dict[str, Any] = {
    "$double": lambda run, arg, got: type(got) is float and got == float(arg),
    "$type": lambda run, arg, got: type(got) is _KINDS[arg],
    "$plus": lambda run, arg, got: type(got) is float and got == run.values[arg[0]] + arg[1],
    "$prefix": lambda run, arg, got: type(got) is str and got.startswith(arg),
}


def _frame(body: Any) -> bytes:
    data = msgspec.msgpack.encode(body)
    return len(data).to_bytes(4, "big") + data


def _error(short: dict[str, Any]) -> dict[str, Any]:
    return {"op": "Error", "message": {"$type": "string"}, "supported_versions": [],
            **short}


def replay(socket_path: Path, conversation: dict[str, Any]) -> None:
    run = Conversation(socket_path)
    try:
        run.setup(conversation.get("setup", []))
        for n, step in enumerate(conversation["steps"]):
            run.step(n, step)
    finally:
        run.close()


@pytest.mark.parametrize("conversation", list(_conversations()))
async def test_conversation(broker: RunningBroker, conversation: dict[str, Any]) -> None:
    await anyio.to_thread.run_sync(replay, broker.socket, conversation)


def test_every_request_and_error_code_is_in_the_suite() -> None:
    """The suite covers every rpc, and every error code a client can provoke."""
    from stigmer.broker.protocol import REQUEST_TYPES
    from stigmer.broker.protocol.errors import ErrorCode

    sent: set[str] = set()
    codes: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("op"), str):
                sent.add(value["op"])
            if isinstance(value.get("code"), str):
                codes.add(value["code"])
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for param in _conversations():
        walk(param.values[0])
    assert {t.__name__ for t in REQUEST_TYPES} <= sent
    # internal and unavailable are the broker's own failures: no request provokes them
    assert {c.value for c in ErrorCode} - {"internal", "unavailable"} <= codes


def test_the_clients_decoder_reads_the_forward_compatible_replies() -> None:
    """proto/conformance/client/: replies from a newer broker, which a v1 client reads."""
    cases = json.loads((SUITE / "client" / "replies.json").read_text(),
                       parse_float=_no_json_floats)
    for case in cases["replies"]:
        conn = Connection(Role.CLIENT)
        if case["frame"]["op"] != "Welcome":
            conn.state = conn.state.READY
        conn.receive_data(_frame(Conversation(Path()).build(case["frame"])))
        decoded = msgspec.to_builtins(conn.next_event())
        assert decoded == Conversation(Path()).build(case["reads_as"]), case["about"]


def test_the_client_reads_a_newer_brokers_replies(short_dir: Path) -> None:
    """Issue 26: the client's reply structs forbade unknown fields, so a broker that
    added one within v1 broke every older client. Here a stand-in broker answers with
    fields no v1 message has, and the blocking client reads on."""
    import threading

    from stigmer.client import Client

    path = short_dir / "newer.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(TIMEOUT)
    replies = [{"op": "Welcome", "id": 1, "version": 1, "server_version": "9", "features": []},
               {"op": "Status", "id": 2, "version": "9", "pid": 1, "uptime_s": 1.0, "socket": "s",
                "socket_mode": "0600", "store": "x", "key_source": "file", "started_by": "manual",
                "environments": 0, "contexts": 0, "tokens": 0, "requests": 0, "connections": 1,
                "shard": {"name": "b"}}]

    def newer_broker() -> None:
        conn, _ = listener.accept()
        with conn:
            run = Conversation(path)
            run.conns["peer"] = (conn, bytearray())
            for reply in replies:
                request = run.read_frame("peer")
                assert request is not None and request["id"] == reply["id"]
                conn.sendall(_frame(reply))

    thread = threading.Thread(target=newer_broker)
    thread.start()
    try:
        with Client(path) as client:
            status = client.status()
    finally:
        thread.join(TIMEOUT)
        listener.close()
    assert (status.version, status.connections, status.unit) == ("9", 1, "")
