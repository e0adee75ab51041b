"""Each backend's live schema against the one declaration (broker/store/schema.py): a new
store, and a store migrated from every older version, of SQLite and of PostgreSQL.

The live schema is read from the database's own catalogue (SQLite's ``sqlite_master`` and
``pragma_*`` functions, PostgreSQL's ``information_schema`` and ``pg_catalog``), through
the :class:`~broker.store.backend.Store` interface, and both it and the declaration are
reduced to the same facts in the backend's dialect, so a difference is named as a table,
a column and what about it differs.

Around it, what the declaration leaves open or to each backend: no SQL relies on column
order, `fleet init`'s grants cover every table, and the rules each backend's triggers keep
hold on both."""

from __future__ import annotations

import re
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from postgres import Server, psql

from stigmer.broker.protocol.errors import Internal
from stigmer.broker.store.backend import Store, Tx
from stigmer.broker.store.postgres import init_fleet
from stigmer.broker.store.schema import TABLES, TOKENS, Table, Type

pytestmark = pytest.mark.anyio

#: what one column is, as the backend says it: type, nullable, default, generated, collation
ColumnFacts = tuple[str, bool, str | None, bool, str | None]
_COLUMN_FACTS = ("type", "nullable", "default", "generated", "collation")
#: one table's facts: ``columns`` (name: :data:`ColumnFacts`), ``primary key``, ``unique
#: keys``, ``foreign keys``, ``checks`` and ``indexes``
TableFacts = dict[str, Any]


def _check_text(expression: str) -> str:
    """A CHECK expression reduced to what both catalogues keep of it (they add or drop
    parentheses and spaces)."""
    return re.sub(r"[()\s]", "", expression).lower()


# ---------------------------------------------------------------- the declaration


def _declared(table: Table, backend: str) -> TableFacts:
    """What ``table`` must look like in ``backend``'s catalogue."""
    columns: dict[str, ColumnFacts] = {}
    for c in table.columns:
        if backend == "sqlite":
            spelled = c.type.sqlite
            collation = "BINARY" if c.type is Type.TEXT else None  # byte-wise, every one
        else:
            spelled = c.type.postgres
            collation = "C" if c.bytewise else None
        columns[c.name] = (spelled, c.nullable, c.default, c.generated, collation)
    return {
        "columns": columns,
        "primary key": table.primary_key,
        "unique keys": frozenset(table.unique),
        "foreign keys": frozenset((f.columns, f.table, f.references, f.cascade)
                                  for f in table.foreign_keys),
        "checks": frozenset(_check_text(c) for c in table.checks),
        "indexes": frozenset((i.name, i.columns, i.unique) for i in table.indexes),
    }


# -------------------------------------------------------------------------- SQLite


def _sqlite_checks(sql: str) -> frozenset[str]:
    """The expressions of the CHECK constraints in a ``CREATE TABLE`` statement."""
    found = []
    for match in re.finditer(r"\bCHECK\s*\(", sql, re.I):
        depth, start = 1, match.end()
        for end in range(start, len(sql)):
            depth += {"(": 1, ")": -1}.get(sql[end], 0)
            if depth == 0:
                found.append(_check_text(sql[start:end]))
                break
    return frozenset(found)


