"""A keyring backend held in memory, so tests never touch the machine's keychain."""

from __future__ import annotations

import keyring.backend


class MemoryKeyring(keyring.backend.KeyringBackend):
    priority = 10

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.entries: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.entries.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.entries[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self.entries.pop((service, username), None)


class PlaintextKeyring(MemoryKeyring):
    """Stands in for keyrings.alt's plaintext file backend."""


PlaintextKeyring.__module__ = "keyrings.alt.file"


class BrokenKeyring(MemoryKeyring):
    """A keychain that is there but fails (locked, D-Bus gone)."""

    def get_password(self, service: str, username: str) -> str | None:
        raise RuntimeError("the keychain is locked")
