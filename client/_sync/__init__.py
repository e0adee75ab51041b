"""The blocking client: ``client.py`` is generated from ``client/_async/client.py``
(``make unasync``; ``make lint`` fails when it is stale); ``transport.py`` is its own."""
