"""The master key's backup: wrapped under a passphrase, in a versioned, documented file.

Format (``stigmer-broker key backup``, version 1): one JSON object,

    {"format": "stigmer-broker key backup", "version": 1, "key_id": "<16 hex>",
     "kdf": {"name": "scrypt", "n": 131072, "r": 8, "p": 1, "salt": "<base64, 16 bytes>"},
     "cipher": "AES-256-GCM", "nonce": "<base64, 12 bytes>",
     "ciphertext": "<base64: the 32-byte key, then the 16-byte tag>"}

The passphrase is stretched with scrypt (memory-hard: 128 MiB at these
parameters, about half a second) into the AES-256-GCM key. Every field but the
ciphertext is the associated data, canonically encoded, so a changed parameter,
salt or key id fails like a wrong passphrase. ``key_id`` is the key check value
(:func:`.crypto.key_id_of`): it tells which store the key opens without the
passphrase, and is checked again after decryption. A reader takes other scrypt
parameters only within bounds (:data:`MAX_SCRYPT_MEMORY`, :data:`MAX_SCRYPT_WORK`),
checked before scrypt runs: the file, not its owner, chooses them.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from pathlib import Path
from typing import Any

from ..protocol.errors import InvalidArgument

# cryptography is imported where a key is wrapped or unwrapped: `status` reads
# backed_up_at and no_backup_line from here and must stay light.

__all__ = ["FORMAT", "MAX_SCRYPT_MEMORY", "MAX_SCRYPT_WORK", "MIN_PASSPHRASE", "BackupError",
           "backed_up_at", "backup_is_tracked", "no_backup_line", "parse_backup", "read_backup",
           "record_backup", "write_backup"]

FORMAT = "stigmer-broker key backup"
VERSION = 1
MIN_PASSPHRASE = 12
#: scrypt's cost: n=2**17, r=8 uses 128 MiB (OWASP's floor for scrypt is n=2**17, r=8, p=1)
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1
_EXPORT_WORK = SCRYPT_N * SCRYPT_R * SCRYPT_P
#: the most a backup's scrypt may ask of us, checked before it runs (a crafted file asking
#: n=2**20, r=32, p=16 took 143 s and 4.2 GB): twice the memory of what `key export`
#: writes (128·n·r bytes: 256 MiB) and four times its work (n·r·p)
MAX_SCRYPT_MEMORY = 2 * 128 * SCRYPT_N * SCRYPT_R
MAX_SCRYPT_WORK = 4 * _EXPORT_WORK
NONCE_SIZE = 12


class BackupError(InvalidArgument):
    """A backup file cannot be read or does not open (the message says which)."""


def write_backup(key: bytes, passphrase: str, *, n: int = SCRYPT_N) -> str:
    """Return the text of a backup of ``key`` under ``passphrase``."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from .crypto import key_id_of

    header: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "key_id": key_id_of(key),
        "kdf": {"name": "scrypt", "n": n, "r": SCRYPT_R, "p": SCRYPT_P,
                "salt": _b64(os.urandom(16))},
        "cipher": "AES-256-GCM", "nonce": _b64(os.urandom(NONCE_SIZE))}
    wrapping = _stretch(passphrase, header["kdf"])
    ciphertext = AESGCM(wrapping).encrypt(base64.b64decode(header["nonce"]), key,
                                          _associated(header))
    return json.dumps({**header, "ciphertext": _b64(ciphertext)}, indent=2) + "\n"


