"""The sealing boundary and persistence: keys, crypto, the vault, the storage backend.

:mod:`.keys` finds the master key, :mod:`.crypto` seals and opens envelopes,
:mod:`.vault` is what domain code seals and opens values through, :mod:`.schema`
declares the tables, and :mod:`.sqlite` and :mod:`.postgres` are the storage backends.
Nothing above this package touches a key or imports ``cryptography``, ``keyring``,
``aiosqlite`` or ``asyncpg``.
"""
