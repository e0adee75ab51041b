"""The audit commands: audit, audit verify, audit quarantine."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

from .common import EXIT_FAILED, EXIT_OK, connect, count_arg, name_arg
from .render import error, plural, print_json, when

if TYPE_CHECKING:
    import argparse

    from ..config import Paths

__all__ = ["cmd_audit", "cmd_audit_quarantine", "cmd_audit_verify"]


#: a Unix time in an audit detail ("expires 1796267971"): the record keeps the number (it
#: is chained as written, and --json shows it), people see the time
_EPOCH = re.compile(r"(?<=expires )(\d{9,11})(?:\.\d+)?\b")


def _iso(match: re.Match[str]) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(int(match.group(1))))


def cmd_audit(args: argparse.Namespace, paths: Paths) -> int:
    execution_id = name_arg(args.execution, "--execution") if args.execution else None
    limit = count_arg(args.limit, "--limit", 1, 10_000_000) or 100
    with connect(paths) as client:
        records = client.audit(execution_id, limit)
    if args.json:
        import msgspec

        print_json(msgspec.to_builtins(records))
        return EXIT_OK
    if not records:
        print("no audit records" + (f" of execution {execution_id}" if execution_id else ""))
    for r in records:
        who = f"uid {r.peer_uid} pid {r.peer_pid}" if r.peer_uid is not None else "broker"
        token = f" {r.token_id}" if r.token_id else ""
        detail = f" ({_EPOCH.sub(_iso, r.detail)})" if r.detail else ""
        print(f"{r.seq:>6}  {when(r.at)}  {r.event:<18} {r.outcome:<8} "
              f"{r.execution_id or '-'}{token}  {who}{detail}")
    return EXIT_OK


def cmd_audit_verify(args: argparse.Namespace, paths: Paths) -> int:
    with connect(paths) as client:
        result = client.verify_audit()
    if args.json:
        print_json({"ok": result.ok, "records": result.records,
                    "first_broken": result.first_broken, "reason": result.reason,
                    "anchored": result.anchored, "removed_through": result.removed_through})
        return EXIT_OK if result.ok else EXIT_FAILED
    if result.ok:
        removed = (f", records through {result.removed_through} removed by retention behind "
                   "a checkpoint" if result.removed_through else "")
        print(f"audit chain intact ({plural(result.records, 'record')}{removed})")
        if result.anchored is None:
            print("no head anchor yet: removal of the newest records is not checked")
        else:
            print(f"head anchored at record {result.anchored}")
        return EXIT_OK
    if result.first_broken is None:
        error(f"audit chain not verified: {result.reason}")
        return EXIT_FAILED
    error(f"audit chain broken at record {result.first_broken}: {result.reason}")
    return EXIT_FAILED



def cmd_audit_quarantine(args: argparse.Namespace, paths: Paths) -> int:
    seq = count_arg(args.seq, "SEQ", 1, 2**63 - 1)
    assert seq is not None  # a positional argument is always given
    with connect(paths) as client:
        client.quarantine_audit(seq)
    if args.json:
        print_json({"quarantined": seq})
        return EXIT_OK
    print(f"audit record {seq} quarantined: kept aside in the store's audit_quarantine "
          "table, and the chain names it; `stigmer-broker audit verify` checks the rest")
    return EXIT_OK