def read_backup(text: str, passphrase: str, where: str) -> bytes:
    """Return the key a backup holds. Raises BackupError naming ``where``."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from .crypto import key_id_of

    header, ciphertext = parse_backup(text, where)
    try:
        key = AESGCM(_stretch(passphrase, header["kdf"])).decrypt(
            base64.b64decode(header["nonce"]), ciphertext, _associated(header))
    except InvalidTag:
        raise BackupError(f"{where}: wrong passphrase, or the file was changed") from None
    if key_id_of(key) != header["key_id"]:
        raise BackupError(f"{where}: the key does not match its key id; the file was changed")
    return key


def parse_backup(text: str, where: str) -> tuple[dict[str, Any], bytes]:
    """The header (everything but the ciphertext) and the ciphertext, checked for shape."""
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError
        if doc.get("version") != VERSION:
            raise BackupError(f"{where}: backup version {doc.get('version')!r} is not one this "
                              f"stigmer-broker reads ({VERSION}); use a newer one")
        kdf = doc["kdf"]
        if kdf["name"] != "scrypt" or doc["cipher"] != "AES-256-GCM":
            raise ValueError
        _check_kdf(kdf, where)
        ciphertext = base64.b64decode(doc.pop("ciphertext"), validate=True)
        base64.b64decode(kdf["salt"], validate=True)
        if len(base64.b64decode(doc["nonce"], validate=True)) != NONCE_SIZE:
            raise ValueError
        if not isinstance(doc["key_id"], str):
            raise ValueError
    except BackupError:
        raise
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise BackupError(f"{where}: not a stigmer-broker key backup (or damaged)") from None
    return doc, ciphertext


def _check_kdf(kdf: dict[str, Any], where: str) -> None:
    """Refuse scrypt parameters that are not whole numbers scrypt takes, or that would cost
    more than :data:`MAX_SCRYPT_MEMORY` or :data:`MAX_SCRYPT_WORK`. Raises BackupError."""
    n, r, p = kdf["n"], kdf["r"], kdf["p"]
    # bool is an int to Python (n=true would reach scrypt as 1): exact ints only
    if not all(type(v) is int for v in (n, r, p)):
        raise BackupError(f"{where}: the backup's KDF parameters (n, r, p) are not whole "
                          "numbers; the file was changed or damaged")
    if n < 2 or n & (n - 1) or r < 1 or p < 1 or 128 * n * r > MAX_SCRYPT_MEMORY \
            or n * r * p > MAX_SCRYPT_WORK:
        raise BackupError(
            f"{where}: the backup's KDF parameters are out of bounds (scrypt n={n}, r={r}, "
            f"p={p}; this stigmer-broker reads n a power of two, at most "
            f"{MAX_SCRYPT_MEMORY // 2**20} MiB and {MAX_SCRYPT_WORK // _EXPORT_WORK}x the work "
            "of what `key export` writes); it was not made by `key export`, or was changed")


def record_backup(record: Path, key_id: str, file: Path) -> None:
    """Note that the key ``key_id`` was exported (for `status`: a backup exists)."""
    tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"key_id": key_id, "at": time.time(), "file": str(file)}, f)
    os.replace(tmp, record)


def backup_is_tracked(key_source: str) -> bool:
    """Whether the broker keeps track of backups of a key from ``key_source``: a key handed
    in (``STIGMER_ENCRYPTION_KEY``, a systemd credential, a key command) is backed up where
    it comes from, which the broker cannot see, so nothing warns about it."""
    return not key_source.startswith(("env (", "systemd credential", "command ("))


def no_backup_line(key_source: str) -> str:
    """What start, serve and status say while the current key has no backup."""
    return (f"the master key is kept in {key_source} and has no backup since it was made or "
            "rotated: `stigmer-broker key export --out FILE` makes one")


def backed_up_at(record: Path, key_id: str) -> float | None:
    """When the key ``key_id`` was last exported, or None: never, or only an older key
    (before a rotation). The record only informs people; nothing depends on it."""
    try:
        doc = json.loads(record.read_text())
        return float(doc["at"]) if doc.get("key_id") == key_id else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _stretch(passphrase: str, kdf: dict[str, Any]) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=base64.b64decode(kdf["salt"]), length=32, n=kdf["n"], r=kdf["r"],
                  p=kdf["p"]).derive(passphrase.encode("utf-8", "surrogatepass"))


def _associated(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
