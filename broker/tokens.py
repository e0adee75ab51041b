"""Execution tokens: ``stg_`` + 256 random bits, kept only as a SHA-256 hash.

The prefix lets secret scanners recognise a leaked token. The token is shown
once, when it is issued; the store and the daemon's memory keep its hash and a
short public id (``tok_...``) that logs, audit records and ``context show`` use.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import secrets

__all__ = ["PREFIX", "NewToken", "new_token", "token_hash"]

PREFIX = "stg_"


@dataclasses.dataclass(frozen=True, slots=True)
class NewToken:
    token: str = dataclasses.field(repr=False)
    token_id: str
    hash: bytes = dataclasses.field(repr=False)


def new_token() -> NewToken:
    """Return a fresh token, its public id and its hash."""
    raw = secrets.token_bytes(32)
    token = PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
    return NewToken(token=token, token_id="tok_" + secrets.token_hex(6), hash=token_hash(token))


def token_hash(token: str) -> bytes:
    """Return the hash under which a token is stored and looked up."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
