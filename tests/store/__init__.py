"""The store contract suite (a package: its conftest must not shadow tests/conftest.py,
which the other test modules import as ``conftest``)."""
