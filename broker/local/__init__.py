"""The rules of the local machine that the daemon and its clients share, beside the wire.

:mod:`.paths` (where the home, the socket and the store are), :mod:`.peer` (who is
on the other end of the socket, from the kernel, and what the daemon makes of
it) and :mod:`.trust` (which directories and sockets are private enough). Stdlib
only; this package imports nothing else of ``stigmer.broker``, so
``stigmer.client`` may import it beside :mod:`~stigmer.broker.protocol`.
"""
