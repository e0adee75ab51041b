"""Someone who can write the database file, but holds no key, changes what it says.

Each probe stops a real broker, edits ``local.db`` with plain sqlite3 as such
a person would, starts the broker again and checks that the change is refused
(for that record alone, naming it) and never served. Each failed on the code
before rows and the audit chain carried MACs.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from conftest import make_config, start_broker

from stigmer.broker.config import Paths
from stigmer.broker.store.sqlite import MIGRATIONS
from stigmer.client import AsyncClient, BrokerError, Unauthenticated, variables

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def running(paths: Paths) -> AsyncIterator[AsyncClient]:
    """A broker served in this loop, and a client of it; stopped on exit."""
    async with anyio.create_task_group() as tg:
        broker = await start_broker(tg, make_config(paths))
        try:
            async with AsyncClient(broker.socket) as client:
                yield client
        finally:
            broker.stop.set()


def edit(paths: Paths, *statements: str) -> None:
    """Change the store behind the broker's back (it is stopped), as plain SQL can."""
    with sqlite3.connect(paths.store) as db:
        for sql in statements:
            db.execute(sql)


async def two_environments(client: AsyncClient) -> None:
    await client.put_environment("prod", variables({"MODE": "prod"}, {"S": "prod-secret"}))
    await client.put_environment("dev", variables({"MODE": "dev"}, {"S": "dev-secret"}))


async def refused(call: Callable[[], object], name: str) -> str:
    """``call`` fails naming ``name`` and an integrity check, without any value."""
    with pytest.raises(BrokerError) as caught:
        await call()  # type: ignore[misc]
    message = caught.value.message
    assert name in message and "integrity check" in message, message
    assert "prod-secret" not in message and "dev-secret" not in message
    return message


async def test_swapped_environment_names_are_refused(paths: Paths) -> None:
    async with running(paths) as client:
        await two_environments(client)
    edit(paths, "UPDATE environments SET name = 'tmp' WHERE name = 'prod'",
         "UPDATE environments SET name = 'prod' WHERE name = 'dev'",
         "UPDATE environments SET name = 'dev' WHERE name = 'tmp'")
    async with running(paths) as client:
        await refused(lambda: client.get_environment("prod", reveal=True), "'prod'")
        await refused(lambda: client.create_context("x", environments=["prod"]), "'prod'")
        assert await client.list_environments() == []


async def test_a_re_pointed_token_opens_nothing(paths: Paths) -> None:
    async with running(paths) as client:
        await two_environments(client)
        token = (await client.create_context("a", environments=["dev"])).token
        other = (await client.create_context("b", environments=["prod"])).token
    edit(paths, "UPDATE tokens SET context_id = (SELECT id FROM contexts WHERE "
                "execution_id = 'b') WHERE context_id = (SELECT id FROM contexts WHERE "
                "execution_id = 'a')")
    async with running(paths) as client:
        with pytest.raises(Unauthenticated):
            await client.fetch_context(token)
        assert (await client.fetch_context(other))["S"] == "prod-secret"  # refused alone


@pytest.mark.parametrize("mac", ["copied", "none"])
async def test_a_minted_token_opens_nothing(paths: Paths, mac: str) -> None:
    async with running(paths) as client:
        await two_environments(client)
        await client.create_context("a", environments=["prod"])
    mine = "stg_" + "m" * 43
    digest = hashlib.sha256(mine.encode()).hexdigest()
    edit(paths, "INSERT INTO tokens(id, hash, context_id, created_at, expires_at, max_uses, "
                f"uses, mac) SELECT 'tok_mine', x'{digest}', context_id, created_at, "
                f"expires_at, max_uses, 0, {'mac' if mac == 'copied' else 'NULL'} FROM tokens")
    async with running(paths) as client:
        with pytest.raises(Unauthenticated):
            await client.fetch_context(mine)


