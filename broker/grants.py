"""Runner grants: who may open a context by its execution id alone.

A grant is a list of selectors, alternatives to one another; a selector is one
or more terms joined by commas, all of which must match the calling process:

* ``user:NAME|UID``: the peer's uid (from SO_PEERCRED);
* ``group:NAME|GID``: its primary or one of its supplementary groups (as the
  connection carries them: SO_PEERGROUPS);
* ``exe:/abs/path`` or ``exe:/abs/path@sha256:HEX``: the binary the process runs
  (``/proc/PID/exe``, which must be the file at that path as the broker sees it),
  and optionally that binary's SHA-256;
* ``self``: the broker owner's uid.

Names are resolved once, when the context is created, and the canonical text
(``user:1001,exe:/usr/bin/python3.11``) is what the store keeps and MACs. The
calling process is described by an :class:`~.local.peer.Attestation`, read
by the daemon (:mod:`.daemon.attest`); matching reads nothing itself, and asks the
attestation for the binary only when an ``exe:`` term needs it.
"""

from __future__ import annotations

import functools
import grp
import hmac
import pwd
import re
from collections.abc import Callable, Iterable
from typing import NamedTuple

from .local.peer import Attestation
from .protocol.errors import InvalidArgument

__all__ = ["Term", "canonical_grants", "hashes_binaries", "matching_selector", "parse_selector"]

_DIGEST = re.compile(r"[0-9a-f]{64}")


class Term(NamedTuple):
    """One condition: ``kind`` is user, group or exe; ``digest`` only for exe."""

    kind: str
    value: int | str
    digest: str = ""

    def __str__(self) -> str:
        if self.kind == "exe" and self.digest:
            return f"exe:{self.value}@sha256:{self.digest}"
        return f"{self.kind}:{self.value}"


def parse_selector(text: str, *, owner_uid: int) -> tuple[Term, ...]:
    """Parse and resolve one ``--runner`` value; raise InvalidArgument naming the term."""
    terms = []
    for raw in text.split(","):
        term = raw.strip()
        kind, _, value = term.partition(":")
        if term == "self":
            terms.append(Term("user", owner_uid))
        elif kind == "user" and value:
            terms.append(Term("user", _resolve(value, "user", lambda n: pwd.getpwnam(n).pw_uid)))
        elif kind == "group" and value:
            terms.append(Term("group", _resolve(value, "group",
                                               lambda n: grp.getgrnam(n).gr_gid)))
        elif kind == "exe" and value:
            path, _, digest = value.partition("@")
            if not path.startswith("/") or "\0" in path:
                raise InvalidArgument(f"--runner {term!r}: exe: needs an absolute path")
            if digest:
                hexdigest = digest.removeprefix("sha256:").lower()
                if not digest.startswith("sha256:") or not _DIGEST.fullmatch(hexdigest):
                    raise InvalidArgument(f"--runner {term!r}: write the digest as "
                                          "@sha256:HEX (64 hex digits; `sha256sum PATH`)")
                digest = hexdigest
            terms.append(Term("exe", path, digest))
        else:
            raise InvalidArgument(
                f"--runner {term!r} is not a selector: use user:NAME|UID, group:NAME|GID, "
                "exe:/abs/path[@sha256:HEX] or self, joined by commas when all must match")
    return tuple(terms)


def canonical_grants(texts: Iterable[str], *, owner_uid: int) -> list[str]:
    """The selectors as the store keeps them: names resolved, duplicates dropped."""
    out: list[str] = []
    for text in texts:
        canonical = ",".join(map(str, parse_selector(text, owner_uid=owner_uid)))
        if canonical not in out:
            out.append(canonical)
    return out


def matching_selector(grants: Iterable[str], peer: Attestation) -> str | None:
    """The first stored selector that the attested process satisfies, or None.

    A selector's ``user:``/``group:`` terms are checked first, from the connection's
    credentials alone; the binary is read only for an ``exe:`` term they do not rule out.
    Raises LookupError when no selector matches and an ``exe:`` term could not be
    checked (the binary could not be read or trusted): the reason is the audit's.
    """
    problem: LookupError | None = None
    for selector in grants:
        try:
            if all(_matches(term, peer) for term in _stored_terms(selector)):
                return selector
        except LookupError as exc:
            problem = exc
    if problem is not None:
        raise problem
    return None


def hashes_binaries(grants: Iterable[str]) -> bool:
    """Whether matching may hash a binary (an ``exe:...@sha256:`` term): a read of the
    whole file, too long to do in the event loop."""
    return any(term.digest for selector in grants for term in _stored_terms(selector))


@functools.lru_cache(maxsize=4096)
def _stored_terms(selector: str) -> tuple[Term, ...]:
    """A stored (canonical) selector's terms, ``exe:`` last (the only ones that read the
    process): no names, no ``self``; parsed once."""
    return tuple(sorted(parse_selector(selector, owner_uid=-1), key=lambda t: t.kind == "exe"))


def _matches(term: Term, peer: Attestation) -> bool:
    if term.kind == "user":
        return peer.uid == term.value
    if term.kind == "group":
        return term.value == peer.gid or term.value in peer.groups
    binary = peer.binary()
    assert isinstance(term.value, str)
    # The path must name the running binary in the broker's own view of the file system
    # (same device and inode): a bind mount in another mount namespace shows the granted
    # path for a different file. Without a digest the path is all there is, so a process
    # that sees other mounts than the broker is not trusted at all.
    if binary.path != term.value or not binary.is_at(term.value):
        return False
    if not term.digest:
        return binary.own_mounts
    return hmac.compare_digest(binary.sha256(), term.digest)


def _resolve(value: str, what: str, lookup: Callable[[str], int]) -> int:
    if value.isdigit():
        return int(value)
    if "\0" in value:  # the C library cannot even look it up (getgrnam raises ValueError)
        raise InvalidArgument(f"--runner {what + ':' + value!r}: a {what} name cannot "
                              "contain a NUL byte")
    try:
        return lookup(value)
    except KeyError:
        raise InvalidArgument(f"--runner {what}:{value}: no such {what} on this host") from None
