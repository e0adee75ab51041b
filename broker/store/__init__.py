"""The sealing boundary and persistence: keys, crypto, the vault, the storage backend.

:mod:`.keys` finds the master key, :mod:`.crypto` seals and opens envelopes,
:mod:`.vault` is what domain code seals and opens values through, and
:mod:`.sqlite` is the embedded storage backend. Nothing above this package
touches a key or imports ``cryptography``, ``keyring`` or ``aiosqlite``.
"""
