"""Sealing and opening values with AES-256-GCM, bound to their place.

Theory of operation: the master key never seals a value itself. It wraps a few
random *data keys*, and data keys seal the rows (envelope encryption), so a new
master key rewraps a handful of keys instead of rewriting every row.

Every ciphertext is an envelope::

    version (1 byte) | key id length (1 byte) | key id | nonce (12 bytes) | ciphertext+tag

and is sealed with associated data naming its :class:`Place` (table, owning
record, variable name) plus the key id, so a ciphertext copied to any other
place, or relabelled with another key id, fails to open. Every failure to open,
whatever the cause, is one :class:`SealError` that says nothing about which
check failed and never carries the data; it is internal to the store layer,
which translates it before it reaches a client.

Rows that say *which* ciphertext a name or a token reaches (an environment's
name, a variable's flag and plain value, a token's hash, context and expiry) are
authenticated too: each carries a MAC over its :class:`Row` under a key derived
(HKDF, its own purpose label) from a data key, and so only reachable through the
master key. Deriving from the data key rather than the master key means a master
key rotation, which rewraps the data keys, re-authenticates every row (and the
audit chain) without rewriting them, with the rotation's own crash safety.

This is the only module that imports ``cryptography``'s hazmat layer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
from collections.abc import Callable, Iterable, Mapping

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .schema import (
    CONTEXTS,
    DATA_KEYS,
    ENVIRONMENT_VERSIONS,
    ENVIRONMENTS,
    TOKENS,
    TOMBSTONES,
    VARIABLES,
)

__all__ = [
    "KEY_SIZE", "DataKeys", "Place", "Row", "SealError", "binding", "envelope_key_id", "key_id_of",
    "new_key", "open_sealed", "seal", "unwrap_data_key", "wrap_data_key",
]

KEY_SIZE = 32
NONCE_SIZE = 12
_MAC_SIZE = 32  # HMAC-SHA256
FORMAT_VERSION = 1
_AD_ENCODER = msgspec.msgpack.Encoder()
_ROW_MAC_LABEL = b"stigmer-broker row mac v1"
_CHAIN_LABEL = b"stigmer-broker audit chain v1"


class SealError(Exception):
    """A sealed value could not be opened (wrong key, wrong place, or damaged).

    Internal to the store layer (outside the BrokerError tree on purpose): callers
    translate it into an error that names the record, never the data.
    """

    def __init__(self) -> None:
        super().__init__("sealed data could not be opened")


@dataclasses.dataclass(frozen=True, slots=True)
class Place:
    """Where a sealed value lives; its ciphertext opens there and nowhere else.

    The convention, defined here once: a place names its table (as :mod:`.schema`
    declares it), its owning record and, for a variable, its name. Build places with the
    constructors.
    """

    parts: tuple[str | int, ...]

    @property
    def table(self) -> str:
        """The table the value lives in."""
        return str(self.parts[0])

    @classmethod
    def variable(cls, env_id: int, name: str) -> Place:
        """A secret variable of an environment (environment ids are never reused)."""
        return cls((VARIABLES.name, env_id, name))

    @classmethod
    def environment_version(cls, env_id: int, version: int) -> Place:
        """One version of an environment: all its variables, sealed as one record."""
        return cls((ENVIRONMENT_VERSIONS.name, env_id, version))

    @classmethod
    def context(cls, row_id: int, execution_id: str) -> Place:
        """The sealed record of an execution context."""
        return cls((CONTEXTS.name, row_id, execution_id))

    @classmethod
    def data_key(cls, key_id: str) -> Place:
        """A data key wrapped by the master key."""
        return cls((DATA_KEYS.name, key_id))


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """What a security-relevant row says, as the tuple its MAC covers.

    The convention, defined here once: a row names its table first (as :mod:`.schema`
    declares it), then every column that decides what the row grants. Build rows with
    the constructors.
    """

    parts: tuple[str | int | float | bytes | bool | tuple[str, ...] | None, ...] = \
        dataclasses.field(repr=False)

    @classmethod
    def environment(cls, env_id: int, name: str, variables: Iterable[str]) -> Row:
        """An environment's name, its id, and the names of its variables (so a variable
        row removed or added behind the broker's back is seen)."""
        return cls((ENVIRONMENTS.name, env_id, name, tuple(sorted(variables))))

    @classmethod
    def variable(cls, env_id: int, name: str, is_secret: bool, value: str | None,
                 sealed: bytes | None) -> Row:
        """A variable: its name, secret flag, plain value or envelope."""
        return cls((VARIABLES.name, env_id, name, bool(is_secret), value, sealed))

    @classmethod
    def environment_version(cls, env_id: int, version: int, created_at: float,
                            actor_uid: int | None, changes: str, restored_from: int | None,
                            sealed: bytes) -> Row:
        """A version of an environment: its number, when and by whom it was made, what it
        changed (names), the version it restored, and its envelope."""
        return cls((ENVIRONMENT_VERSIONS.name, env_id, version, created_at, actor_uid,
                    changes, restored_from, sealed))

    @classmethod
    def context(cls, row_id: int, execution_id: str, created_at: float, expires_at: float,
                keys: str, sealed: bytes, environments: str | None = None) -> Row:
        """A context: its execution id, lifetime, key summary and envelope, and the
        versions of the environments it merged (rows from before versions were kept have
        none, and keep their old MAC)."""
        parts = (CONTEXTS.name, row_id, execution_id, created_at, expires_at, keys, sealed)
        return cls(parts if environments is None else (*parts, environments))

    @classmethod
    def tombstone(cls, row_id: int, execution_id: str, expires_at: float) -> Row:
        """A completed context: its row, and until when a copy of that row would still be
        served (so the tombstone cannot be made to expire sooner)."""
        return cls((TOMBSTONES.name, row_id, execution_id, expires_at))

    @classmethod
    def token(cls, token_id: str, hash_: bytes, context_id: int, created_at: float,
              expires_at: float, max_uses: int | None, uses: int,
              runners: str | None = None) -> Row:
        """A token: its hash, context, lifetime and bound. The use count of a bounded
        token is covered too (each use is written durably anyway); an unlimited token's
        count is not (it changes in batches and grants nothing). A runner grant (a token
        row that no token opens) adds its selectors; rows without keep their old MAC."""
        parts = (TOKENS.name, token_id, hash_, context_id, created_at, expires_at, max_uses,
                 uses if max_uses is not None else None)
        return cls(parts if runners is None else (*parts, runners))


