"""as-of history: every device history row records the device as it was after the change (state,
name, zone, integration, external id, metadata), baseline passes record what they saw ('observed'),
door_access_intervals (who could pass each portal, when), the device_versions view, and on
PostgreSQL the functions syncd_devices_as_of(ts, org) and syncd_door_access_as_of(ts, org)

History written before this revision is rebuilt as far as it goes (README, "As-of reports"): each
device's values are walked back from the mirror's current row through the diffs of its history
rows, and its first version is recorded as 'observed' at first_seen_at; door access is rebuilt
from the 'restrictions' rows and the current lists.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Iterator
import json
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime(timezone=True)
JSONDoc = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
KINDS_BEFORE = "'created', 'updated', 'deleted', 'restored', 'purged', 'restrictions'"
KINDS_AFTER = "'observed', 'created', 'updated', 'deleted', 'restored', 'purged', 'restrictions'"
HISTORY = ("state", "name", "zone_id", "integration_id", "external_id", "device_metadata")
JSON_NAMES = ("name", "device_metadata", "diff")
BATCH = 500  # devices (or portals) rebuilt per round of statements

RECENT_CHANGES = {
    "sqlite": "COALESCE(json_extract(d.name, '$.en'), (SELECT value FROM json_each(d.name) ORDER BY key LIMIT 1))",
    "postgresql": "COALESCE(d.name->>'en', (SELECT value FROM jsonb_each_text(d.name) ORDER BY key LIMIT 1))",
}
RECENT_SINCE = {"sqlite": "datetime('now', '-30 days')", "postgresql": "now() - interval '30 days'"}

DEVICE_VERSIONS = """
    CREATE VIEW device_versions AS
    SELECT v.device_id, v.org_id, v.valid_from, v.valid_to, v.state, v.name, v.zone_id, v.integration_id,
           v.external_id, v.device_metadata, v.change, v.change_id, v.source, v.first_run_id, v.edit_id,
           (SELECT max(r.id) FROM sync_runs r
             WHERE r.org_id = v.org_id AND r.status = 'succeeded' AND r.finished_at >= v.valid_from
               AND (v.valid_to IS NULL OR r.started_at < v.valid_to)) AS last_confirmed_run_id
    FROM (
        SELECT c.device_id, c.org_id, c.observed_at AS valid_from,
               LEAD(c.observed_at) OVER (PARTITION BY c.device_id ORDER BY c.observed_at, c.id) AS valid_to,
               c.state, c.name, c.zone_id, c.integration_id, c.external_id, c.device_metadata,
               c.change, c.id AS change_id, c.source, c.run_id AS first_run_id, c.edit_id
        FROM device_changes c
        WHERE c.state IS NOT NULL
    ) v
"""

# The observation window of an answer about time `at`, per org (computed once, not per row): the
# start of the last succeeded pass that finished by then, and the end of the first succeeded pass
# that started after it.
WINDOWS = """
    WITH windows AS (
        SELECT o.org_id,
               (SELECT max(r.started_at) FROM sync_runs r
                 WHERE r.org_id = o.org_id AND r.status = 'succeeded' AND r.finished_at <= at) AS window_from,
               (SELECT min(r.finished_at) FROM sync_runs r
                 WHERE r.org_id = o.org_id AND r.status = 'succeeded' AND r.started_at > at) AS window_to
        FROM (SELECT DISTINCT org_id FROM sync_runs WHERE org IS NULL OR org_id = org) o
    )
"""

DEVICES_AS_OF = f"""
    CREATE FUNCTION syncd_devices_as_of(at timestamptz, org text DEFAULT NULL)
    RETURNS TABLE (device_id varchar, org_id varchar, state varchar, name jsonb, zone_id varchar,
                   integration_id varchar, external_id text, device_metadata jsonb, valid_from timestamptz,
                   change varchar, change_id bigint, window_from timestamptz, window_to timestamptz)
    LANGUAGE sql STABLE AS $$
        {WINDOWS}
        SELECT d.id, d.org_id, c.state, c.name, c.zone_id, c.integration_id, c.external_id, c.device_metadata,
               c.observed_at, c.change, c.id, w.window_from, w.window_to
        FROM devices d
        CROSS JOIN LATERAL (
            SELECT * FROM device_changes c2
            WHERE c2.device_id = d.id AND c2.state IS NOT NULL AND c2.observed_at <= at
            ORDER BY c2.observed_at DESC, c2.id DESC LIMIT 1) c
        LEFT JOIN windows w ON w.org_id = d.org_id
        WHERE (org IS NULL OR d.org_id = org) AND d.first_seen_at <= at
        ORDER BY d.org_id, d.id
    $$
