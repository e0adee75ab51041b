"""The fleet's commands: ``fleet init`` (the schema and the two roles of a shared store)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .common import EXIT_OK, UsageError
from .render import print_json

if TYPE_CHECKING:
    import argparse

    from ..config import Paths

__all__ = ["cmd_fleet_init"]


def cmd_fleet_init(args: argparse.Namespace, paths: Paths) -> int:
    import anyio  # here: the parser imports this module for every command

    from ..local.paths import redact_url, resolve_store
    from ..store.postgres import check_identifier, fleet_sql, init_fleet

    try:
        schema = check_identifier(args.schema, "--schema")
        control = check_identifier(args.control_role, "--control-role")
        runner = check_identifier(args.runner_role, "--runner-role")
        url = None if args.print_sql else resolve_store(os.environ, args.store)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if control == runner:
        raise UsageError("--control-role and --runner-role must be two different roles")
    if args.print_sql:
        print(fleet_sql(schema, control, runner), end="")
        return EXIT_OK
    if url is None:
        raise UsageError("give the administrator's URL (--store postgresql://... or "
                         "STIGMER_STORE_URL), or --print-sql to run the SQL yourself")
    version = anyio.run(init_fleet, url, schema, control, runner)
    if args.json:
        print_json({"store": redact_url(url), "schema": schema, "schema_version": version,
                    "control_role": control, "runner_role": runner})
    else:
        print(f"schema {schema} at version {version} in {redact_url(url)}; roles {control} "
              f"(control hosts) and {runner} (runner hosts) can log in once you give them "
              "passwords (ALTER ROLE ... PASSWORD, or your pg_hba.conf)")
    return EXIT_OK
