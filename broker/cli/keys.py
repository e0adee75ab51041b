"""The master-key commands: key rotate."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from ..protocol.errors import BrokerError
from .common import EXIT_OK, connect

if TYPE_CHECKING:
    import argparse

    from ..config import Paths
    from ..protocol import KeyRotated

__all__ = ["cmd_key_rotate"]


def cmd_key_rotate(args: argparse.Namespace, paths: Paths) -> int:
    import threading

    print("rotating the master key (rewrapping data keys, checking every sealed value)...",
          file=sys.stderr)
    results: list[KeyRotated] = []
    failures: list[BrokerError] = []

    def rotate() -> None:
        try:
            with connect(paths) as client:
                client.timeout = max(client.timeout, 3600.0)
                results.append(client.rotate_key())
        except BrokerError as exc:
            failures.append(exc)

    worker = threading.Thread(target=rotate, daemon=True)
    worker.start()
    shown = ""
    with connect(paths) as watcher:  # a second connection reports progress meanwhile
        while worker.is_alive():
            worker.join(0.5)
            if worker.is_alive():
                activity = watcher.status().activity
                if activity and activity != shown:
                    print(f"  {activity}", file=sys.stderr)
                    shown = activity
    if failures:
        raise failures[0]
    result = results[0]
    print(f"master key rotated: new key id {result.key_id}, {result.rewrapped} data key(s) "
          f"rewrapped, kept in {result.key_source}")
    return EXIT_OK