async def test_extended_expiry_and_reset_uses_are_refused(paths: Paths) -> None:
    async with running(paths) as client:
        await two_environments(client)
        once = (await client.create_context("a", environments=["prod"], max_uses=1)).token
        await client.fetch_context(once)
        short = (await client.create_context("b", environments=["prod"], ttl_s=60)).token
    with pytest.raises(sqlite3.IntegrityError, match="never goes down"):
        edit(paths, "UPDATE tokens SET uses = 0")
    # the store's own trigger is only a first line: whoever can write the file can drop it
    edit(paths, "DROP TRIGGER tokens_uses_never_down",
         "UPDATE tokens SET uses = 0",  # the used-up token, fresh again
         "UPDATE contexts SET expires_at = expires_at + 1e6 WHERE execution_id = 'b'")
    async with running(paths) as client:
        with pytest.raises(Unauthenticated):
            await client.fetch_context(once)
        with pytest.raises(Unauthenticated):
            await client.fetch_context(short)
        await refused(lambda: client.get_context("b"), "'b'")
        await client.complete_context("b")  # the way out: remove it, then create it again
        await client.create_context("b", environments=["prod"])


async def test_a_saved_use_count_written_back_is_refused(paths: Paths) -> None:
    async with running(paths) as client:
        await two_environments(client)
        token = (await client.create_context("a", environments=["prod"], max_uses=2)).token
    with sqlite3.connect(paths.store) as db:
        saved = db.execute("SELECT uses, mac FROM tokens").fetchone()
    async with running(paths) as client:
        for _ in range(2):
            await client.fetch_context(token)
        with pytest.raises(Unauthenticated):
            await client.fetch_context(token)
    with pytest.raises(sqlite3.IntegrityError, match="never goes down"):
        edit(paths, f"UPDATE tokens SET uses = {saved[0]}, mac = x'{saved[1].hex()}'")
    async with running(paths) as client:
        with pytest.raises(Unauthenticated):  # served twice, as bounded, and no more
            await client.fetch_context(token)


async def test_a_cleared_secret_flag_is_refused(paths: Paths) -> None:
    async with running(paths) as client:
        await two_environments(client)
    edit(paths, "UPDATE variables SET is_secret = 0, value = 'shown', sealed = NULL "
                "WHERE name = 'S' AND env_id = (SELECT id FROM environments WHERE name = 'dev')")
    async with running(paths) as client:
        await refused(lambda: client.get_environment("dev"), "S of environment 'dev'")
        await refused(lambda: client.create_context("x", environments=["dev"]), "'dev'")
        assert (await client.get_environment("prod", reveal=True)).data["S"].value \
            == "prod-secret"


@pytest.mark.parametrize("change", [
    "UPDATE variables SET value = 'evil' WHERE name = 'MODE'",
    "DELETE FROM variables WHERE name = 'MODE'",
    "INSERT INTO variables(env_id, name, is_secret, value) SELECT id, 'EXTRA', 0, 'x' "
    "FROM environments",
])
async def test_edited_plain_values_are_refused(paths: Paths, change: str) -> None:
    async with running(paths) as client:
        await client.put_environment("dev", variables({"MODE": "dev"}))
    edit(paths, change)
    async with running(paths) as client:
        await refused(lambda: client.get_environment("dev"), "'dev'")
        # a change does not re-authenticate it; a whole replacement does
        await refused(lambda: client.put_environment("dev", variables({"B": "1"})), "'dev'")
        await client.delete_environment("dev")
        await client.put_environment("dev", variables({"MODE": "dev"}))
        assert (await client.get_environment("dev")).data["MODE"].value == "dev"


# ---------------------------------------------------------------- the audit chain


async def _some_audit(paths: Paths) -> None:
    async with running(paths) as client:
        await two_environments(client)
        token = (await client.create_context("a", environments=["prod"])).token
        for _ in range(3):
            await client.fetch_context(token)
        await client.complete_context("a")
        assert (await client.verify_audit()).ok


