"""The argument parser: every command, its flags and its help, built lazily.

Only the chosen command's arguments are built (building them all costs more
than ``status`` itself); the others appear in the help as names only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from .. import __version__
from .audit import cmd_audit, cmd_audit_quarantine, cmd_audit_verify
from .backup import cmd_backup, cmd_restore
from .common import EXIT_USAGE, PROG
from .contexts import (
    cmd_context_complete,
    cmd_context_create,
    cmd_context_export,
    cmd_context_list,
    cmd_context_release,
    cmd_context_show,
    cmd_context_token,
    cmd_run,
)
from .daemon import KEY_BACKUP_DAYS, cmd_serve, cmd_start, cmd_status, cmd_stop
from .environments import (
    cmd_apply,
    cmd_env_delete,
    cmd_env_diff,
    cmd_env_history,
    cmd_env_list,
    cmd_env_rollback,
    cmd_env_set,
    cmd_env_show,
    cmd_env_unset,
)
from .fleet import cmd_fleet_init
from .keys import cmd_key_export, cmd_key_import, cmd_key_rotate
from .mcp import DEFAULT_CHECK_EVERY, cmd_mcp_proxy, cmd_mcp_render
from .service import cmd_service_install, cmd_service_uninstall
from .shell import cmd_completion, cmd_help

if TYPE_CHECKING:
    import argparse

    from ..config import Paths

__all__ = ["build_parser", "usage_error"]

Command = Callable[["argparse.Namespace", "Paths"], int]


def _group_help(group: argparse.ArgumentParser) -> Callable[[argparse.Namespace, Paths], int]:
    """A command group typed without its subcommand shows its own help (exit 2)."""
    def show(args: argparse.Namespace, paths: Paths) -> int:
        group.print_help(sys.stderr)
        return EXIT_USAGE
    return show


#: commands without --json: the daemon itself, the two whose output is the context, and
#: the one whose output is a shell script
_NO_JSON = {("", "serve"), ("", "run"), ("context", "export"), ("", "completion"),
            ("", "help"), ("mcp", "proxy")}


class _Unused:
    """Stands in for the parser of a command this run does not use: building every
    command's arguments costs more than `status` itself, so only the chosen one is built."""

    def add_argument(self, *args: Any, **kwargs: Any) -> None:
        pass

    def add_mutually_exclusive_group(self) -> _Unused:
        return self

    def add_subparsers(self, **kwargs: Any) -> _Unused:
        return self

    def add_parser(self, *args: Any, **kwargs: Any) -> _Unused:
        return self


