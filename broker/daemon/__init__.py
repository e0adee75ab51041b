"""The daemon as an OS process: hardening, the listening socket, serving connections,
systemd and launchd hand-overs, and the unit installer.

:func:`.lifecycle.serve` is the whole daemon as one coroutine; :func:`.lifecycle.run`
is the process entry point the CLI calls. Requests are answered by
:mod:`stigmer.broker.dispatch`; nothing here knows what a request means.
"""
