"""Sealing: round trips, binding to the place, every flipped byte, fresh nonces."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stigmer.broker.store.crypto import (
    NONCE_SIZE,
    DataKeys,
    Place,
    Row,
    SealError,
    key_id_of,
    new_key,
    open_sealed,
    seal,
    unwrap_data_key,
    wrap_data_key,
)

KEY = bytes(range(32))
KID = key_id_of(KEY)
PLACE = Place.variable(7, "API_KEY")


@given(st.binary(max_size=4096))
@settings(max_examples=100, deadline=None)
def test_round_trip(data: bytes) -> None:
    assert open_sealed({KID: KEY}, seal(KEY, KID, data, PLACE), PLACE) == data


@pytest.mark.parametrize("other", [
    Place.variable(8, "API_KEY"),  # another environment
    Place.variable(7, "OTHER"),  # another variable
    Place.context(7, "API_KEY"),  # another table
    Place(("variables", "7", "API_KEY")),  # same text, other type
])
def test_moved_ciphertext_does_not_open(other: Place) -> None:
    envelope = seal(KEY, KID, b"secret", PLACE)
    with pytest.raises(SealError):
        open_sealed({KID: KEY}, envelope, other)


def test_every_flipped_byte_fails_cleanly() -> None:
    envelope = seal(KEY, KID, b"secret value", PLACE)
    for i in range(len(envelope)):
        for bit in (0x01, 0x80):
            damaged = bytearray(envelope)
            damaged[i] ^= bit
            with pytest.raises(SealError) as info:
                open_sealed({KID: KEY}, bytes(damaged), PLACE)
            assert str(info.value) == "sealed data could not be opened"


def test_truncations_fail_cleanly() -> None:
    envelope = seal(KEY, KID, b"secret value", PLACE)
    for n in range(len(envelope)):
        with pytest.raises(SealError):
            open_sealed({KID: KEY}, envelope[:n], PLACE)


def test_relabelled_key_id_fails() -> None:
    other = new_key()
    other_id = key_id_of(other)
    envelope = seal(KEY, KID, b"x", PLACE)
    relabelled = envelope.replace(KID.encode(), other_id.encode())
    with pytest.raises(SealError):
        open_sealed({KID: KEY, other_id: other}, relabelled, PLACE)


def test_nonces_never_repeat() -> None:
    start = 2 + len(KID)
    nonces = {seal(KEY, KID, b"x", PLACE)[start:start + NONCE_SIZE] for _ in range(20000)}
    assert len(nonces) == 20000


def test_fixed_nonce_is_deterministic_for_tests() -> None:
    a = seal(KEY, KID, b"x", PLACE, nonce_source=lambda n: b"\x00" * n)
    b = seal(KEY, KID, b"x", PLACE, nonce_source=lambda n: b"\x00" * n)
    assert a == b


def test_data_keys_wrap_and_rotate() -> None:
    master, master2 = new_key(), new_key()
    dk = new_key()
    wrapped = wrap_data_key(master, key_id_of(master), "dk-1", dk)
    assert unwrap_data_key(master, key_id_of(master), "dk-1", wrapped) == dk
    with pytest.raises(SealError):
        unwrap_data_key(master2, key_id_of(master2), "dk-1", wrapped)
    with pytest.raises(SealError):
        unwrap_data_key(master, key_id_of(master), "dk-2", wrapped)
    keys = DataKeys({"dk-1": dk}, "dk-1")
    assert keys.open(keys.seal(b"v", PLACE), PLACE) == b"v"
    assert "dk-1" in repr(keys)
    assert dk.hex() not in repr(keys)


def test_key_id_reveals_nothing_obvious() -> None:
    assert KEY.hex()[:16] != KID
    assert len(KID) == 16


def test_places_and_rows_name_the_tables_stores_already_hold() -> None:
    """A table's name is part of every envelope's associated data and every row MAC, and
    is taken from broker/store/schema.py: renaming a table there must fail here, not
    every existing store's rows."""
    places = [Place.variable(1, "A"), Place.context(1, "x"), Place.data_key("dk-1")]
    assert [p.table for p in places] == ["variables", "contexts", "data_keys"]
    rows = [Row.environment(1, "e", ["A"]), Row.variable(1, "A", False, "v", None),
            Row.context(1, "x", 0.0, 1.0, "A", b""), Row.tombstone(1, "x", 1.0),
            Row.token("t", b"h", 1, 0.0, 1.0, None, 0)]
    assert [r.parts[0] for r in rows] == ["environments", "variables", "contexts",
                                          "tombstones", "tokens"]
