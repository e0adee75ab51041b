"""stigmer-broker: the per-user daemon that holds the master key and the sealed store,
and hands runners their execution context over a private Unix socket.

Layers, each a folder or a module (ARCHITECTURE.md draws them):

- ``protocol/``: the wire, shared with ``stigmer.client`` (framing, messages,
  the error tree, peer credentials, socket paths);
- ``cli/``: the ``stigmer-broker`` command line;
- ``daemon/``: the OS process (hardening, listening, serving connections,
  systemd/launchd, the unit installer);
- ``dispatch.py``: one request in, one response out;
- the domain: ``environments``, ``contexts``, ``merge``, ``tokens``, ``audit``,
  ``manifests``;
- ``store/``: the sealing boundary (keys, crypto, the vault) and the storage backend;
- ``config.py``: the daemon's frozen settings.

Kept import-light on purpose: ``stigmer.client`` and ``stigmer-broker status`` import
this package, so it must not pull in the daemon's dependencies.
"""

__version__ = "0.1.0"