"""

DOOR_ACCESS_AS_OF = f"""
    CREATE FUNCTION syncd_door_access_as_of(at timestamptz, org text DEFAULT NULL)
    RETURNS TABLE (device_id varchar, org_id varchar, entity_id varchar, anyone boolean, valid_from timestamptz,
                   valid_to timestamptz, changed_after timestamptz, last_confirmed_at timestamptz,
                   window_from timestamptz, window_to timestamptz)
    LANGUAGE sql STABLE AS $$
        {WINDOWS}
        SELECT a.device_id, a.org_id, a.entity_id, a.anyone, a.valid_from, a.valid_to, a.changed_after,
               a.last_confirmed_at, w.window_from, w.window_to
        FROM door_access_intervals a
        LEFT JOIN windows w ON w.org_id = a.org_id
        WHERE (org IS NULL OR a.org_id = org) AND a.valid_from <= at AND (a.valid_to IS NULL OR a.valid_to > at)
        ORDER BY a.org_id, a.device_id, a.anyone DESC, a.entity_id
    $$
"""


def upgrade() -> None:
    bind = op.get_bind()
    dialect = bind.dialect.name
    op.execute("DROP VIEW recent_changes")  # SQLite's batch copy of device_changes cannot keep a view on it
    with op.batch_alter_table("device_changes") as batch:
        batch.drop_constraint(op.f("ck_device_changes_change"), type_="check")
        batch.create_check_constraint(op.f("ck_device_changes_change"), f"change IN ({KINDS_AFTER})")
        batch.add_column(sa.Column("state", sa.String(16), comment="the device's state after the change"))
        batch.add_column(sa.Column("name", JSONDoc, comment="its name after the change, {locale: text}"))
        batch.add_column(sa.Column("zone_id", sa.String(64)))
        batch.add_column(sa.Column("integration_id", sa.String(64)))
        batch.add_column(sa.Column("external_id", sa.Text()))
        batch.add_column(sa.Column("device_metadata", JSONDoc))
    _create_recent_changes(dialect, "WHERE c.observed_at >= {since} AND c.change <> 'observed'")
    op.create_table(
        "door_access_intervals",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("org_id", sa.String(64), nullable=False),
        sa.Column(
            "device_id",
            sa.String(64),
            sa.ForeignKey("devices.id", name=op.f("fk_door_access_intervals_device_id_devices")),
            nullable=False,
            comment="the portal",
        ),
        sa.Column("entity_id", sa.String(64), comment="the apartment / listing let through; NULL when anyone may pass"),
        sa.Column("anyone", sa.Boolean(), nullable=False, comment="true: the portal was unrestricted (an empty list)"),
        sa.Column("valid_from", Timestamp, nullable=False, comment="when syncd first saw it so"),
        sa.Column("valid_to", Timestamp, comment="when syncd first saw it no longer so (NULL: still so)"),
        sa.Column(
            "changed_after",
            Timestamp,
            comment="the portal's check before valid_from, which saw it otherwise: the change happened "
            "after this (NULL: syncd had not asked before)",
        ),
        sa.Column("last_confirmed_at", Timestamp, nullable=False, comment="the last check that saw it so"),
        sa.Column("from_run_id", BigId, comment="the pass that saw it begin (NULL: a local edit, or reconstructed)"),
        sa.Column("from_edit_id", BigId, comment="the device_edits row that set it, if syncd pushed it"),
        sa.Column("to_run_id", BigId, comment="the pass that saw it end"),
        sa.Column("to_edit_id", BigId, comment="the device_edits row that ended it, if syncd pushed it"),
        sa.CheckConstraint("anyone = (entity_id IS NULL)", name=op.f("ck_door_access_intervals_anyone")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_door_access_intervals")),
    )
    for columns in (["device_id", "valid_from"], ["entity_id", "valid_from"], ["org_id", "valid_from"]):
        op.create_index(op.f(f"ix_door_access_intervals_{'_'.join(columns)}"), "door_access_intervals", columns)
    _rebuild_device_history(bind)
    _rebuild_door_access(bind)
    op.execute(DEVICE_VERSIONS)
    if dialect == "postgresql":
        op.execute(DEVICES_AS_OF)
        op.execute(DOOR_ACCESS_AS_OF)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("DROP FUNCTION syncd_door_access_as_of(timestamptz, text)")
        op.execute("DROP FUNCTION syncd_devices_as_of(timestamptz, text)")
    op.execute("DROP VIEW device_versions")
    op.drop_table("door_access_intervals")
    op.execute("DROP VIEW recent_changes")
    op.execute("DELETE FROM device_changes WHERE change = 'observed'")
    with op.batch_alter_table("device_changes") as batch:
        for column in reversed(HISTORY):
            batch.drop_column(column)
        batch.drop_constraint(op.f("ck_device_changes_change"), type_="check")
        batch.create_check_constraint(op.f("ck_device_changes_change"), f"change IN ({KINDS_BEFORE})")
    _create_recent_changes(dialect, "WHERE c.observed_at >= {since}")


def _create_recent_changes(dialect: str, where: str) -> None:
    op.execute(f"""
        CREATE VIEW recent_changes AS
        SELECT c.id, c.observed_at, c.org_id, c.device_id, {RECENT_CHANGES[dialect]} AS name, c.change, c.diff, c.run_id
        FROM device_changes c JOIN devices d ON d.id = c.device_id
        {where.format(since=RECENT_SINCE[dialect])}
    """)


# -- rebuilding what history written before this revision implies ----------------------------------

changes_t = sa.table(
    "device_changes",
    sa.column("id", BigId),
    sa.column("device_id", sa.String),
    sa.column("org_id", sa.String),
    sa.column("run_id", BigId),
    sa.column("observed_at", Timestamp),
    sa.column("change", sa.String),
    sa.column("diff", JSONDoc),
    sa.column("source", sa.String),
    sa.column("edit_id", BigId),
    *(sa.column(name, JSONDoc if name in ("name", "device_metadata") else sa.String) for name in HISTORY),
)
devices_t = sa.table(
    "devices",
    sa.column("id", sa.String),
    sa.column("org_id", sa.String),
    sa.column("first_seen_at", Timestamp),
    sa.column("purged_at", Timestamp),
    *(sa.column(name, JSONDoc if name in ("name", "device_metadata") else sa.String) for name in HISTORY),
)
runs_t = sa.table(
    "sync_runs", sa.column("id", BigId), sa.column("org_id", sa.String), sa.column("started_at", Timestamp)
)
portals_t = sa.table(
    "portal_restrictions",
    sa.column("device_id", sa.String),
    sa.column("org_id", sa.String),
    sa.column("status", sa.String),
    sa.column("fetched_at", Timestamp),
    sa.column("changed_at", Timestamp),
)
entities_t = sa.table(
    "door_restrictions",
    sa.column("device_id", sa.String),
    sa.column("entity_id", sa.String),
    sa.column("since", Timestamp),
)
access_t = sa.table(
    "door_access_intervals",
    *(sa.column(name, Timestamp) for name in ("valid_from", "valid_to", "changed_after", "last_confirmed_at")),
    *(sa.column(name, sa.String) for name in ("org_id", "device_id", "entity_id")),
    sa.column("anyone", sa.Boolean),
    *(sa.column(name, BigId) for name in ("from_run_id", "from_edit_id", "to_run_id", "to_edit_id")),
)


def _batches(bind: sa.Connection, query: sa.Select[Any]) -> Iterator[list[Any]]:
    """Keys in order, BATCH at a time (keyset paging: each round is one indexed read)."""
    last = None
    key = query.selected_columns[0]
    while True:
        page = bind.execute(query.where(key > last) if last is not None else query).scalars().all()
        if not page:
            return
        yield page
        last = page[-1]


def _rebuild_device_history(bind: sa.Connection) -> None:
    """Fill the new columns of every device's history rows, newest first from the mirror's row, and
    record each device's first version ('observed') where no 'created' row does."""
    c, d = changes_t, devices_t
    ids = sa.select(d.c.id).order_by(d.c.id).limit(BATCH)
    for batch in _batches(bind, ids):
        columns = _as_text(d, ("id", "org_id", "first_seen_at", *HISTORY))
        current = {row.id: row for row in bind.execute(sa.select(*columns).where(d.c.id.in_(batch)))}
        history: dict[str, list[Any]] = {device_id: [] for device_id in batch}
        rows = bind.execute(
            sa.select(*_as_text(c, ("id", "device_id", "change", "diff")))
            .where(c.c.device_id.in_(batch), c.c.change != "restrictions")
            .order_by(c.c.device_id, c.c.observed_at.desc(), c.c.id.desc())
        )
        for row in rows:
            history[row.device_id].append(row)
        filled, observed = [], []
        for device_id, newest_first in history.items():
            device = current[device_id]
            values = {
                name: _json(getattr(device, name)) if name in JSON_NAMES else getattr(device, name) for name in HISTORY
            }
            created = False
            for row in newest_first:
                filled.append({"row_id": row.id, **{f"v_{name}": value for name, value in values.items()}})
                if row.change == "created":
                    created = True
                    break
                values = _undo(values, _json(row.diff))
            if not created:
                observed.append(
                    {
                        "device_id": device_id,
                        "org_id": device.org_id,
                        "run_id": _run_at(bind, device.org_id, device.first_seen_at),
                        "observed_at": device.first_seen_at,
                        "change": "observed",
                        "diff": None,
                        "source": "sync",
                        "edit_id": None,
                        **values,
                    }
                )
        if filled:
            bind.execute(
                sa.update(c)
                .where(c.c.id == sa.bindparam("row_id"))
                .values({n: sa.bindparam(f"v_{n}", type_=c.c[n].type) for n in HISTORY}),
                filled,
            )
        if observed:
            bind.execute(sa.insert(c), observed)