async def _sqlite_table(store: Store, name: str, sql: str) -> TableFacts:
    columns: dict[str, ColumnFacts] = {}
    primary: list[tuple[int, str]] = []
    for column, spelled, not_null, default, pk in await store.read(
            'SELECT name, type, "notnull", dflt_value, pk FROM pragma_table_info(?)', (name,)):
        if pk:
            primary.append((pk, column))
        collate = re.search(rf"\b{column}\b[^,]*?\bCOLLATE\s+\"?(\w+)", sql, re.I)
        columns[column] = (
            spelled,
            # SQLite lets a primary key column that is not INTEGER hold NULL (a quirk it
            # keeps for old files); the broker never writes one
            not not_null and not pk,
            default,
            bool(re.search(rf"\b{column}\s+INTEGER\s+PRIMARY\s+KEY\s+AUTOINCREMENT\b", sql,
                           re.I)),
            (collate[1].upper() if collate else "BINARY") if spelled == "TEXT" else None)
    unique, indexes = set(), set()
    for index, is_unique, origin in await store.read(
            'SELECT name, "unique", origin FROM pragma_index_list(?)', (name,)):
        keyed = tuple(r[0] for r in await store.read(
            "SELECT name FROM pragma_index_info(?) ORDER BY seqno", (index,)))
        if origin == "u":
            unique.add(keyed)
        elif origin == "c":
            indexes.add((index, keyed, bool(is_unique)))
    references: dict[int, tuple[list[str], str, list[str], bool]] = {}
    for fk, table, source, target, on_delete in await store.read(
            'SELECT id, "table", "from", "to", on_delete FROM pragma_foreign_key_list(?) '
            "ORDER BY id, seq", (name,)):
        entry = references.setdefault(fk, ([], table, [], on_delete == "CASCADE"))
        entry[0].append(source)
        entry[2].append(target)
    return {
        "columns": columns,
        "primary key": tuple(column for _, column in sorted(primary)),
        "unique keys": frozenset(unique),
        "foreign keys": frozenset((tuple(s), t, tuple(r), c)
                                  for s, t, r, c in references.values()),
        "checks": _sqlite_checks(sql),
        "indexes": frozenset(indexes),
    }


async def _sqlite_schema(store: Store) -> dict[str, TableFacts]:
    return {name: await _sqlite_table(store, name, sql) for name, sql in await store.read(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table' "
        "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'")}


# ---------------------------------------------------------------------- PostgreSQL

#: the table's oid in the store's schema (the URL's search_path)
_OID = ("(SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = current_schema() AND c.relname = ?)")


def _attnames(numbers: str, table: str) -> str:
    """An array of the names of ``table``'s columns numbered ``numbers``, in that order."""
    return (f"array(SELECT a.attname::text FROM unnest({numbers}) WITH ORDINALITY k(n, i) "
            f"JOIN pg_attribute a ON a.attrelid = {table} AND a.attnum = k.n ORDER BY k.i)")


async def _postgres_table(store: Store, name: str) -> TableFacts:
    columns: dict[str, ColumnFacts] = {
        column: (spelled, nullable == "YES", default, identity == "YES", collation)
        for column, spelled, nullable, default, identity, collation in await store.read(
            "SELECT column_name::text, data_type::text, is_nullable::text, "
            "column_default::text, is_identity::text, collation_name::text "
            "FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = ?", (name,))}
    primary: tuple[str, ...] = ()
    unique, references, checks = set(), set(), set()
    for kind, keyed, table, targets, on_delete, definition in await store.read(
            f"SELECT contype::text, {_attnames('conkey', 'conrelid')}, "
            f"confrelid::regclass::text, {_attnames('confkey', 'confrelid')}, "
            f"confdeltype::text, pg_get_constraintdef(oid) FROM pg_constraint "
            f"WHERE conrelid = {_OID}", (name,)):
        if kind == "p":
            primary = tuple(keyed)
        elif kind == "u":
            unique.add(tuple(keyed))
        elif kind == "f":
            references.add((tuple(keyed), table, tuple(targets), on_delete == "c"))
        elif kind == "c":
            checks.add(_check_text(re.sub(r"^CHECK\s*", "", definition)))
    indexes = frozenset((index, tuple(keyed), is_unique) for index, is_unique, keyed in
                        await store.read(
        f"SELECT i.relname::text, x.indisunique, {_attnames('x.indkey::int2[]', 'x.indrelid')} "
        "FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
        f"WHERE x.indrelid = {_OID} AND NOT EXISTS (SELECT 1 FROM pg_constraint c "
        "WHERE c.conrelid = x.indrelid AND c.conindid = x.indexrelid)", (name,)))
    return {
        "columns": columns,
        "primary key": primary,
        "unique keys": frozenset(unique),
        "foreign keys": frozenset(references),
        "checks": frozenset(checks),
        "indexes": indexes,
    }