def _chosen(argv: Sequence[str]) -> list[str]:
    """The command words in ``argv`` (``["env", "set"]``), skipping global options."""
    words: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--home", "--socket"):
            skip = True
        elif arg == "--":
            break
        elif not arg.startswith("-"):
            words.append(arg)
    return words


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    import argparse  # here, not at the top: `status` never needs it

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            """One line: what was wrong, a near miss where there is one, where help is."""
            self.exit(EXIT_USAGE, f"{PROG}: error: {usage_error(self, message)}\n")

    words = _chosen(argv)

    def wanted(*path: str) -> bool:
        return not words or words[:len(path)] == list(path) or words == list(path[:-1])

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS,
                        help="broker home (default: $STIGMER_HOME or ~/.stigmer)")
    common.add_argument("--socket", default=argparse.SUPPRESS,
                        help="socket path (default: $STIGMER_BROKER_SOCKET, "
                             "$XDG_RUNTIME_DIR/stigmer/broker.sock or HOME/run/broker.sock)")
    parser = _Parser(prog=PROG, description="The local secret broker for agent runners.",
                     parents=[common])
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace, Paths], int], help_: str,
                parent: Any = sub, group: str = "") -> Any:
        if not wanted(*([group] if group else []), name):
            parent.add_parser(name, help=help_, add_help=False)
            return _Unused()
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_,
                                                       parents=[common])
        p.set_defaults(func=func, command=[*([group] if group else []), name])
        if (group, name) not in _NO_JSON:
            p.add_argument("--json", action="store_true",
                           help="print the result as one JSON object (shapes: README)")
        return p

    p = command("serve", cmd_serve, "run the broker in the foreground (logs to stderr)")
    p.add_argument("--allow-group", metavar="GROUP",
                   help="let members of GROUP connect to fetch contexts (nothing else)")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--log-file", metavar="FILE",
                   help="log to FILE, rotated at 10 MiB keeping 3 old files (default: stderr)")
    p.add_argument("--key-fd", type=int, help=argparse.SUPPRESS)
    _key_command_argument(p)
    p.add_argument("--audit-retention", metavar="DURATION", default="90d",
                   help="remove audit records older than this, behind a checkpoint that keeps "
                        "the chain verifiable (default 90d; 'forever' keeps them all)")
    p.add_argument("--env-history", metavar="COUNT|DURATION", default="50",
                   help="keep this many versions of each environment (default 50), or those "
                        "younger than a duration such as 90d ('forever' keeps them all); the "
                        "current version is always kept")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug events too")
    _store_arguments(p)
    _metrics_argument(p)
    p = command("start", cmd_start, "start the broker in the background if it is not running")
    p.add_argument("--print-env", choices=("sh", "fish"), metavar="SHELL",
                   help="print the socket as a line for eval in sh or fish, as ssh-agent -s "
                        "does: eval \"$(stigmer-broker start --print-env sh)\"")
    p.add_argument("--allow-group", metavar="GROUP", help="as for serve")
    p.add_argument("--audit-retention", metavar="DURATION", help="as for serve")
    p.add_argument("--env-history", metavar="COUNT|DURATION", help="as for serve")
    _key_command_argument(p)
    _store_arguments(p)
    _metrics_argument(p)
    p = command("stop", cmd_stop, "stop the running broker gracefully")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for it to exit")
    p = command("status", cmd_status, "show whether the broker runs, and its figures")
    p.add_argument("--check", action="store_true",
                   help="health check: exit 0 when healthy, 1 when degraded (a line per "
                        "problem: the store, the audit chain, a key without a backup), 3 "
                        "when not running")
    p.add_argument("--key-backup-days", metavar="DAYS", default=None,
                   help="with --check: how old a key the broker keeps may grow without a "
                        f"backup before it counts as a problem (default {KEY_BACKUP_DAYS}; "
                        "0: at once)")

    env = sub.add_parser("env", help="manage environments (named sets of variables)")
    env.set_defaults(func=_group_help(env))
    env_sub = env.add_subparsers(title="env commands", metavar="COMMAND")
    p = command("set", cmd_env_set, "create an environment or set variables in it", env_sub,
                "env")
    p.add_argument("name", metavar="NAME")
    p.add_argument("pairs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="plain variables")
    p.add_argument("-s", "--secret", action="append", metavar="KEY[=VALUE]",
                   help="a secret; without =VALUE it is prompted for (or read from stdin)")
    p.add_argument("--env-file", metavar="FILE", help="read variables (as secrets) from a .env "
                   "file; the command line wins")
    p = command("show", cmd_env_show, "show an environment (secrets masked)", env_sub, "env")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--reveal", action="store_true", help="show secret values")
    p.add_argument("--version", metavar="N",
                   help="show version N of it (`env history` lists them)")
    p = command("list", cmd_env_list, "list environments", env_sub, "env")
    p = command("unset", cmd_env_unset, "remove variables from an environment", env_sub,
                "env")
    p.add_argument("name", metavar="NAME")
    p.add_argument("keys", nargs="+", metavar="KEY")
    p = command("delete", cmd_env_delete, "delete an environment", env_sub, "env")
    p.add_argument("name", metavar="NAME")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p = command("history", cmd_env_history,
                "list an environment's versions: when, by whom, which keys (names only)",
                env_sub, "env")
    p.add_argument("name", metavar="NAME")
    p = command("diff", cmd_env_diff, "compare two versions of an environment (key names)",
                env_sub, "env")
    p.add_argument("name", metavar="NAME")
    p.add_argument("from_version", metavar="A")
    p.add_argument("to_version", metavar="B")
    p.add_argument("--reveal", action="store_true", help="show the values too, secrets included")
    p = command("rollback", cmd_env_rollback,
                "set an environment back to an earlier version (written as a new version)",
                env_sub, "env")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--to", required=True, metavar="N", help="the version to go back to")

    p = command("apply", cmd_apply, "apply Environment manifests (YAML, one or more documents)")
    p.add_argument("-f", "--file", required=True, metavar="FILE", help="manifest file, - for stdin")
    p.add_argument("--dry-run", action="store_true",
                   help="print the keys each environment would gain, change and lose; change "
                        "nothing")

    ctx = sub.add_parser("context", help="execution contexts: create, tokens, show, complete")
    ctx.set_defaults(func=_group_help(ctx))
    ctx_sub = ctx.add_subparsers(title="context commands", metavar="COMMAND")
    p = command("create", cmd_context_create,
                "merge spec < environments < runtime into a context; print its token",
                ctx_sub, "context")
    p.add_argument("execution_id", metavar="EXEC_ID")
    p.add_argument("--environment", action="append", metavar="NAME",
                   help="an environment to merge, in order (repeatable)")
    p.add_argument("--spec", metavar="FILE", help="Agent/Workflow manifest or bare env_spec map "
                   "(YAML or JSON)")
    p.add_argument("-e", "--env", action="append", metavar="KEY=VALUE",
                   help="a runtime variable")
    p.add_argument("-s", "--secret", action="append", metavar="KEY[=VALUE]",
                   help="a runtime secret; without =VALUE it is prompted for (or read from stdin)")
    p.add_argument("--env-file", metavar="FILE", help="runtime variables (as secrets) from a "
                   ".env file; --env/--secret win")
    p.add_argument("--ttl", default="24h", help="context lifetime (default 24h)")
    p.add_argument("--token-ttl", default="15m", help="token lifetime (default 15m)")
    p.add_argument("--max-uses", metavar="N", help="fetches the token allows (at least 1); "
                   "also bounds the fetches of the runners granted")
    p.add_argument("--runner", action="append", metavar="SELECTOR",
                   help="who may open the context by its execution id alone: user:NAME|UID, "
                        "group:NAME|GID, exe:/abs/path[@sha256:HEX] or self; terms joined by "
                        "commas must all match; repeat for alternatives. No token is issued "
                        "then, unless --with-token")
    p.add_argument("--with-token", action="store_true",
                   help="with --runner: issue a token as well")
    p = command("token", cmd_context_token, "issue another token for a context", ctx_sub,
                "context")
    p.add_argument("execution_id", metavar="EXEC_ID")
    p.add_argument("--ttl", default="15m", help="token lifetime (default 15m)")
    p.add_argument("--max-uses", metavar="N", help="fetches the token allows (at least 1)")
    p = command("show", cmd_context_show, "keys, provenance, expiry and tokens (no values)",
                ctx_sub, "context")
    p.add_argument("execution_id", metavar="EXEC_ID")
    p = command("list", cmd_context_list, "list live contexts", ctx_sub, "context")
    p = command("complete", cmd_context_complete, "delete a context and revoke its tokens",
                ctx_sub, "context")
    p.add_argument("execution_id", metavar="EXEC_ID")
    p.add_argument("-y", "--yes", action="store_true",
                   help="do not ask for confirmation (asked when it has live tokens)")

    p = command("release", cmd_context_release,
                "end the context your token opens (the runner's own complete)", ctx_sub,
                "context")
    p.add_argument("--token", help="execution token (default: $STIGMER_EXECUTION_TOKEN)")
    p.add_argument("--execution", metavar="ID",
                   help="or the execution id of a context granted to this process (default: "
                        "$STIGMER_EXECUTION_ID)")

    p = command("export", cmd_context_export,
                "print the context for eval: eval \"$(stigmer-broker context export)\"",
                ctx_sub, "context")
    p.add_argument("--format", choices=("sh", "fish", "json", "dotenv"), default="sh",
                   help="sh (default; also bash and zsh), fish, json or dotenv")
    p.add_argument("--token", help="execution token (default: $STIGMER_EXECUTION_TOKEN)")
    p.add_argument("--execution", metavar="ID",
                   help="or the execution id of a context granted to this process (default: "
                        "$STIGMER_EXECUTION_ID)")

    p = command("run", cmd_run, "fetch a context and run COMMAND with its variables, its "
                "output masked")
    p.add_argument("--mount", action="append", metavar="PATH=FORMAT",
                   help="give COMMAND the context as a file that never touches disk: an "
                        "argument that is PATH, or ends in =PATH, becomes /dev/fd/N of a "
                        "sealed memfd holding the variables as FORMAT: env, json or yaml; "
                        "emptied when COMMAND exits (repeatable)")
    p.add_argument("--no-masking", action="store_true",
                   help="exec COMMAND as it is, its output unmasked (also "
                        "STIGMER_RUN_NO_MASKING=1)")
    p.add_argument("--token", help="execution token (default: $STIGMER_EXECUTION_TOKEN)")
    p.add_argument("--execution", metavar="ID",
                   help="or the execution id of a context granted to this process (default: "
                        "$STIGMER_EXECUTION_ID)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS]")

    mcp = sub.add_parser("mcp", help="MCP servers with the broker's secrets, their output "
                         "masked: proxy, render")
    mcp.set_defaults(func=_group_help(mcp))
    mcp_sub = mcp.add_subparsers(title="mcp commands", metavar="COMMAND")
    p = command("proxy", cmd_mcp_proxy,
                "stand in for MCP server NAME of FILE: fill its placeholders from the "
                "context, start it, relay its stdio with every secret masked", mcp_sub, "mcp")
    p.add_argument("--server", required=True, metavar="NAME", help="the server in FILE")
    p.add_argument("--config", required=True, metavar="FILE",
                   help='the MCP config ({"mcpServers": {NAME: {"command", "args", "env"}}}) '
                        "with ${VAR} and ${.secrets.VAR} placeholders")
    p.add_argument("--mount", action="append", metavar="PATH=FORMAT",
                   help="as for run: every PATH in the server's args becomes /dev/fd/N of a "
                        "sealed memfd holding the context as FORMAT (env, json or yaml)")
    p.add_argument("--check-every", default=DEFAULT_CHECK_EVERY, metavar="DURATION",
                   help="how often to fetch the context again; when the broker refuses "
                        f"(the context ended), the server is stopped (default "
                        f"{DEFAULT_CHECK_EVERY})")
    p.add_argument("--token", help="execution token (default: $STIGMER_EXECUTION_TOKEN)")
    p.add_argument("--execution", metavar="ID",
                   help="or the execution id of a context granted to this process (default: "
                        "$STIGMER_EXECUTION_ID)")
    p = command("render", cmd_mcp_render,
                "move the values of an MCP config into an environment (as secrets), leave "
                "placeholders, and write a config whose servers run through mcp proxy",
                mcp_sub, "mcp")
    p.add_argument("file", metavar="FILE",
                   help="the MCP config to take the values from (rewritten with placeholders)")
    p.add_argument("--into", required=True, metavar="ENV",
                   help="the environment the values move into")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="where to write the config for the MCP client (- for stdout)")
    p.add_argument("--execution", metavar="ID",
                   help="have each proxy open this execution id's context (granted to the "
                        "client's uid with context create --runner); default: the proxy's "
                        "$STIGMER_EXECUTION_TOKEN or $STIGMER_EXECUTION_ID")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would move, by name only; change nothing")

    p = command("audit", cmd_audit, "show the audit log")
    p.add_argument("--execution", metavar="ID", help="only this execution's records")
    p.add_argument("--limit", default="100", help="newest N records (default 100)")
    audit_sub = p.add_subparsers(title="audit commands", metavar="COMMAND")
    command("verify", cmd_audit_verify, "check the audit log's hash chain", audit_sub, "audit")
    p = command("quarantine", cmd_audit_quarantine, "move the bad record `audit verify` names "
                "out of the chain, kept aside as evidence", audit_sub, "audit")
    p.add_argument("seq", metavar="SEQ", help="the record's sequence number")

    svc = sub.add_parser("service", help="run the broker as a systemd/launchd user service")
    svc.set_defaults(func=_group_help(svc))
    svc_sub = svc.add_subparsers(title="service commands", metavar="COMMAND")
    for name, func, help_ in (
            ("install", cmd_service_install, "write the user unit files (or plist) and say "
                                             "how to enable them"),
            ("uninstall", cmd_service_uninstall, "remove the files install writes")):
        p = command(name, func, help_, svc_sub, "service")
        which = p.add_mutually_exclusive_group()
        which.add_argument("--systemd", action="store_true", help="systemd user units")
        which.add_argument("--launchd", action="store_true", help="a launchd user agent")
        if name == "install":
            p.add_argument("--print", action="store_true", help="only print the files")

    p = command("completion", cmd_completion,
                "print the shell completion script: eval \"$(stigmer-broker completion bash)\"")
    p.add_argument("shell", choices=("bash", "zsh", "fish"), metavar="SHELL",
                   help="bash, zsh or fish")

    p = command("help", cmd_help, "print this help, a command's (help env set), or with --man "
                "the man page")
    p.add_argument("topic", nargs="*", metavar="COMMAND", help="the command to explain")
    p.add_argument("--man", action="store_true",
                   help="print the man page (roff): stigmer-broker help --man | man -l -")

    key = sub.add_parser("key", help="manage the master key")
    key.set_defaults(func=_group_help(key))
    key_sub = key.add_subparsers(title="key commands", metavar="COMMAND")
    p = command("rotate", cmd_key_rotate, "replace the master key and rewrap the data keys",
                key_sub, "key")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p = command("export", cmd_key_export,
                "write the master key, wrapped under a passphrase (asked twice), to a new file",
                key_sub, "key")
    p.add_argument("--out", required=True, metavar="FILE", help="the backup file to create")
    p = command("import", cmd_key_import,
                "restore the master key from a backup (into a new home, or one whose store "
                "it opens)", key_sub, "key")
    p.add_argument("file", metavar="FILE")

    p = command("backup", cmd_backup,
                "copy the store, consistently (also while the broker runs), to a new 0600 "
                "file with the audit head anchor")
    p.add_argument("--out", required=True, metavar="FILE", help="the backup file to create")
    p = command("restore", cmd_restore,
                "put a backup in place of the store (the broker stopped), once it opens with "
                "this home's master key and its audit chain verifies")
    p.add_argument("file", metavar="FILE", help="a file `backup --out` wrote")
    p.add_argument("--replace", action="store_true",
                   help="move the existing store aside (never deleted) and restore in its place")

    fleet = sub.add_parser("fleet", help="brokers on many hosts sharing one PostgreSQL store")
    fleet.set_defaults(func=_group_help(fleet))
    fleet_sub = fleet.add_subparsers(title="fleet commands", metavar="COMMAND")
    p = command("init", cmd_fleet_init,
                "create a fleet's schema and its two roles (control, runner-host) in "
                "PostgreSQL, or print the SQL that does", fleet_sub, "fleet")
    p.add_argument("--print-sql", action="store_true",
                   help="print the SQL (for psql as a superuser) instead of running it")
    p.add_argument("--store", metavar="URL",
                   help="an administrator's postgresql:// URL to run it with (default: "
                        "$STIGMER_STORE_URL)")
    p.add_argument("--schema", default="stigmer", help="the schema to hold the fleet's tables "
                   "(default: stigmer)")
    p.add_argument("--control-role", default="stigmer_control", metavar="ROLE",
                   help="the role of brokers that may change things (default: stigmer_control)")
    p.add_argument("--runner-role", default="stigmer_runner", metavar="ROLE",
                   help="the role of runner hosts: fetch and count uses only (default: "
                        "stigmer_runner)")
    return parser


