"""The language-neutral contract: golden frames and the .proto stay in step with the code."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import msgspec
import msgspec.inspect as mi
import pytest
from samples import SAMPLES

from stigmer.broker.protocol import (
    RECORD_TYPES,
    REQUEST_TYPES,
    RESPONSE_TYPES,
    Connection,
    Role,
)

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "stigmer" / "broker" / "v1" / "broker.proto"
VECTORS = ROOT / "proto" / "vectors.json"
ALL_TYPES: tuple[type[msgspec.Struct], ...] = (*REQUEST_TYPES, *RESPONSE_TYPES, *RECORD_TYPES)


def _frames() -> dict[str, str]:
    conn = Connection(Role.SERVER)
    return {name: conn.send(msg).hex() for name, msg in sorted(SAMPLES.items())}


def test_every_message_has_a_sample() -> None:
    assert set(SAMPLES) == {t.__name__ for t in (*REQUEST_TYPES, *RESPONSE_TYPES)}


def test_golden_vectors_match_byte_for_byte() -> None:
    frames = _frames()
    if os.environ.get("STIGMER_REGENERATE_VECTORS") == "1":
        VECTORS.write_text(json.dumps(frames, indent=2, sort_keys=True) + "\n")
    golden = json.loads(VECTORS.read_text())
    assert golden == frames


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_golden_vectors_decode_to_the_samples(name: str) -> None:
    raw = bytes.fromhex(json.loads(VECTORS.read_text())[name])
    role = Role.SERVER if name in {t.__name__ for t in REQUEST_TYPES} else Role.CLIENT
    conn = Connection(role)
    conn.state = conn.state.READY if name not in ("Hello", "Welcome", "Error") else conn.state
    conn.receive_data(raw)
    assert conn.next_event() == SAMPLES[name]


def _proto_messages() -> dict[str, dict[str, str]]:
    text = re.sub(r"//[^\n]*", "", PROTO.read_text())
    messages: dict[str, dict[str, str]] = {}
    for name, body in re.findall(r"message (\w+) \{(.*?)\}", text, re.S):
        fields = {}
        for label, type_, field in re.findall(
                r"^\s*(optional |repeated )?(map<\w+, ?\w+>|\w+) (\w+) = \d+;", body, re.M):
            fields[field] = (label.strip() + " " if label else "") + type_.replace(" ", "")
        messages[name] = fields
    return messages


def _proto_type(t: mi.Type) -> str:
    if isinstance(t, mi.UnionType):
        non_null = [x for x in t.types if not isinstance(x, mi.NoneType)]
        assert len(non_null) == 1
        return "optional " + _proto_type(non_null[0])
    if isinstance(t, mi.ListType):
        return "repeated " + _proto_type(t.item_type)
    if isinstance(t, mi.DictType):
        return f"map<{_proto_type(t.key_type)},{_proto_type(t.value_type)}>"
    if isinstance(t, mi.StructType):
        return str(t.cls.__name__)
    return {mi.IntType: "int64", mi.StrType: "string", mi.BoolType: "bool",
            mi.FloatType: "double"}[type(t)]


def test_proto_declares_the_same_messages_and_fields() -> None:
    declared = _proto_messages()
    assert set(declared) == {t.__name__ for t in ALL_TYPES}
    for cls in ALL_TYPES:
        info = mi.type_info(cls)
        assert isinstance(info, mi.StructType)
        ours = {f.name: _proto_type(f.type) for f in info.fields}
        assert declared[cls.__name__] == ours, cls.__name__


def test_proto_service_has_one_rpc_per_request() -> None:
    text = PROTO.read_text()
    rpcs = re.findall(r"rpc (\w+)\((\w+)\)", text)
    assert {name for name, _ in rpcs} == {t.__name__ for t in REQUEST_TYPES}
    assert all(name == arg for name, arg in rpcs)


def test_wire_keys_are_the_field_names() -> None:
    body = msgspec.msgpack.decode(bytes.fromhex(_frames()["Hello"])[4:])
    assert body == {"op": "Hello", "id": 1, "version": 1, "client": "golden"}


def test_raw_fetch_reply_encodes_like_the_decoded_one() -> None:
    from stigmer.broker.protocol import ContextFetched, ContextFetchedRaw

    sample = SAMPLES["ContextFetched"]
    assert isinstance(sample, ContextFetched)
    raw = ContextFetchedRaw(id=sample.id, execution_id=sample.execution_id,
                            expires_at=sample.expires_at,
                            variables=msgspec.Raw(msgspec.msgpack.encode(sample.variables)))
    conn = Connection(Role.SERVER)
    assert conn.send(raw) == conn.send(sample)