def _unprotect(db: sqlite3.Connection) -> None:
    db.execute("DROP TRIGGER audit_no_update")
    db.execute("DROP TRIGGER audit_no_delete")


async def test_a_rewritten_audit_chain_is_detected(paths: Paths) -> None:
    await _some_audit(paths)
    with sqlite3.connect(paths.store) as db:  # granted becomes denied, and the chain is
        _unprotect(db)                        # recomputed as plain SHA-256 links
        db.execute("UPDATE audit SET outcome = 'denied' WHERE event = 'fetch'")
        from stigmer.broker.audit import GENESIS, _legacy_link
        from stigmer.broker.protocol import AuditRecord

        prev = GENESIS
        for row in db.execute("SELECT * FROM audit ORDER BY seq").fetchall():
            rec = AuditRecord(*row)
            prev = _legacy_link(prev, rec)
            db.execute("UPDATE audit SET hash = ? WHERE seq = ?", (prev, rec.seq))
    async with running(paths) as client:
        verified = await client.verify_audit()
        assert not verified.ok and verified.first_broken is not None, verified


async def test_removing_the_newest_records_is_detected(paths: Paths) -> None:
    await _some_audit(paths)
    with sqlite3.connect(paths.store) as db:
        _unprotect(db)
        head = db.execute("SELECT max(seq) FROM audit").fetchone()[0]
        db.execute("DELETE FROM audit WHERE seq > ?", (head - 2,))
    async with running(paths) as client:
        verified = await client.verify_audit()
        assert not verified.ok, verified
        assert verified.first_broken == head - 1 and "head anchor" in verified.reason


async def test_retention_removes_old_records_behind_a_checkpoint(paths: Paths) -> None:
    await _some_audit(paths)
    from sealed import open_sealed

    from stigmer.broker.audit import Audit
    from stigmer.broker.store.anchor import HeadAnchor

    sealed = await open_sealed(paths.store)
    try:
        audit = Audit(sealed.store, sealed.vault, anchor=HeadAnchor(paths.audit_anchor))
        before = (await audit.verify()).records
        records = (await audit.list(None, 100))[0]
        cut = records[3].at  # the first three go
        removed = await audit.prune(cut)
        assert removed == 3
        verified = await audit.verify()
        assert verified.ok, verified
        assert verified.removed_through == 3 and verified.records == before - 3 + 1
        with sqlite3.connect(paths.store) as db:  # one more record quietly removed
            db.execute("DROP TRIGGER audit_no_delete")
            db.execute("DELETE FROM audit WHERE seq = 4")
        assert not (await audit.verify()).ok
    finally:
        await sealed.close()


async def test_a_forged_checkpoint_is_detected(paths: Paths) -> None:
    await _some_audit(paths)
    with sqlite3.connect(paths.store) as db:
        _unprotect(db)
        link = db.execute("SELECT hash FROM audit WHERE seq = 2").fetchone()[0]
        head = db.execute("SELECT max(seq) FROM audit").fetchone()[0]
        db.execute("INSERT INTO audit VALUES (?, 0, 'audit.checkpoint', 'ok', '', '', NULL, "
                   "NULL, ?, 'dk-x:00')", (head + 1, f"removed records through 2 (link {link})"))
        db.execute("DELETE FROM audit WHERE seq <= 2")
    async with running(paths) as client:
        assert not (await client.verify_audit()).ok


# ------------------------------------------------------------- older stores


async def _contexts_as_before_versions(paths: Paths) -> None:
    """Context rows as a broker before migration 7 wrote them: no environment versions,
    their MACs without (what dropping the column in :func:`_undo_schema_7` needs)."""
    from sealed import open_sealed

    from stigmer.broker.store.crypto import Row

    sealed = await open_sealed(paths.store)
    try:
        async with sealed.store.write() as db:
            for row in await db.fetchall("SELECT id, execution_id, created_at, expires_at, "
                                         "keys, sealed FROM contexts"):
                await db.execute("UPDATE contexts SET mac = ?, environments = NULL WHERE "
                                 "id = ?", (sealed.vault.mac(Row.context(*row)), row[0]))
    finally:
        await sealed.close()