def usage_error(parser: argparse.ArgumentParser, message: str) -> str:
    """``message`` as the one line a usage mistake prints: with the near miss of a mistyped
    option or command where there is one, and the ``help`` command that explains it."""
    import difflib
    import re

    words = parser.prog.split()[1:]  # "stigmer-broker env show" -> env show
    hint = f"`{' '.join([PROG, 'help', *words])}` explains it"
    unknown = re.match(r"unrecognized arguments?: (\S+)", message)
    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    guess: list[str] = []
    if unknown and unknown.group(1).startswith("-"):
        options = [o for a in parser._actions for o in a.option_strings]
        guess = difflib.get_close_matches(unknown.group(1).split("=")[0], options, n=1)
        message = f"unknown option {unknown.group(1)}"
    elif choice:
        guess = difflib.get_close_matches(choice.group(1), re.findall(r"'([^']*)'",
                                                                      choice.group(2)), n=1)
        message = f"no command {choice.group(1)!r}"
    near = f" (did you mean {guess[0]}?)" if guess else ""
    return f"{' '.join(words) + ': ' if words else ''}{message}{near}; {hint}"


def _key_command_argument(p: Any) -> None:
    if isinstance(p, _Unused):
        return  # the import below is not free: only for serve and start
    from ..store.keys import KEY_COMMAND_TIMEOUT

    p.add_argument("--key-command", metavar="'CMD ARGS'",
                   help="run CMD ARGS at start (no shell: split as a shell would) and read the "
                        "master key, base64, from what it prints; it must finish within "
                        f"{KEY_COMMAND_TIMEOUT:g} s (default: $STIGMER_KEY_COMMAND)")


def _metrics_argument(p: Any) -> None:
    p.add_argument("--metrics", metavar="ADDRESS",
                   help="serve Prometheus metrics on unix:PATH (a 0600 socket in a private "
                        "directory) or tcp:127.0.0.1:PORT (loopback only); no label holds a "
                        "name or a value (default: $STIGMER_METRICS, else off)")


def _store_arguments(p: Any) -> None:
    p.add_argument("--store", metavar="URL",
                   help="a postgresql:// URL: share one store with the brokers of other hosts "
                        "(default: $STIGMER_STORE_URL, else HOME/local.db). Keep the password "
                        "out of it: PGPASSWORD or ~/.pgpass")
    p.add_argument("--stale-after", metavar="DURATION",
                   help="with --store: how long a broker that lost the database keeps serving "
                        "the contexts it cached (default 30s)")

