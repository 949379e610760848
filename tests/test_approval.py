"""Who asked for an edit, and who agreed to it (issue 18, sections 2 to 4): provenance of every edit
and of the history row of a pushed one, two-person approval for the kinds that need it (queued by
the CLI or by SQL, the configuration changing in between, approvals expiring), and the question
before a door lets through an entity the mirror never saw. Simulator -> real SQLite and PostgreSQL."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

from syncd.api import OpenAppClient
from syncd.cli import main
from syncd.config import WritebackSettings, build_config
from syncd.edits import queue_edit
from syncd.errors import ConfigError
from syncd.metrics import AWAITING_APPROVAL, AWAITING_APPROVAL_OLDEST, show_awaiting_approval
from syncd.simulator import Simulator, World
from syncd.store import Store
from syncd.store.edits import EditQueue, person

from .conftest import API_KEY
from .test_cli import KEY_ENV, write_config
from .test_details import E1, E2, E3, portals
from .test_edit_kinds import insert_edit
from .test_writeback import ORGS, active, edit, reconciler

ROOT = Path(__file__).resolve().parent.parent
NEEDS = ("delete", "door_restrictions")
HOST = socket.gethostname()
APPROVAL = '[writeback]\nrequire_approval = ["door_restrictions", "delete"]\n'


@pytest.fixture
def cli(tmp_path: Path, sim: Simulator, database_url: str, mirrored: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``--config PATH`` of a configuration that requires approval of deletes and door restrictions."""
    monkeypatch.setenv(KEY_ENV, API_KEY)
    return ["--config", str(write_config(tmp_path, sim, database_url, [mirrored], extra=APPROVAL))]