def _undo_schema_7(db: sqlite3.Connection) -> None:
    """What migration 7 added, taken out again (the store is then at version 6)."""
    db.execute("DROP TABLE IF EXISTS environment_versions")
    db.execute("ALTER TABLE contexts DROP COLUMN environments")
    db.execute("PRAGMA user_version = 6")


def _undo_schema_6(db: sqlite3.Connection) -> None:
    """What migrations 6 and 7 added, taken out again (the store is then at version 5)."""
    _undo_schema_7(db)
    db.execute("DROP INDEX IF EXISTS contexts_by_expiry")
    db.execute("DROP INDEX IF EXISTS tokens_by_expiry")
    db.execute("PRAGMA user_version = 5")


def _undo_schema_5(db: sqlite3.Connection) -> None:
    """What migrations 5 to 7 added, taken out again (the store is then at version 4)."""
    _undo_schema_6(db)
    for trigger in ("audit_seq_follows", "tokens_uses_never_down", "audit_no_delete"):
        db.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    db.execute("DROP TABLE IF EXISTS tombstones")
    db.execute("DROP TABLE IF EXISTS audit_quarantine")
    db.execute("CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit WHEN NOT EXISTS "
               "(SELECT 1 FROM audit WHERE event = 'audit.checkpoint' AND seq > old.seq) "
               "BEGIN SELECT RAISE(ABORT, 'audit records are removed only behind a "
               "checkpoint'); END")
    db.execute("PRAGMA user_version = 4")


def _as_schema_2(paths: Paths) -> None:
    """Turn the store back into what a broker before row MACs wrote."""
    with sqlite3.connect(paths.store) as db:
        _undo_schema_5(db)
        db.execute("ALTER TABLE tokens DROP COLUMN runners")  # schema 4
        for table in ("environments", "variables", "contexts", "tokens"):
            db.execute(f"ALTER TABLE {table} DROP COLUMN mac")
        db.execute("DROP INDEX audit_checkpoints")
        db.execute("DROP TRIGGER audit_no_delete")
        db.execute("CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit "
                   "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END")
        db.execute("PRAGMA user_version = 2")
    assert len(MIGRATIONS) == 7  # a new migration must be undone here too


async def test_a_store_from_before_row_macs_is_authenticated_once(paths: Paths) -> None:
    async with running(paths) as client:
        await two_environments(client)
        token = (await client.create_context("a", environments=["prod"])).token
    _as_schema_2(paths)
    paths.audit_anchor.unlink()  # that broker wrote no anchor
    async with running(paths) as client:  # the migrating start adopts every row
        assert (await client.fetch_context(token))["S"] == "prod-secret"
        assert (await client.get_environment("dev", reveal=True)).data["S"].value \
            == "dev-secret"
    edit(paths, "UPDATE variables SET mac = NULL WHERE name = 'MODE'")
    async with running(paths) as client:  # and never again
        await refused(lambda: client.get_environment("dev"), "'dev'")


async def test_an_older_store_in_place_of_a_newer_one_is_refused(paths: Paths) -> None:
    async with running(paths) as client:
        await two_environments(client)
    _as_schema_2(paths)  # the anchor of the newer broker is still there
    from stigmer.broker.daemon.lifecycle import serve
    from stigmer.broker.store.backend import StoreError

    with pytest.raises(StoreError, match="replaced by an older file"):
        await serve(make_config(paths))


async def test_the_anchor_file_is_private(paths: Paths) -> None:
    await _some_audit(paths)
    assert Path(paths.audit_anchor).stat().st_mode & 0o777 == 0o600