def key_id_of(key: bytes) -> str:
    """Return a short public id of ``key`` (HMAC of a constant: reveals nothing of it).

    Stored beside the data as a key check value: a key whose id differs from the
    stored one is the wrong key, known before any row is touched.
    """
    return hmac.new(key, b"stigmer-broker key id v1", hashlib.sha256).hexdigest()[:16]


def _associated_data(place: Place, key_id: str) -> bytes:
    return _AD_ENCODER.encode(("stigmer-broker", FORMAT_VERSION, *place.parts, key_id))


def seal(key: bytes, key_id: str, plaintext: bytes, place: Place, *,
         nonce_source: Callable[[int], bytes] = os.urandom) -> bytes:
    """Return the envelope of ``plaintext`` sealed under ``key`` for ``place``.

    ``nonce_source`` exists so tests can fix the nonce; production uses a fresh
    random 96-bit nonce per call.
    """
    kid = key_id.encode("ascii")
    if not 0 < len(kid) < 256:
        raise ValueError("key id must be 1 to 255 ASCII bytes")
    nonce = nonce_source(NONCE_SIZE)
    ciphertext = AESGCM(key).encrypt(nonce, plaintext, _associated_data(place, key_id))
    return bytes((FORMAT_VERSION, len(kid))) + kid + nonce + ciphertext


def envelope_key_id(envelope: bytes) -> str:
    """Return the key id an envelope names. Raises SealError when it is malformed."""
    if len(envelope) < 2 or envelope[0] != FORMAT_VERSION:
        raise SealError()
    end = 2 + envelope[1]
    if len(envelope) < end + NONCE_SIZE + 16:
        raise SealError()
    try:
        return envelope[2:end].decode("ascii")
    except UnicodeDecodeError:
        raise SealError() from None


def open_sealed(keys: Mapping[str, bytes], envelope: bytes, place: Place) -> bytes:
    """Return the plaintext of ``envelope`` sealed for ``place`` under one of ``keys``.

    Raises SealError for any failure: unknown key, other place, damaged bytes.
    """
    key_id = envelope_key_id(envelope)
    key = keys.get(key_id)
    if key is None:
        raise SealError()
    start = 2 + envelope[1]
    nonce = envelope[start:start + NONCE_SIZE]
    try:
        return AESGCM(key).decrypt(nonce, envelope[start + NONCE_SIZE:],
                                   _associated_data(place, key_id))
    except (InvalidTag, ValueError):
        raise SealError() from None


