"""Environment history through the real CLI, on both stores: set, change, roll back and
read the values back; history, diff and audit say key names, never a value."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator

import pytest
from conftest import _STORES, run_cli

from stigmer.broker.config import Paths

# made at run time, so no source file can hold them
FIRST = f"SENTINEL-first-{secrets.token_hex(8)}"
SECOND = f"SENTINEL-second-{secrets.token_hex(8)}"


def _set_change_remove(paths: Paths) -> None:
    run_cli(paths, "env", "set", "app", "MODE=one", "--secret", "TOKEN", input=FIRST + "\n",
            check=True)
    run_cli(paths, "env", "set", "app", "MODE=two", "--secret", "TOKEN", input=SECOND + "\n",
            check=True)
    run_cli(paths, "env", "unset", "app", "MODE", check=True)


def test_set_change_roll_back_and_read_the_values(cli_broker: Paths) -> None:
    _set_change_remove(cli_broker)
    history = run_cli(cli_broker, "env", "history", "app", check=True).stdout
    lines = history.splitlines()
    assert lines[0] == "environment app: version 3 now, 3 versions kept"
    assert lines[1].endswith("removed MODE") and lines[2].endswith("changed MODE, TOKEN")
    assert lines[3].endswith("added MODE, TOKEN") and " by uid " in lines[3]
    shown = run_cli(cli_broker, "env", "show", "app", "--version", "1", "--reveal",
                    check=True).stdout
    assert "MODE   one" in shown and FIRST in shown
    assert FIRST not in run_cli(cli_broker, "env", "show", "app", "--version", "1",
                                check=True).stdout
    diff = run_cli(cli_broker, "env", "diff", "app", "1", "3", check=True).stdout
    assert diff.splitlines()[1:] == ["  - MODE   removed", "  ~ TOKEN  changed"]
    revealed = run_cli(cli_broker, "env", "diff", "app", "1", "3", "--reveal",
                       check=True).stdout
    assert f"{FIRST} -> {SECOND}" in revealed

    rolled = run_cli(cli_broker, "env", "rollback", "app", "--to", "1", check=True).stdout
    assert rolled.strip() == ("environment app: rolled back to version 1, now version 4 "
                              "(rollback to 1: added MODE; changed TOKEN)")
    now = json.loads(run_cli(cli_broker, "env", "show", "app", "--reveal", "--json",
                             check=True).stdout)
    assert now["data"] == {"MODE": {"value": "one", "is_secret": False},
                           "TOKEN": {"value": FIRST, "is_secret": True}}
    as_json = json.loads(run_cli(cli_broker, "env", "history", "app", "--json",
                                 check=True).stdout)
    assert as_json["current"] == 4
    assert [(v["version"], v["restored_from"]) for v in as_json["versions"]] == [
        (4, 1), (3, None), (2, None), (1, None)]

    said = [run_cli(cli_broker, *args, check=True).stdout for args in (
        ("env", "history", "app"), ("env", "history", "app", "--json"),
        ("env", "diff", "app", "1", "2"), ("env", "diff", "app", "1", "2", "--json"),
        ("audit",), ("audit", "--json"))]
    said.append((cli_broker.home / "broker.log").read_text())
    for text in said:
        assert FIRST not in text and SECOND not in text
    audit = run_cli(cli_broker, "audit", check=True).stdout
    assert "environment.rolled_back" in audit and "app to version 1 (now version 4)" in audit


def test_a_context_says_which_version_it_merged(cli_broker: Paths) -> None:
    _set_change_remove(cli_broker)
    run_cli(cli_broker, "context", "create", "e1", "--environment", "app", check=True)
    shown = run_cli(cli_broker, "context", "show", "e1", check=True).stdout
    assert "merged environment app version 3" in shown
    as_json = json.loads(run_cli(cli_broker, "context", "show", "e1", "--json",
                                 check=True).stdout)
    assert as_json["environments"] == [{"name": "app", "version": 3}]
    audit = run_cli(cli_broker, "audit", "--execution", "e1", check=True).stdout
    assert "environments app v3" in audit


def test_unknown_versions_and_bad_numbers_say_what_to_do(cli_broker: Paths) -> None:
    run_cli(cli_broker, "env", "set", "app", "A=1", check=True)
    missing = run_cli(cli_broker, "env", "show", "app", "--version", "9")
    assert missing.returncode == 1
    assert missing.stderr.strip().endswith(
        "environment 'app' has no version 9; `stigmer-broker env history app` lists the "
        "ones it keeps")
    for args in (("env", "rollback", "app", "--to", "x"), ("env", "diff", "app", "0", "1"),
                 ("env", "show", "app", "--version", "-1")):
        bad = run_cli(cli_broker, *args)
        assert bad.returncode == 2, args
        assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.fixture
def short_history(paths: Paths, store: str | None) -> Iterator[Paths]:
    """A broker started with `start --env-history 2`."""
    if store is not None:
        _STORES[paths.home] = store
    run_cli(paths, "start", "--env-history", "2", check=True)
    yield paths
    run_cli(paths, "stop")
    _STORES.pop(paths.home, None)


def test_the_retention_keeps_as_many_versions_as_asked(short_history: Paths) -> None:
    for n in range(5):
        run_cli(short_history, "env", "set", "app", f"N={n}", check=True)
    history = json.loads(run_cli(short_history, "env", "history", "app", "--json",
                                 check=True).stdout)
    assert [v["version"] for v in history["versions"]] == [5, 4]
    rolled = run_cli(short_history, "env", "rollback", "app", "--to", "3")
    assert rolled.returncode == 1 and "has no version 3" in rolled.stderr
    run_cli(short_history, "env", "rollback", "app", "--to", "4", check=True)
    assert "N  3" in run_cli(short_history, "env", "show", "app", check=True).stdout


@pytest.mark.parametrize("value", ["0", "30m", "soon", "-3"])
def test_a_bad_env_history_is_a_usage_error(paths: Paths, value: str) -> None:
    result = run_cli(paths, "start", "--env-history", value)
    assert result.returncode == 2
    assert "--env-history" in result.stderr and "Traceback" not in result.stderr