async def test_a_schema_3_store_keeps_its_token_macs_across_migration_4(paths: Paths) -> None:
    """Migration 4 adds runner grants to the tokens table; rows without one keep the MAC
    they had, so an upgrade refuses nothing."""
    async with running(paths) as client:
        await two_environments(client)
        token = (await client.create_context("a", environments=["prod"], max_uses=5)).token
        await client.fetch_context(token)
    await _contexts_as_before_versions(paths)
    with sqlite3.connect(paths.store) as db:
        _undo_schema_5(db)
        db.execute("ALTER TABLE tokens DROP COLUMN runners")
        db.execute("PRAGMA user_version = 3")
    async with running(paths) as client:
        assert (await client.fetch_context(token))["S"] == "prod-secret"
        info = await client.get_context("a")
        assert info.tokens[0].uses == 2 and info.runners == []


async def test_a_schema_4_store_migrates_to_5_and_keeps_working(paths: Paths) -> None:
    """Migration 5 adds the triggers, the tombstones and the quarantine to a store that
    has rows: what it held still opens, and what the triggers forbid is refused."""
    async with running(paths) as client:
        await two_environments(client)
        token = (await client.create_context("a", environments=["prod"], max_uses=3)).token
        await client.fetch_context(token)
    await _contexts_as_before_versions(paths)
    with sqlite3.connect(paths.store) as db:
        _undo_schema_5(db)
    async with running(paths) as client:
        assert (await client.fetch_context(token))["S"] == "prod-secret"
        assert (await client.verify_audit()).ok
    with sqlite3.connect(paths.store) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 7
        with pytest.raises(sqlite3.IntegrityError, match="never goes down"):
            db.execute("UPDATE tokens SET uses = 0")
        with pytest.raises(sqlite3.IntegrityError, match="number after the last"):
            db.execute("INSERT INTO audit VALUES (9223372036854775807, 0, 'x', 'ok', '', '', "
                       "NULL, NULL, '', 'garbage')")


async def test_a_huge_audit_seq_from_before_5_is_quarantined_and_creates_answer_ok(
        paths: Paths) -> None:
    """A record numbered 2**63 - 1 (written before the store numbered them) left no number
    for the next: every create committed, then answered `internal`. Now the create answers,
    verify names the record, and quarantining it lets the audit go on."""
    async with running(paths) as client:
        await two_environments(client)
    with sqlite3.connect(paths.store) as db:
        _undo_schema_5(db)
        db.execute("INSERT INTO audit VALUES (9223372036854775807, 0, 'x', 'ok', '', '', "
                   "NULL, NULL, '', 'garbage')")
    async with running(paths) as client:
        created = await client.create_context("a", environments=["prod"])  # was `internal`
        assert (await client.fetch_context(created.token))["S"] == "prod-secret"
        verified = await client.verify_audit()
        assert (verified.ok, verified.first_broken) == (False, 2**63 - 1)
        await client.quarantine_audit(2**63 - 1)
        verified = await client.verify_audit()
        assert verified.ok, verified.reason
        records = await client.audit(None, 100)
        assert [r.event for r in records[-4:]] == ["audit.quarantined", "context.created",
                                                  "token.issued", "fetch"]
        assert records[-4].detail == "quarantined record 9223372036854775807 (link garbage)"
    with sqlite3.connect(paths.store) as db:
        assert db.execute("SELECT seq, hash FROM audit_quarantine").fetchall() == \
            [(2**63 - 1, "garbage")]
    from sealed import open_sealed

    from stigmer.broker.audit import Audit
    from stigmer.broker.store.anchor import HeadAnchor

    sealed = await open_sealed(paths.store)
    try:  # and retention, which refuses a chain that does not verify, cuts it again
        audit = Audit(sealed.store, sealed.vault, anchor=HeadAnchor(paths.audit_anchor))
        assert await audit.prune(time.time() + 1) > 0
        assert (await audit.verify()).ok
    finally:
        await sealed.close()


