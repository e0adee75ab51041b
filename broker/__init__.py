"""stigmer-broker: the per-user daemon that holds the master key and the sealed store,
and hands runners their execution context over a private Unix socket.

Kept import-light on purpose: ``stigmer.client`` and ``stigmer-broker status`` import
this package, so it must not pull in the daemon's dependencies. The daemon is
``stigmer.broker.daemon``, the CLI ``stigmer.broker.cli``, the wire protocol
``stigmer.broker.protocol``.
"""

__version__ = "0.1.0"