def _undo(after: dict[str, Any], diff: Any) -> dict[str, Any]:
    """The values before a change, from the values after it and its ``{field: {old, new}}`` diff."""
    before = dict(after)
    if not isinstance(diff, dict):
        return before
    for field, value in diff.items():
        old = value.get("old") if isinstance(value, dict) else None
        if field == "state" and old in ("active", "deleted", "purged"):
            before["state"] = old
        elif field == "name":
            before["name"] = _name(old)
        elif field in ("zone_id", "integration_id", "external_id"):
            before[field] = None if old is None or old == "" else str(old)
        elif field == "device_metadata":
            before[field] = old
        elif field == "deleted_at" and "state" not in diff and before["state"] != "purged":
            # Older diffs of a soft delete name deleted_at; the state follows from it.
            before["state"] = "active" if old is None else "deleted"
    return before


def _name(value: Any) -> dict[str, str] | None:
    """A LocalizedString as the mirror stores it (``{locale: text}``; a bare string is 'und')."""
    if isinstance(value, str):
        return {"und": value}
    if isinstance(value, dict):
        inner = value.get("value")
        if isinstance(inner, dict) and len(value) == 1:
            value = inner
        return {str(k): v for k, v in value.items() if isinstance(v, str)}
    return None


def _run_at(bind: sa.Connection, org_id: str, at: datetime | None) -> int | None:
    """The pass of an org that was running at ``at`` (the last one started by then)."""
    if at is None:
        return None
    r = runs_t
    query = sa.select(r.c.id).where(r.c.org_id == org_id, r.c.started_at <= at).order_by(r.c.started_at.desc())
    return bind.execute(query.limit(1)).scalar()