def as_user(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The OS user the CLI sees (getpass reads $LOGNAME first)."""
    monkeypatch.setenv("LOGNAME", name)


def sql(store: Store, statement: str, **params: object) -> None:
    with store.engine.begin() as conn:
        conn.execute(text(statement), params)


# -- configuration ------------------------------------------------------------------------------------


def test_require_approval_names_known_kinds_only() -> None:
    assert WritebackSettings().require_approval == () and WritebackSettings().approval_ttl == 7 * 86400
    base = {"api": {"base_url": "http://x/api/v1", "api_key_env": "K"}, "orgs": [{"id": "a"}]}
    config = build_config({**base, "writeback": {"require_approval": ["Delete"], "approval_ttl": "2d"}}, {"K": "k"})
    assert config.writeback.require_approval == ("delete",)
    for value, message in [
        (["delete", "purge"], "writeback.require_approval lists 'purge', which is not one of update, restore"),
        ("delete", "writeback.require_approval must be a list of update"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)) as caught:
            build_config({**base, "writeback": {"require_approval": value}}, {"K": "k"})
        assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="approval_ttl must be at least 60 seconds"):
        build_config({**base, "writeback": {"approval_ttl": 5}}, {"K": "k"})


def test_person_is_the_user_whatever_the_host() -> None:
    assert person("alice@ops-1") == person("Alice@ops-2") == person("alice") == "alice"
    assert person("bob@ops-1") != person("alice@ops-1")
    assert person(None) == ""


# -- provenance ---------------------------------------------------------------------------------------


def test_provenance_of_cli_and_sql_edits(
    store: Store,
    world: World,
    mirrored: str,
    cli: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    as_user(monkeypatch, "alice")
    device = active(world, mirrored)
    assert main(["edit", device, "--external-id", "door-7", *cli]) == 0
    by_sql = insert_edit(store, active(world, mirrored, 1), "update", {"external_id": "door-8"})
    queue = EditQueue(store)
    ours, theirs = queue.find()
    assert (ours.requested_by, ours.requested_via) == (f"alice@{HOST}", "cli")
    expected = "sql" if store.dialect == "sqlite" else "postgres"  # PostgreSQL: the session's role
    assert (theirs.id, theirs.requested_by, theirs.requested_via) == (by_sql, expected, "sql")
    assert ours.requested_at is not None and theirs.requested_at is not None
    sql(store, "INSERT INTO device_edits (device_id, action, requested_by) VALUES (:d, 'restore', 'carol')", d=device)
    assert queue.find()[-1].requested_by == "carol"  # a writer trusted with the column may name someone
    capsys.readouterr()
    assert main(["edits", *cli]) == 0
    out = capsys.readouterr().out
    assert re.search(r"STATUS\s+REQUESTED\s+VIA\s+BY\s+TRIES", out)
    assert re.search(rf"{ours.id}\s+{device}\s+update\s+pending\s+\d{{4}}-\d\d-\d\d \d\d:\d\d  cli  alice@\S+\s+0", out)
    assert re.search(rf"{by_sql}\s+\S+\s+update\s+pending\s+\S+ \S+  sql  {expected}\s+0", out)
    assert max(len(line) for line in out.splitlines() if not line.startswith("  ")) <= 125


# -- two-person approval: the worked example of the README --------------------------------------------


def test_queue_as_alice_approve_as_bob_reconcile(
    sim: Simulator,
    store: Store,
    world: World,
    mirrored: str,
    cli: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    device = active(world, mirrored)
    as_user(monkeypatch, "alice")
    assert main(["delete", device, "--yes", *cli]) == 0
    out = capsys.readouterr().out
    edit_id = int(re.search(r"queued edit (\d+)", out).group(1))  # type: ignore[union-attr]
    assert "awaits approval (writeback.require_approval lists delete)" in out
    queued = edit(store, edit_id)
    assert queued.status == "awaiting_approval" and queued.approval_requested_at is not None
    assert main(["reconcile-once", *cli]) == 0
    assert sim.requests("delete_device") == [] and edit(store, edit_id).status == "awaiting_approval"
    assert main(["edits", "--status", "awaiting_approval", *cli]) == 0
    assert f"{edit_id}: awaits  approval since" in capsys.readouterr().out

    # Alice cannot approve her own edit, from another host either.
    assert main(["edits", "approve", str(edit_id), *cli]) == 2
    assert f"was requested by alice@{HOST}: it needs the approval of another person" in capsys.readouterr().err
    monkeypatch.setattr("socket.gethostname", lambda: "elsewhere")
    assert main(["edits", "approve", str(edit_id), *cli]) == 2
    assert edit(store, edit_id).approved_at is None

    as_user(monkeypatch, "bob")
    assert main(["edits", "approve", str(edit_id), *cli]) == 0
    assert f"edit {edit_id}: awaiting_approval -> pending (approved by bob@elsewhere)" in capsys.readouterr().out
    assert main(["edits", "approve", str(edit_id), *cli]) == 2
    assert "approved already, by bob@elsewhere" in capsys.readouterr().err
    assert main(["reconcile-once", *cli]) == 0
    assert world.device(mirrored, device)["deleted_at"] is not None
    done = edit(store, edit_id)
    assert (done.status, done.requested_by, done.approved_by) == ("succeeded", f"alice@{HOST}", "bob@elsewhere")
    change = next(c for c in store.changes(mirrored) if c["edit_id"] == edit_id)
    assert (change["source"], change["requested_by"], change["approved_by"]) == (
        "local_edit",
        f"alice@{HOST}",
        "bob@elsewhere",
    )
    capsys.readouterr()
    assert main(["edits", "--device", device, *cli]) == 0
    assert f"{edit_id}: approved by bob@elsewhere at " in capsys.readouterr().out


def test_a_pushed_door_restriction_change_carries_its_provenance(
    wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    portal = next(p for p in portals(world, mirrored) if world.orgs[mirrored].devices[p].restrictions)
    edit_id = queue_edit(store, portal, "door_restrictions", {"add": [E1]}, "alice@ops", ORGS, NEEDS)
    EditQueue(store).approve(edit_id, "bob@ops", edit(store, edit_id).requested_at, NEEDS)  # type: ignore[arg-type]
    assert reconciler(wb_client, store, require_approval=NEEDS).run_once() == Counter(succeeded=1)
    change = next(c for c in store.changes(mirrored) if c["edit_id"] == edit_id)
    assert (change["change"], change["requested_by"], change["approved_by"]) == ("restrictions", "alice@ops", "bob@ops")
    # A kind that needs no approval: the history row names the requester, and no approver.
    update = queue_edit(store, active(world, mirrored), "update", {"external_id": "x-9"}, "carol@ops", ORGS, NEEDS)
    assert reconciler(wb_client, store, require_approval=NEEDS).run_once() == Counter(succeeded=1)
    change = next(c for c in store.changes(mirrored) if c["edit_id"] == update)
    assert (change["requested_by"], change["approved_by"]) == ("carol@ops", None)


def test_an_approved_add_is_computed_against_the_live_list(
    wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    portal = next(p for p in portals(world, mirrored) if world.orgs[mirrored].devices[p].restrictions)
    before = list(world.orgs[mirrored].devices[portal].restrictions)
    edit_id = queue_edit(store, portal, "door_restrictions", {"add": [E1]}, "alice@ops", ORGS, NEEDS)
    world.orgs[mirrored].devices[portal].restrictions = [*before, E2]  # someone else, meanwhile, in OpenApp
    queue = EditQueue(store)
    queue.approve(edit_id, "bob@ops", edit(store, edit_id).requested_at, NEEDS)  # type: ignore[arg-type]
    assert reconciler(wb_client, store, require_approval=NEEDS).run_once() == Counter(succeeded=1)
    assert sorted(world.orgs[mirrored].devices[portal].restrictions) == sorted([*before, E1, E2])


def test_reject_ends_an_edit_for_good(
    sim: Simulator,
    store: Store,
    world: World,
    mirrored: str,
    cli: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    portal = next(p for p in portals(world, mirrored) if world.orgs[mirrored].devices[p].restrictions)
    known = world.orgs[mirrored].devices[portal].restrictions[0]
    as_user(monkeypatch, "alice")
    assert main(["door-restrictions", portal, "--remove", known, *cli]) == 0
    edit_id = EditQueue(store).find()[-1].id
    assert main(["edits", "reject", str(edit_id), "--reason", "no", *cli]) == 2
    assert f"`syncd edits cancel {edit_id}`" in capsys.readouterr().err
    as_user(monkeypatch, "bob")
    assert main(["edits", "reject", str(edit_id), "--reason", " ", *cli]) == 2
    with pytest.raises(SystemExit, match="2"):
        main(["edits", "reject", str(edit_id), *cli])  # --reason is required
    capsys.readouterr()
    assert main(["edits", "reject", str(edit_id), "--reason", "ticket SEC-118 is about door 3", *cli]) == 0
    rejected = edit(store, edit_id)
    assert (rejected.status, rejected.rejected_by, rejected.reason) == (
        "rejected",
        f"bob@{HOST}",
        "ticket SEC-118 is about door 3",
    )
    assert rejected.rejected_at is not None and rejected.approved_at is None
    for action in ("retry", "cancel", "approve"):
        assert main(["edits", action, str(edit_id), *cli]) == 2, action
    assert main(["reconcile-once", *cli]) == 0
    assert sim.requests("set_door_restrictions") == []
    capsys.readouterr()
    assert main(["edits", *cli]) == 0
    assert f"{edit_id}: rejected by bob@{HOST} at " in capsys.readouterr().out


def test_cancel_withdraws_an_edit_awaiting_approval(store: Store, world: World, mirrored: str) -> None:
    edit_id = queue_edit(store, active(world, mirrored), "delete", None, "alice@ops", ORGS, NEEDS)
    queue = EditQueue(store)
    assert queue.cancel(edit_id, edit(store, edit_id).requested_at) == "awaiting_approval"  # type: ignore[arg-type]
    assert edit(store, edit_id).status == "cancelled"


def test_an_edit_that_needs_no_approval_is_not_approved(store: Store, world: World, mirrored: str) -> None:
    edit_id = queue_edit(store, active(world, mirrored), "update", {"external_id": "x"}, "alice@ops", ORGS, NEEDS)
    assert edit(store, edit_id).status == "pending"
    with pytest.raises(ConfigError, match=r"needs no approval: writeback\.require_approval does not list update"):
        EditQueue(store).approve(edit_id, "bob@ops", edit(store, edit_id).requested_at, NEEDS)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="there is no edit 999"):
        EditQueue(store).approve(999, "bob@ops", edit(store, edit_id).requested_at, NEEDS)  # type: ignore[arg-type]


# -- nothing unapproved is ever pushed ----------------------------------------------------------------


def test_a_plain_sql_insert_cannot_bypass_approval(
    sim: Simulator, wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    device = active(world, mirrored)
    sql(store, "INSERT INTO device_edits (device_id, action, status) VALUES (:d, 'delete', 'pending')", d=device)
    edit_id = EditQueue(store).find()[-1].id
    rec = reconciler(wb_client, store, require_approval=NEEDS)
    assert rec.run_once() == Counter()
    waiting = edit(store, edit_id)
    assert waiting.status == "awaiting_approval" and waiting.approval_requested_at is not None
    assert sim.requests("delete_device") == []
    # An approval made in SQL (a trusted writer on SQLite; on PostgreSQL the trigger checks the person).
    sql(store, "UPDATE device_edits SET approved_by = 'bob', approved_at = CURRENT_TIMESTAMP WHERE id = :i", i=edit_id)
    assert rec.run_once() == Counter(succeeded=1)
    assert world.device(mirrored, device)["deleted_at"] is not None
    assert edit(store, edit_id).approved_by == "bob"


def test_the_claim_itself_never_takes_an_unapproved_edit(store: Store, world: World, mirrored: str) -> None:
    """Even between a round's enforcement and its claim, a row inserted as pending is not claimed."""
    device = active(world, mirrored)
    sql(store, "INSERT INTO device_edits (device_id, action) VALUES (:d, 'delete')", d=device)
    queue = EditQueue(store)
    now = queue.find()[-1].requested_at
    assert now is not None
    assert queue.claim(now + timedelta(seconds=5), timedelta(minutes=2), 10, "test:1", NEEDS) == []
    assert [e.status for e in queue.find()] == ["pending"]
    assert len(queue.claim(now + timedelta(seconds=5), timedelta(minutes=2), 10, "test:1", ())) == 1


def test_approval_required_after_queuing_and_a_stale_claim(
    sim: Simulator, wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    """The configuration changed between queue and push: the edit waits; so does one whose claimer
    died before it was sent."""
    queued = queue_edit(store, active(world, mirrored), "delete", None, "alice@ops", ORGS)  # no approval needed
    claimed = queue_edit(store, active(world, mirrored, 1), "delete", None, "alice@ops", ORGS)
    sql(
        store,
        "UPDATE device_edits SET status = 'in_flight', claimed_at = NULL, claimed_by = 'dead:1' WHERE id = :i",
        i=claimed,
    )
    assert reconciler(wb_client, store, require_approval=("delete",)).run_once() == Counter()
    assert [edit(store, i).status for i in (queued, claimed)] == ["awaiting_approval"] * 2
    assert sim.requests("delete_device") == []
    # The requirement lifted: what awaits still waits for a person's decision.
    assert reconciler(wb_client, store).run_once() == Counter()
    assert edit(store, queued).status == "awaiting_approval"


def test_a_later_edit_of_the_device_waits_behind_one_awaiting_approval(
    wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    device = active(world, mirrored)
    first = queue_edit(store, device, "delete", None, "alice@ops", ORGS, NEEDS)
    later = queue_edit(store, device, "update", {"external_id": "after-delete"}, "alice@ops", ORGS, NEEDS)
    rec = reconciler(wb_client, store, require_approval=NEEDS)
    assert rec.run_once() == Counter()
    assert edit(store, later).status == "pending"
    EditQueue(store).approve(first, "bob@ops", edit(store, first).requested_at, NEEDS)  # type: ignore[arg-type]
    assert rec.run_once() == Counter(succeeded=2)
    assert edit(store, first).applied_at <= edit(store, later).applied_at  # type: ignore[operator]


def test_an_approval_not_given_within_the_ttl_cancels_the_edit(
    wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    old = queue_edit(store, active(world, mirrored), "delete", None, "alice@ops", ORGS, NEEDS)
    fresh = queue_edit(store, active(world, mirrored, 1), "delete", None, "alice@ops", ORGS, NEEDS)
    queue = EditQueue(store)
    waited = queue.find()[0].approval_requested_at
    assert waited is not None
    sql(store, "UPDATE device_edits SET approval_requested_at = :t WHERE id = :i", t=waited - timedelta(hours=2), i=old)
    rec = reconciler(wb_client, store, require_approval=NEEDS, approval_ttl=3600)
    assert rec.run_once() == Counter(expired=1)
    expired = edit(store, old)
    assert expired.status == "cancelled"
    assert expired.reason and "nobody approved it within writeback.approval_ttl (1h)" in expired.reason
    assert edit(store, fresh).status == "awaiting_approval"
    by_org = queue.awaiting_approval()
    assert list(by_org) == [mirrored] and by_org[mirrored][0] == 1 and 0 <= by_org[mirrored][1] < 600
    # Asked again: it waits for a new approval, from now.
    assert queue.retry(old, waited, NEEDS) == "cancelled"
    again = edit(store, old)
    assert again.status == "awaiting_approval" and again.reason is None
    assert again.approval_requested_at is not None and again.approval_requested_at > waited - timedelta(hours=1)


def test_a_retried_edit_needs_a_new_approval(
    sim: Simulator, wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    device = active(world, mirrored)
    edit_id = queue_edit(store, device, "delete", None, "alice@ops", ORGS, NEEDS)
    queue = EditQueue(store)
    queue.approve(edit_id, "bob@ops", edit(store, edit_id).requested_at, NEEDS)  # type: ignore[arg-type]
    world.purge_device(mirrored, device)
    assert reconciler(wb_client, store, require_approval=NEEDS).run_once() == Counter(failed=1)
    assert queue.retry(edit_id, edit(store, edit_id).requested_at, NEEDS) == "failed"  # type: ignore[arg-type]
    retried = edit(store, edit_id)
    assert (retried.status, retried.approved_by, retried.approved_at) == ("awaiting_approval", None, None)


def test_awaiting_approval_gauges_per_org() -> None:
    show_awaiting_approval({"org-a": (2, 90.0), "org-x": (1, 5.0)}, {"org-a", "org-b"})
    assert AWAITING_APPROVAL.labels("org-a")._value.get() == 2
    assert AWAITING_APPROVAL_OLDEST.labels("org-a")._value.get() == 90.0
    assert AWAITING_APPROVAL.labels("org-b")._value.get() == 0
    assert AWAITING_APPROVAL.labels("org-x")._value.get() == 1
    show_awaiting_approval({}, {"org-a", "org-b"})
    assert AWAITING_APPROVAL.labels("org-a")._value.get() == 0
    served = {s.labels["org_id"] for m in AWAITING_APPROVAL.collect() for s in m.samples}
    assert "org-x" not in served  # an org not configured is shown only while its edits wait


# -- typos: an entity never seen ----------------------------------------------------------------------


def test_door_restrictions_ask_before_letting_an_unseen_entity_through(
    store: Store,
    world: World,
    mirrored: str,
    cli: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    restricted = [p for p in portals(world, mirrored) if world.orgs[mirrored].devices[p].restrictions]
    portal, other = restricted[0], restricted[1]
    seen_elsewhere = world.orgs[mirrored].devices[other].restrictions[0]  # on another door of the org: no question
    typo = E3
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert main(["door-restrictions", portal, "--add", seen_elsewhere, *cli]) == 0
    capsys.readouterr()
    assert main(["door-restrictions", portal, "--add", typo, *cli]) == 2
    err = capsys.readouterr().err
    assert f"entity id {typo} never seen on a door of org {mirrored}" in err and "confirm with --yes" in err
    assert err.count("\n") == 1
    assert main(["door-restrictions", portal, "--set", seen_elsewhere, typo, *cli]) == 2
    assert len(EditQueue(store).find()) == 1
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    asked: list[str] = []
    monkeypatch.setattr("builtins.input", lambda prompt: asked.append(prompt) or "n")
    assert main(["door-restrictions", portal, "--add", typo, *cli]) == 1
    assert asked == ["Queue the edit anyway? [y/N] "] and len(EditQueue(store).find()) == 1
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert main(["door-restrictions", portal, "--add", typo, *cli]) == 0
    monkeypatch.setattr("builtins.input", lambda prompt: pytest.fail("asked although --yes"))
    assert main(["door-restrictions", portal, "--add", E2, "--yes", *cli]) == 0
    assert main(["door-restrictions", portal, "--remove", typo, *cli]) == 0  # removing lets nobody in
    assert len(EditQueue(store).find()) == 4


def test_an_entity_seen_only_in_the_history_is_known(store: Store, world: World, mirrored: str) -> None:
    from syncd.store.details import PortalRestrictions

    portal = next(p for p in portals(world, mirrored) if world.orgs[mirrored].devices[p].restrictions)
    gone = world.orgs[mirrored].devices[portal].restrictions[0]
    restrictions = PortalRestrictions(store)
    assert restrictions.unseen_entities(mirrored, [gone, E3]) == [E3]
    sql(store, "DELETE FROM door_restrictions WHERE entity_id = :e", e=gone)
    sql(
        store,
        "INSERT INTO device_changes (device_id, org_id, observed_at, change, diff) "
        "VALUES (:d, :o, CURRENT_TIMESTAMP, 'restrictions', :diff)",
        d=portal,
        o=mirrored,
        diff=f'{{"door_restrictions": {{"old": ["{gone}"], "new": []}}}}',
    )
    assert restrictions.unseen_entities(mirrored, [E3, gone]) == [E3]
    assert restrictions.unseen_entities("another-org", [gone]) == [gone]


# -- PostgreSQL: the ops and approver roles, and the trigger ------------------------------------------


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed")
def test_postgresql_roles_queue_and_approve_but_never_rewrite_history(
    postgres_database: str, client: OpenAppClient, world: World, org: str
) -> None:
    from .conftest import Syncer

    with psycopg.connect(postgres_database, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    store = Store(postgres_database)
    store.upgrade()
    Syncer(client, store)(org)
    device = active(world, org)
    tag = uuid.uuid4().hex[:8]
    ops, approvers = f"syncd_ops_{tag}", f"syncd_approvers_{tag}"
    alice, bob, carol = f"alice_{tag}", f"bob_{tag}", f"carol_{tag}"  # roles are cluster-wide: unique names
    script = ROOT / "deploy" / "postgresql-ops-roles.sql"
    try:
        result = subprocess.run(
            [
                "psql",
                postgres_database,
                "-v",
                "ON_ERROR_STOP=1",
                "-v",
                f"ops={ops}",
                "-v",
                f"approvers={approvers}",
                "-f",
                str(script),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        with psycopg.connect(postgres_database, autocommit=True) as conn:
            conn.execute(f'CREATE ROLE "{alice}" LOGIN PASSWORD \'pw\' IN ROLE "{ops}"')
            conn.execute(f'CREATE ROLE "{bob}" LOGIN PASSWORD \'pw\' IN ROLE "{approvers}"')
            conn.execute(f'CREATE ROLE "{carol}" LOGIN PASSWORD \'pw\' IN ROLE "{ops}", "{approvers}"')

        def connect(role: str) -> psycopg.Connection:
            return psycopg.connect(
                postgres_database.replace("postgresql://postgres@", f"postgresql://{role}:pw@"), autocommit=True
            )

        insert = "INSERT INTO device_edits (device_id, action) VALUES (%s, 'delete') RETURNING id"
        with connect(alice) as conn:
            (edit_id,) = conn.execute(insert, (device,)).fetchone()  # type: ignore[misc]
            row = conn.execute(
                "SELECT requested_by, requested_via, status FROM device_edits WHERE id = %s", (edit_id,)
            ).fetchone()
            assert row == (alice, "sql", "pending")
            refused = [
                ("INSERT INTO device_edits (device_id, action, requested_by) VALUES (%s, 'delete', 'bob')", (device,)),
                ("INSERT INTO device_edits (device_id, action, status) VALUES (%s, 'delete', 'succeeded')", (device,)),
                (
                    "INSERT INTO device_edits (device_id, action, approved_by, approved_at) "
                    "VALUES (%s, 'delete', 'bob', now())",
                    (device,),
                ),
                ("UPDATE device_edits SET approved_by = 'bob', approved_at = now() WHERE id = %s", (edit_id,)),
                ("UPDATE device_edits SET approved_at = now() WHERE id = %s", (edit_id,)),
                ("UPDATE device_edits SET status = 'cancelled' WHERE id = %s", (edit_id,)),
                ("DELETE FROM device_edits WHERE id = %s", (edit_id,)),
                ("UPDATE device_changes SET diff = NULL WHERE org_id = %s", (org,)),
                ("DELETE FROM device_changes WHERE org_id = %s", (org,)),
                ("UPDATE sync_runs SET status = 'failed' WHERE org_id = %s", (org,)),
                ("DELETE FROM sync_runs WHERE org_id = %s", (org,)),
                ("TRUNCATE device_changes", ()),
            ]
            for statement, params in refused:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement, params)
            assert conn.execute("SELECT status FROM sync_runs").fetchall() == [("succeeded",)]  # untouched
        with connect(carol) as conn:
            (own,) = conn.execute(insert, (active(world, org, 1),)).fetchone()  # type: ignore[misc]
            with pytest.raises(psycopg.errors.CheckViolation, match="needs the approval of another person"):
                conn.execute("UPDATE device_edits SET approved_at = now() WHERE id = %s", (own,))
        with connect(bob) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(insert, (device,))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(
                    "UPDATE device_edits SET approved_by = %s, approved_at = now() WHERE id = %s", (carol, own)
                )
            conn.execute("UPDATE device_edits SET approved_at = now() - interval '3 days' WHERE id = %s", (edit_id,))
        approved = edit(store, edit_id)
        assert approved.approved_by == bob  # the trigger names the session's role ...
        assert approved.approved_at > approved.requested_at  # type: ignore[operator]  # ... and stamps the time
        # The trigger holds for every writer, syncd's own role included.
        with pytest.raises(Exception, match="needs the approval of another person"):
            sql(store, "UPDATE device_edits SET approved_by = :a WHERE id = :i", a=f"{carol}@somewhere", i=own)
    finally:
        store.close()
        with psycopg.connect(postgres_database, autocommit=True) as conn:
            for group in (ops, approvers):
                if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (group,)).fetchone():
                    conn.execute(f'DROP OWNED BY "{group}" CASCADE')
            for role in (alice, bob, carol, ops, approvers):
                conn.execute(f'DROP ROLE IF EXISTS "{role}"')