async def _postgres_schema(store: Store) -> dict[str, TableFacts]:
    return {name: await _postgres_table(store, name) for (name,) in await store.read(
        "SELECT table_name::text FROM information_schema.tables "
        "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' "
        "AND table_name <> 'stigmer_schema'")}  # the version: the backend's bookkeeping


async def _live(store: Store, backend: str) -> dict[str, TableFacts]:
    return await (_sqlite_schema(store) if backend == "sqlite" else _postgres_schema(store))


# -------------------------------------------------------------------- the comparison


def _differences(backend: str, live: dict[str, TableFacts]) -> list[str]:
    """Every way the live schema differs from the declaration, one line each."""
    declared = {table.name: _declared(table, backend) for table in TABLES}
    found = [f"{backend}: table {name} is not declared in broker/store/schema.py"
             for name in sorted(live.keys() - declared.keys())]
    found += [f"{backend}: declared table {name} is missing"
              for name in sorted(declared.keys() - live.keys())]
    for name in sorted(declared.keys() & live.keys()):
        want, got = declared[name], live[name]
        for column in sorted(got["columns"].keys() - want["columns"].keys()):
            found.append(f"{backend}: table {name}, column {column} is not declared")
        for column in sorted(want["columns"].keys() - got["columns"].keys()):
            found.append(f"{backend}: table {name}, declared column {column} is missing")
        for column in sorted(want["columns"].keys() & got["columns"].keys()):
            for fact, w, g in zip(_COLUMN_FACTS, want["columns"][column],
                                  got["columns"][column], strict=True):
                if w != g:
                    found.append(f"{backend}: table {name}, column {column}: {fact} is "
                                 f"{g!r}, declared {w!r}")
        for fact in ("primary key", "unique keys", "foreign keys", "checks", "indexes"):
            if want[fact] != got[fact]:
                found.append(f"{backend}: table {name}: {fact} are {_shown(got[fact])}, "
                             f"declared {_shown(want[fact])}")
    return found


def _shown(value: object) -> str:
    return repr(sorted(value) if isinstance(value, frozenset) else value)


# ---------------------------------------------------------------------------- cases


async def test_a_new_store_has_the_declared_tables(store: Store, backend: str) -> None:
    problems = _differences(backend, await _live(store, backend))
    assert not problems, "\n".join(problems)


async def test_a_store_migrated_from_every_older_version_is_a_new_one(
        store: Store, backend: str, older_store: Callable[[int], Awaitable[Store]],
        migrations: tuple[str, ...]) -> None:
    """Each matches the declaration, and what the live catalogue says of it is what it
    says of a new store."""
    fresh = await _live(store, backend)
    for version in range(1, len(migrations)):
        migrated = await _live(await older_store(version), backend)
        problems = [f"from version {version}: {line}"
                    for line in _differences(backend, migrated)]
        assert not problems, "\n".join(problems)
        assert migrated == fresh, version


def test_the_comparison_names_what_drifted() -> None:
    """A column one backend's migration added and the declaration lacks, or one that
    differs from its declaration, is named with its table and what differs."""
    tokens = _declared(TOKENS, "postgresql")
    drifted = {**tokens, "columns": {**tokens["columns"],
                                     "extra": ("text", True, None, False, None),
                                     "uses": ("bigint", True, "0", False, None)}}
    live = {t.name: _declared(t, "postgresql") for t in TABLES} | {"tokens": drifted}
    assert _differences("postgresql", live) == [
        "postgresql: table tokens, column extra is not declared",
        "postgresql: table tokens, column uses: nullable is True, declared False",
    ]


#: SQL that takes a table's columns in the order it has them, which differs by backend
_BY_POSITION = re.compile(r"SELECT\s+\*|INSERT\s+INTO\s+\w+\s+(VALUES|SELECT)\b", re.I)


def test_no_statement_relies_on_column_order() -> None:
    """Column order is not declared (schema.py), so the broker's SQL names its columns."""
    broker = Path(__file__).resolve().parents[2] / "broker"
    found = [f"{path.relative_to(broker.parent)}:{number}: {line.strip()}"
             for path in sorted(broker.rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), start=1)
             if _BY_POSITION.search(line)]
    assert not found, "\n".join(found)