def _rebuild_door_access(bind: sa.Connection) -> None:
    """Door access intervals from each portal's 'restrictions' history rows and its current list.
    Periods that began before the first recorded list start at the earliest time the mirror proves."""
    c, p, e, d = changes_t, portals_t, entities_t, devices_t
    ids = sa.select(p.c.device_id).order_by(p.c.device_id).limit(BATCH)
    for batch in _batches(bind, ids):
        portals = {row.device_id: row for row in bind.execute(sa.select(p).where(p.c.device_id.in_(batch)))}
        since: dict[str, dict[str, datetime]] = {device_id: {} for device_id in batch}
        for row in bind.execute(sa.select(e).where(e.c.device_id.in_(batch))):
            since[row.device_id][row.entity_id] = row.since
        history: dict[str, list[Any]] = {device_id: [] for device_id in batch}
        for row in bind.execute(
            sa.select(*_as_text(c, ("device_id", "observed_at", "diff", "run_id", "edit_id")))
            .where(c.c.device_id.in_(batch), c.c.change == "restrictions")
            .order_by(c.c.device_id, c.c.observed_at, c.c.id)
        ):
            history[row.device_id].append(row)
        purged = dict(
            bind.execute(sa.select(d.c.id, d.c.purged_at).where(d.c.id.in_(batch), d.c.purged_at.is_not(None))).all()
        )
        rows: list[dict[str, Any]] = []
        for device_id, portal in portals.items():
            rows += _portal_intervals(portal, since[device_id], history[device_id], purged.get(device_id))
        if rows:
            bind.execute(sa.insert(access_t), rows)


