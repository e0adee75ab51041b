"""The async client (anyio). ``client.py`` here is the one hand-written definition of
the client API; ``client/_sync/client.py`` is generated from it (``make unasync``)."""