async def test_fleet_init_lets_the_control_role_read_and_write_every_table(
        postgres: Server) -> None:
    """`fleet init`'s grants are written table by table: a table added to the schema
    without them would be one the control broker cannot use."""
    suffix = secrets.token_hex(4)
    schema, control, runner = f"f_{suffix}", f"ctl_{suffix}", f"run_{suffix}"
    try:
        await init_fleet(postgres.url(), schema, control, runner)
        names = ", ".join(f"'{table.name}'" for table in TABLES)
        refused = psql(postgres.url(search_path=schema),
                       f"SELECT string_agg(t, ', ' ORDER BY t) FROM unnest(ARRAY[{names}]) t "
                       f"WHERE NOT (has_table_privilege('{control}', t, 'SELECT') "
                       f"AND has_table_privilege('{control}', t, 'INSERT'))")
        assert refused == "", f"the control role may not read and write: {refused}"
    finally:
        postgres.drop_schema(schema)
        for role in (control, runner):
            psql(postgres.url(), f"DROP OWNED BY {role} CASCADE; DROP ROLE {role}",
                 check=False)


# ------------------------------------------- what each backend's triggers keep, on both
# (schema.py leaves the triggers to each backend; these rules are the same on both)

_AUDIT = ("INSERT INTO audit(seq, at, event, outcome, execution_id, token_id, detail, hash) "
          "VALUES (?, 0, ?, 'ok', 'exec-1', '', '', 'h')")
#: a tombstone's expiry in the far future (kept) and the past (gone)
_LATER, _EARLIER = 4e9, 1.0


async def _refused(store: Store, sql: str, params: tuple[object, ...] = ()) -> None:
    with pytest.raises(Internal):
        async with store.write() as db:
            await db.execute(sql, params)


async def _rows(db: Tx) -> None:
    """Two audit records, a context with a token used twice, and two tombstones."""
    await db.execute(_AUDIT, (1, "fetch"))
    await db.execute(_AUDIT, (2, "fetch"))
    context = await db.insert(
        "INSERT INTO contexts(execution_id, sealed, keys, created_at, expires_at) "
        "VALUES ('exec-1', ?, '', 0, ?) RETURNING id", (b"s", _LATER))
    await db.execute("INSERT INTO tokens(id, hash, context_id, created_at, expires_at, "
                     "max_uses, uses) VALUES ('t', ?, ?, 0, ?, 5, 2)", (b"h", context, _LATER))
    await db.executemany("INSERT INTO tombstones(context_id, execution_id, expires_at, mac) "
                         "VALUES (?, ?, ?, ?)", [(7, "kept", _LATER, b"m"),
                                                 (8, "gone", _EARLIER, b"m")])


async def test_the_audit_log_is_append_only_but_behind_a_checkpoint(store: Store) -> None:
    async with store.write() as db:
        await _rows(db)
    await _refused(store, "UPDATE audit SET detail = 'changed' WHERE seq = 1")
    await _refused(store, "DELETE FROM audit WHERE seq = 1")
    async with store.write() as db:
        await db.execute(_AUDIT, (3, "audit.checkpoint"))
        await db.execute("DELETE FROM audit WHERE seq <= 2")
    assert await store.read("SELECT seq, event, detail FROM audit") == [
        (3, "audit.checkpoint", "")]


async def test_a_use_count_never_goes_down(store: Store) -> None:
    async with store.write() as db:
        await _rows(db)
    await _refused(store, "UPDATE tokens SET uses = 1")
    async with store.write() as db:
        await db.execute("UPDATE tokens SET uses = 3")
    assert await store.read_one("SELECT uses FROM tokens") == 3


async def test_a_tombstone_is_never_changed_and_kept_until_its_context_would_expire(
        store: Store) -> None:
    async with store.write() as db:
        await _rows(db)
    await _refused(store, "UPDATE tombstones SET expires_at = 0")
    async with store.write() as db:  # a sweep goes on; the live tombstone stays
        await db.execute("DELETE FROM tombstones")
    assert await store.read("SELECT execution_id, expires_at FROM tombstones") == [
        ("kept", _LATER)]