def _portal_intervals(
    portal: Any, since: dict[str, datetime], history: list[Any], purged_at: datetime | None
) -> list[dict[str, Any]]:
    def who(entities: Any) -> set[str | None] | None:
        if not isinstance(entities, list):
            return None
        return {str(x) for x in entities} or {None}

    def lists(row: Any) -> tuple[Any, Any]:
        diff = _json(row.diff)
        change = diff.get("door_restrictions") if isinstance(diff, dict) else None
        return (change.get("old"), change.get("new")) if isinstance(change, dict) else (None, None)

    current = None if portal.status != "ok" else ({*since} or {None})
    first = who(lists(history[0])[0]) if history else current
    if first is None and not history:
        return []
    times = [t for t in (*since.values(), *(r.observed_at for r in history[:1]), portal.changed_at) if t is not None]
    start = min(times, default=portal.fetched_at)
    if start is None:
        return []
    open_: dict[str | None, dict[str, Any]] = {}
    closed: list[dict[str, Any]] = []

    def begin(entity: str | None, at: datetime, run_id: Any = None, edit_id: Any = None) -> None:
        open_[entity] = {
            "org_id": portal.org_id,
            "device_id": portal.device_id,
            "entity_id": entity,
            "anyone": entity is None,
            "valid_from": at,
            "valid_to": None,
            "changed_after": None,
            "last_confirmed_at": at,
            "from_run_id": run_id,
            "from_edit_id": edit_id,
            "to_run_id": None,
            "to_edit_id": None,
        }

    def end(entity: str | None, at: datetime, run_id: Any = None, edit_id: Any = None) -> None:
        interval = open_.pop(entity)
        closed.append({**interval, "valid_to": at, "to_run_id": run_id, "to_edit_id": edit_id})

    for entity in first or ():
        begin(entity, start)
    for row in history:
        new = who(lists(row)[1]) or set()
        for entity in [x for x in open_ if x not in new]:
            end(entity, row.observed_at, row.run_id, row.edit_id)
        for entity in new - open_.keys():
            begin(entity, row.observed_at, row.run_id, row.edit_id)
    confirmed = portal.fetched_at or start
    if portal.status == "ok":  # the current list is the truth where history rows were lost
        wanted = current or set()
        for entity in [x for x in open_ if x not in wanted]:
            end(entity, confirmed)
        for entity in wanted - open_.keys():
            begin(entity, since.get(entity, confirmed) if entity is not None else confirmed)
    for interval in open_.values():
        interval["last_confirmed_at"] = max(confirmed, interval["valid_from"])
    if purged_at is not None:
        for entity in list(open_):
            end(entity, max(purged_at, open_[entity]["valid_from"]))
    return closed + list(open_.values())


def _json(text: str | None) -> Any:
    """A JSON column read as text (SQLite keeps a bare number as a number, which JSON would not read)."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None  # a row written by hand that is not JSON records nothing


def _as_text(table: Any, names: tuple[str, ...]) -> list[Any]:
    return [sa.cast(table.c[n], sa.Text).label(n) if n in JSON_NAMES else table.c[n] for n in names]
