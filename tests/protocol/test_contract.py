"""The language-neutral contract: golden frames and the .proto stay in step with the code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec
import msgspec.inspect as mi
import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc
from samples import SAMPLES

from stigmer.broker.protocol import (
    RECORD_TYPES,
    REQUEST_TYPES,
    RESPONSE_TYPES,
    Connection,
    Role,
)

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
PROTO = PROTO_ROOT / "stigmer" / "broker" / "v1" / "broker.proto"
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


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorProto:
    """The .proto as protoc itself reads it (grpcio-tools bundles protoc)."""
    out = tmp_path_factory.mktemp("proto") / "broker.pb"
    status = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"--descriptor_set_out={out}",
                          str(PROTO)])
    assert status == 0, "protoc rejected broker.proto (its errors are printed above)"
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    assert [f.name for f in files] == ["stigmer/broker/v1/broker.proto"]
    return files[0]


_FD = descriptor_pb2.FieldDescriptorProto
_SCALARS = {_FD.TYPE_INT64: "int64", _FD.TYPE_STRING: "string", _FD.TYPE_BOOL: "bool",
            _FD.TYPE_DOUBLE: "double"}


def _declared_type(field: _FD, nested: dict[str, descriptor_pb2.DescriptorProto]) -> str:
    """A descriptor field, spelled like :func:`_proto_type` spells a msgspec field."""
    if field.type == _FD.TYPE_MESSAGE:
        name = field.type_name.rsplit(".", 1)[-1]
        entry = nested.get(name)
        if entry is not None and entry.options.map_entry:
            key, value = (_declared_type(f, nested) for f in entry.field)
            return f"map<{key},{value}>"
        base = name
    else:
        base = _SCALARS[field.type]
    if field.label == _FD.LABEL_REPEATED:
        return "repeated " + base
    return "optional " + base if field.proto3_optional else base


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


def test_proto_declares_the_same_messages_fields_numbers_and_types(
        compiled: descriptor_pb2.FileDescriptorProto) -> None:
    declared = {m.name: m for m in compiled.message_type}
    assert set(declared) == {t.__name__ for t in ALL_TYPES}
    for cls in ALL_TYPES:
        info = mi.type_info(cls)
        assert isinstance(info, mi.StructType)
        message = declared[cls.__name__]
        nested = {n.name: n for n in message.nested_type}
        theirs = {f.name: (f.number, _declared_type(f, nested)) for f in message.field}
        # Numbers follow the struct's field order, so a field added last keeps the rest.
        ours = {f.name: (number, _proto_type(f.type))
                for number, f in enumerate(info.fields, start=1)}
        assert theirs == ours, cls.__name__


def test_proto_service_has_one_rpc_per_request(
        compiled: descriptor_pb2.FileDescriptorProto) -> None:
    [service] = compiled.service
    prefix = f".{compiled.package}."
    rpcs = {m.name: (m.input_type, m.output_type) for m in service.method}
    assert set(rpcs) == {t.__name__ for t in REQUEST_TYPES}
    for name, (request, reply) in rpcs.items():
        assert request == prefix + name
        assert reply.removeprefix(prefix) in {t.__name__ for t in RESPONSE_TYPES}


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