class DataKeys:
    """The unwrapped data keys, and which one seals new values (the first one)."""

    def __init__(self, keys: Mapping[str, bytes], active: str) -> None:
        if active not in keys:
            raise ValueError("the active data key must be among the keys")
        self._keys = dict(keys)
        self._ciphers = {kid: AESGCM(key) for kid, key in self._keys.items()}  # made once
        self._row_macs = {kid: _derive(key, _ROW_MAC_LABEL) for kid, key in self._keys.items()}
        self._chain_macs = {kid: _derive(key, _CHAIN_LABEL) for kid, key in self._keys.items()}
        self.active = active

    def __repr__(self) -> str:
        return f"DataKeys(active={self.active!r}, ids={sorted(self._keys)!r})"

    def seal(self, plaintext: bytes, place: Place) -> bytes:
        """Seal under the active data key."""
        return seal(self._keys[self.active], self.active, plaintext, place)

    def open(self, envelope: bytes, place: Place) -> bytes:
        """Open an envelope sealed by any of these keys. Raises SealError."""
        return self.open_bound(envelope, binding(envelope, place))

    def open_bound(self, envelope: bytes, bound: bytes) -> bytes:
        """Open an envelope with its :func:`binding` computed beforehand (the fetch path
        keeps one per context). Raises SealError."""
        key_id = envelope_key_id(envelope)
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise SealError()
        start = 2 + envelope[1]
        try:
            return cipher.decrypt(envelope[start:start + NONCE_SIZE],
                                  envelope[start + NONCE_SIZE:], bound)
        except (InvalidTag, ValueError):
            raise SealError() from None


    def mac(self, row: Row) -> bytes:
        """Return the MAC of ``row`` under the active data key (its id in front)."""
        return _tagged(self.active,
                       _hmac(self._row_macs[self.active], _AD_ENCODER.encode(row.parts)))

    def check(self, row: Row, mac: bytes | None) -> bool:
        """Return whether ``mac`` is a MAC of ``row`` under any of these keys."""
        if not mac or len(mac) != 1 + mac[0] + _MAC_SIZE:
            return False
        try:
            key = self._row_macs.get(mac[1:1 + mac[0]].decode("ascii"))
        except UnicodeDecodeError:
            return False
        return key is not None and hmac.compare_digest(
            mac[1 + mac[0]:], _hmac(key, _AD_ENCODER.encode(row.parts)))

    def chain(self, prev: str, body: bytes) -> str:
        """Return the audit chain link after ``prev`` for ``body``: ``<key id>:<hex MAC>``."""
        mac = _hmac(self._chain_macs[self.active], _chain_input(prev, body))
        return f"{self.active}:{mac.hex()}"

    def chain_ok(self, prev: str, body: bytes, link: str) -> bool:
        """Return whether ``link`` is the audit chain link after ``prev`` for ``body``."""
        kid, _, mac = link.partition(":")
        key = self._chain_macs.get(kid)
        return key is not None and hmac.compare_digest(
            mac.encode(), _hmac(key, _chain_input(prev, body)).hex().encode())


def _derive(key: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=SHA256(), length=KEY_SIZE, salt=None, info=label).derive(key)


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def _tagged(key_id: str, mac: bytes) -> bytes:
    kid = key_id.encode("ascii")
    return bytes((len(kid),)) + kid + mac


def _chain_input(prev: str, body: bytes) -> bytes:
    return _AD_ENCODER.encode((prev, body))


def binding(envelope: bytes, place: Place) -> bytes:
    """Return the associated data that binds ``envelope`` to ``place``. Raises SealError."""
    return _associated_data(place, envelope_key_id(envelope))


def wrap_data_key(master: bytes, master_id: str, data_key_id: str, data_key: bytes) -> bytes:
    """Seal a data key under the master key, bound to the data key's id."""
    return seal(master, master_id, data_key, Place.data_key(data_key_id))


def unwrap_data_key(master: bytes, master_id: str, data_key_id: str, wrapped: bytes) -> bytes:
    """Open a wrapped data key. Raises SealError."""
    key = open_sealed({master_id: master}, wrapped, Place.data_key(data_key_id))
    if len(key) != KEY_SIZE:
        raise SealError()
    return key


def new_key() -> bytes:
    """Return 32 fresh random bytes."""
    return os.urandom(KEY_SIZE)