async def test_a_completed_context_written_back_is_not_served(paths: Paths) -> None:
    async with running(paths) as client:
        await two_environments(client)
        token = (await client.create_context("a", environments=["prod"])).token
    with sqlite3.connect(paths.store) as db:
        saved_context = db.execute("SELECT * FROM contexts").fetchall()
        saved_tokens = db.execute("SELECT * FROM tokens").fetchall()
    async with running(paths) as client:
        await client.complete_context("a")
    with sqlite3.connect(paths.store) as db:
        for table, rows in (("contexts", saved_context), ("tokens", saved_tokens)):
            for row in rows:
                db.execute(f"INSERT INTO {table} VALUES ({', '.join('?' * len(row))})", row)
    async with running(paths) as client:
        with pytest.raises(Unauthenticated):
            await client.fetch_context(token)
        assert await client.list_contexts() == []
    with sqlite3.connect(paths.store) as db:
        assert db.execute("DELETE FROM tombstones").rowcount == 0  # kept while it matters
        with pytest.raises(sqlite3.IntegrityError, match="never changed"):
            db.execute("UPDATE tombstones SET expires_at = 0")


async def test_status_says_what_verify_last_found(paths: Paths) -> None:
    """`status` (and `status --check`) report the chain as the broker last found it: a
    record changed in the middle is not seen until a verify, which then sets the problem,
    and a verify that passes again (after quarantine) clears it."""
    await _some_audit(paths)
    with sqlite3.connect(paths.store) as db:
        _unprotect(db)
        db.execute("UPDATE audit SET detail = 'rewritten' WHERE seq = 3")
    async with running(paths) as client:
        assert (await client.status()).audit_problem == ""  # the anchor still matches
        verified = await client.verify_audit()
        assert not verified.ok and verified.first_broken == 3
        assert (await client.status()).audit_problem == verified.reason
        await client.quarantine_audit(3)
        assert (await client.verify_audit()).ok
        assert (await client.status()).audit_problem == ""


# ------------------------------------------------------------- environment history


async def _two_versions(paths: Paths) -> None:
    async with running(paths) as client:
        await two_environments(client)
        await client.put_environment("prod", variables({"MODE": "live"}, {"S": "new-secret"}))


_PROD_V1 = "version = 1 AND env_id = (SELECT id FROM environments WHERE name = 'prod')"


@pytest.mark.parametrize("change", [
    f"UPDATE environment_versions SET actor_uid = 4242 WHERE {_PROD_V1}",
    f"UPDATE environment_versions SET changes = replace(changes, 'MODE', 'EDOM') "
    f"WHERE {_PROD_V1}",
    # the envelope of version 2 (which would open only as version 2) put in version 1
    "UPDATE environment_versions SET sealed = (SELECT sealed FROM environment_versions v "
    "WHERE v.env_id = environment_versions.env_id AND v.version = 2) "
    f"WHERE {_PROD_V1}",
    # version 1 of dev put in place of version 1 of prod
    f"DELETE FROM environment_versions WHERE {_PROD_V1}; UPDATE environment_versions SET "
    "env_id = (SELECT id FROM environments WHERE name = 'prod') WHERE version = 1",
])
async def test_a_tampered_version_row_is_refused(paths: Paths, change: str) -> None:
    """A version row edited, given another version's envelope, or moved to another
    environment, is refused by name wherever it is read; the environment as it is now,
    and its other versions, are not affected."""
    await _two_versions(paths)
    with sqlite3.connect(paths.store) as db:
        db.executescript(change)
    async with running(paths) as client:
        where = "version 1 of environment 'prod'"
        await refused(lambda: client.environment_history("prod"), where)
        await refused(lambda: client.get_environment_version("prod", 1, reveal=True), where)
        await refused(lambda: client.diff_environment_versions("prod", 1, 2), where)
        await refused(lambda: client.rollback_environment("prod", 1), where)
        assert (await client.get_environment("prod", reveal=True)).data["S"].value \
            == "new-secret"
        assert (await client.get_environment_version("prod", 2, reveal=True)).data["S"].value \
            == "new-secret"
        assert (await client.get_environment("dev", reveal=True)).data["S"].value \
            == "dev-secret"
