"""The layering: ARCHITECTURE.md's table against the real import graph, the client's
imports, the sans-IO core, and the two client classes against each other."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import unasync_client

from stigmer.client import AsyncClient, Client

ROOT = Path(__file__).resolve().parent.parent
DOMAIN = {"environments", "contexts", "merge", "tokens", "grants", "audit", "manifests"}


def _layer(module: str) -> str | None:
    """The layer of a module of ours (None for the package root, which holds the version)."""
    parts = module.split(".")
    if parts[:2] == ["stigmer", "client"]:
        return "client"
    rest = parts[2:]
    if not rest or rest[0] == "__version__":
        return None
    head = rest[0]
    if head == "__main__":
        return "cli"
    if head in DOMAIN:
        return "domain"
    return head


def _module_of(path: Path) -> tuple[str, str]:
    """Return (module name, package the module's relative imports start from)."""
    rel = path.relative_to(ROOT)
    top = {"broker": "stigmer.broker", "client": "stigmer.client"}[rel.parts[0]]
    parts = list(rel.with_suffix("").parts[1:])
    is_package = parts[-1:] == ["__init__"]
    if is_package:
        parts = parts[:-1]
    module = ".".join([top, *parts])
    return module, module if is_package else module.rsplit(".", 1)[0]


def _imports(path: Path) -> set[str]:
    _, package = _module_of(path)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[:-(node.level - 1)]
                prefix = ".".join(base)
                names = [node.module] if node.module else [a.name for a in node.names]
                found.update(f"{prefix}.{n}" for n in names)
            elif node.module and node.module.startswith("stigmer."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("stigmer."))
    return found


def _sources() -> list[Path]:
    return sorted([*ROOT.glob("broker/**/*.py"), *ROOT.glob("client/**/*.py")])


def import_graph() -> dict[tuple[str, str], list[str]]:
    """Return every (importing layer, imported layer) pair with an example import."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in _sources():
        module, _ = _module_of(path)
        here = _layer(module)
        for target in _imports(path):
            there = _layer(target)
            if here and there and here != there:
                edges.setdefault((here, there), []).append(f"{module} -> {target}")
    return edges


def documented_rules() -> set[tuple[str, str]]:
    """Return the (layer, may import) pairs of ARCHITECTURE.md's table."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    rules: set[tuple[str, str]] = set()
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("layer", "") or set(cells[0]) <= {"-"}:
            continue
        allowed = [] if cells[2] == "nothing of ours" else [c.strip() for c in
                                                             cells[2].split(",")]
        rules.update((cells[0], a) for a in allowed)
    return rules


def test_every_import_between_layers_is_in_the_architecture_table() -> None:
    rules = documented_rules()
    assert rules, "ARCHITECTURE.md lost its table"
    graph = import_graph()
    unlisted = {edge: examples[0] for edge, examples in graph.items() if edge not in rules}
    assert not unlisted, f"imports ARCHITECTURE.md does not allow: {unlisted}"
    unused = rules - set(graph)
    assert not unused, f"ARCHITECTURE.md allows imports nothing uses any more: {unused}"


def test_protocol_and_local_import_nothing_else_of_the_broker() -> None:
    for (here, _), examples in import_graph().items():
        assert here not in ("protocol", "local"), examples


def test_the_protocol_is_sans_io_throughout() -> None:
    """Every module of protocol/, not a list of core ones: what needs the OS (paths,
    peer credentials, directory trust) belongs in local/."""
    modules = sorted((ROOT / "broker" / "protocol").glob("*.py"))
    assert {"framing", "messages", "connection", "errors"} <= {m.stem for m in modules}
    for module in modules:
        name = module.stem
        tree = ast.parse(module.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                    for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and n.module and not n.level}
        assert not imported & {"os", "socket", "anyio", "asyncio", "selectors"}, name


def test_the_client_loads_only_the_protocol_and_local_of_the_daemon() -> None:
    code = ("import sys\n"
            "import stigmer.client as c\n"
            "c.AsyncClient, c.SecretFilter, c.Client\n"
            "print(sorted(m for m in sys.modules if m.startswith('stigmer.broker')))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    loaded = eval(result.stdout)  # noqa: S307 - our own subprocess's printed list
    outside = [m for m in loaded if m != "stigmer.broker"
               and not m.startswith(("stigmer.broker.protocol", "stigmer.broker.local"))]
    assert not outside, outside
    # the check looked at real imports
    assert {"stigmer.broker.protocol.connection", "stigmer.broker.local.paths"} <= set(loaded)


def _public(cls: type) -> dict[str, Callable[..., object]]:
    return {name: member for name, member in vars(cls).items()
            if not name.startswith("_") and callable(member)}


def test_the_two_clients_offer_the_same_api() -> None:
    sync, asynchronous = _public(Client), _public(AsyncClient)
    renamed = {"aclose": "close"}
    assert {renamed.get(n, n) for n in asynchronous} == set(sync)
    for name, member in asynchronous.items():
        twin = sync[renamed.get(name, name)]
        assert inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member), name
        assert inspect.getdoc(member) == inspect.getdoc(twin), name
        a_sig = str(inspect.signature(member)).replace("AsyncClient", "Client").replace(
            "AsyncIterator", "Iterator")
        assert a_sig == str(inspect.signature(twin)), name
    assert inspect.getdoc(AsyncClient) == inspect.getdoc(Client)


def test_the_blocking_client_is_generated_from_the_async_one() -> None:
    assert unasync_client.main(["--check"]) == 0, "run `make unasync`"
    assert re.search(r"^# Generated from", unasync_client.TARGET.read_text(), re.M)
