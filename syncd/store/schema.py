"""The mirror's tables: the documented public SQL interface of syncd (see README, "Schema")."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.types import TypeEngine

from syncd.vocab import (
    ChangeKind,
    ChangeSource,
    DeviceState,
    EditAction,
    EditSource,
    EditStatus,
    HoldReason,
    RestrictionStatus,
    RunStatus,
    RunTrigger,
)

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = MetaData(naming_convention=NAMING)
# The newest migration in migrations/versions (a test keeps the two in step).
SCHEMA_REVISION = "0013"


class JSONDoc(TypeDecorator[Any]):
    """JSON on SQLite, JSONB on PostgreSQL; Python None is SQL NULL, not the JSON literal null.

    (Not ``JSON().with_variant(JSONB())``: that imports SQLAlchemy's whole PostgreSQL dialect, and
    its async drivers, into every SQLite process.)

    SQLite gives the column NUMERIC affinity, so a value that is just a number (``device_metadata``
    may be one) is stored as a number: it comes back as one, and an integer beyond 64 bits comes
    back as the nearest double.
    """

    impl = JSON(none_as_null=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import JSONB

            return dialect.type_descriptor(JSONB(none_as_null=True))
        return dialect.type_descriptor(JSON(none_as_null=True))

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        decode = super().result_processor(dialect, coltype)
        if dialect.name != "sqlite" or decode is None:
            return decode

        def numbers_stay_numbers(value: Any) -> Any:
            return value if isinstance(value, int | float) else decode(value)

        return numbers_stay_numbers


# Autoincrement ids: BIGINT on PostgreSQL, INTEGER (rowid alias) on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on the Python side on both databases.

    PostgreSQL stores ``timestamptz``; SQLite stores UTC text (``YYYY-MM-DD HH:MM:SS.ffffff``).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: syncd stores aware UTC timestamps only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        moment: datetime = value
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _one_of(column: str, values: type[StrEnum]) -> str:
    """The CHECK text that holds a column to its vocabulary (``tests/test_vocab.py`` reads it back)."""
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


devices = Table(
    "devices",
    metadata,
    Column("id", String(64), primary_key=True, comment="OpenApp device id (ULID)"),
    Column("org_id", String(64), nullable=False),
    Column("integration_id", String(64)),
    Column("zone_id", String(64)),
    Column("external_id", Text),
    Column("name", JSONDoc, nullable=False, comment="{locale: text}; 'und' when OpenApp sent a bare string"),
    Column("device_metadata", JSONDoc),
    Column(
        "credentials_set",
        JSONDoc,
        comment="as received: JSON Pointers of write-only credential fields that hold a value, or a boolean",
    ),
    Column("has_credentials", Boolean, comment="credentials_set in either form: any credential stored"),
    Column("created_at", UTCDateTime),
    Column("updated_at", UTCDateTime),
    Column("deleted_at", UTCDateTime),
    Column("purge_at", UTCDateTime),
    Column("hard_delete_at", UTCDateTime),
    Column("state", String(16), nullable=False),
    Column("purged_at", UTCDateTime, comment="when syncd confirmed the purge (GET answered 404)"),
    Column("first_seen_at", UTCDateTime, nullable=False),
    Column("last_seen_at", UTCDateTime, nullable=False),
    Column("last_changed_at", UTCDateTime, nullable=False),
    Column("fingerprint", String(32), nullable=False, comment="digest of raw, for change detection"),
    Column("raw", JSONDoc, nullable=False, comment="the DeviceResponse as last received"),
    CheckConstraint(_one_of("state", DeviceState), name="state"),
    Index(None, "org_id", "state"),
)

sync_runs = Table(
    "sync_runs",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("org_id", String(64), nullable=False),
    Column("trigger", String(16), nullable=False),
    Column("instance", String(255), nullable=False, comment="host:pid of the syncd process"),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Column("status", String(16), nullable=False),
    Column("pages", Integer, nullable=False, server_default="0"),
    Column("requests", Integer, nullable=False, server_default="0"),
    Column("devices_seen", Integer, nullable=False, server_default="0"),
    Column("created", Integer, nullable=False, server_default="0"),
    Column("updated", Integer, nullable=False, server_default="0"),
    Column("unchanged", Integer, nullable=False, server_default="0"),
    Column("deleted", Integer, nullable=False, server_default="0"),
    Column("restored", Integer, nullable=False, server_default="0"),
    Column("purged", Integer, nullable=False, server_default="0"),
    Column("rejected", Integer, nullable=False, server_default="0"),
    Column("error", Text),
    Column("unreadable", Integer, nullable=False, server_default="0"),
    Column("duplicates", Integer, nullable=False, server_default="0"),
    Column("restrictions", Integer, nullable=False, server_default="0", comment="portals whose restrictions changed"),
    Column("restriction_requests", Integer, nullable=False, server_default="0"),
    Column("restriction_failures", Integer, nullable=False, server_default="0"),
    Column("definition_requests", Integer, nullable=False, server_default="0"),
    Column("definition_failures", Integer, nullable=False, server_default="0"),
    CheckConstraint(_one_of("status", RunStatus), name="status"),
    CheckConstraint(_one_of("trigger", RunTrigger), name="trigger"),
    Index(None, "org_id", "started_at"),
    Index(None, "status"),
)

org_schedule = Table(
    "org_schedule",
    metadata,
    Column("org_id", String(64), primary_key=True),
    Column(
        "pass_started_at",
        UTCDateTime,
        comment="start of the org's last scheduled pass, on the database's clock (NULL: none counts)",
    ),
    Column("instance", String(255), comment="host:pid of the syncd that started it"),
    comment="PostgreSQL: which daemon last started a scheduled pass of each org, and when",
)

# syncd's own bookkeeping (not for reports): what lets a pass take a list page it has compared
# before without comparing it again device by device (syncd.sync.unchanged).
list_pages = Table(
    "list_pages",
    metadata,
    Column("org_id", String(64), primary_key=True),
    Column("page_offset", Integer, primary_key=True),
    Column("scope", String(32), nullable=False, comment="digest of how the page was asked for and read"),
    Column("digest", String(32), nullable=False, comment="xxh3-128 of the page's body as received"),
    Column("generation", BigInteger, nullable=False, comment="org_generations.generation when it was compared"),
    Column("run_id", BigInteger, nullable=False, comment="the sync_runs row of the pass that compared it"),
    Column(
        "settled",
        Boolean,
        nullable=False,
        comment="that pass read its whole list and met no device on more than one page: the page is trusted",
    ),
    Column(
        "seen_since",
        UTCDateTime,
        nullable=False,
        comment="the oldest last_seen_at of the page's devices when it was compared",
    ),
    Column("item_count", Integer, nullable=False, comment="how many items the page held"),
    Column("total", BigInteger, nullable=True, comment="the answer's total, if it gave one"),
    Column("first_id", String(64), nullable=True, comment="the id of the page's first device"),
    Column(
        "summary",
        LargeBinary,
        nullable=False,
        comment="what a pass takes from the page instead of reading it: its device ids, active portals, integrations",
    ),
    comment="syncd's own: list pages compared whole with the mirror, each with the body it had then",
)

org_generations = Table(
    "org_generations",
    metadata,
    Column("org_id", String(64), primary_key=True),
    Column("generation", BigInteger, nullable=False),
    comment="syncd's own: bumped by every write to an org's devices that is not a list page's compare "
    "(purges, pushed edits, devices confirmed one by one); list_pages of an older generation are not trusted",
)

device_changes = Table(
    "device_changes",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("device_id", String(64), ForeignKey("devices.id"), nullable=False),
    Column("org_id", String(64), nullable=False),
    Column("run_id", BigId, ForeignKey("sync_runs.id")),
    Column("observed_at", UTCDateTime, nullable=False),
    Column("change", String(16), nullable=False),
    Column("diff", JSONDoc, comment="{field: {old, new}} of what changed; NULL for 'created'"),
    Column("source", String(16), nullable=False, server_default=ChangeSource.SYNC.value, comment="sync, or local_edit"),
    Column("edit_id", BigId, comment="the device_edits row, for local edits"),
    Column("requested_by", String(255), comment="local edits: who queued the edit (device_edits.requested_by)"),
    Column("approved_by", String(255), comment="local edits: who approved it, when its kind needed an approval"),
    # The device as it was after the change (NULL on 'restrictions' rows): what device_versions and
    # the as-of reports read. Built with the row, in one place (syncd.models.history_row).
    Column("state", String(16), comment="the device's state after the change"),
    Column("name", JSONDoc, comment="its name after the change, {locale: text}"),
    Column("zone_id", String(64)),
    Column("integration_id", String(64)),
    Column("external_id", Text),
    Column("device_metadata", JSONDoc),
    CheckConstraint(_one_of("change", ChangeKind), name="change"),
    Index(None, "org_id", "observed_at"),
    Index(None, "device_id", "observed_at"),
    Index(None, "run_id"),
)

device_edits = Table(
    "device_edits",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("device_id", String(64), nullable=False),
    Column("org_id", String(64), comment="taken from the mirror when omitted"),
    Column("action", String(32), nullable=False, server_default=EditAction.UPDATE.value),
    Column("payload", JSONDoc, comment="UpdateDeviceRequest fields: name, zone_id, external_id, device_metadata"),
    Column("base", JSONDoc, comment="the mirror's values of the fields the edit sets, when it was queued"),
    Column("base_updated_at", UTCDateTime, comment="the mirror's updated_at when queued"),
    Column("status", String(32), nullable=False, server_default=EditStatus.PENDING.value),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", UTCDateTime, comment="NULL: due now"),
    Column("last_status_code", Integer),
    Column("last_error", Text),
    Column("remote", JSONDoc, comment="on conflict: OpenApp's current values of the fields the edit sets"),
    Column("claimed_by", String(255)),
    Column("claimed_at", UTCDateTime),
    Column("created_at", UTCDateTime, nullable=False, server_default=text("CURRENT_TIMESTAMP")),
    Column("updated_at", UTCDateTime, nullable=False, server_default=text("CURRENT_TIMESTAMP")),
    Column("applied_at", UTCDateTime),
    # DEFAULT session_user on PostgreSQL, 'sql' on SQLite (set by migration 0009: the two differ).
    Column(
        "requested_by",
        String(255),
        nullable=False,
        comment="who queued the edit: user@host from the CLI; the session's role for SQL on PostgreSQL",
    ),
    Column(
        "sent_at",
        UTCDateTime,
        comment="when syncd last sent the edit's write to OpenApp, on the database's clock, recorded before "
        "the request went out (outcome known or not); the delete cap counts these",
    ),
    Column(
        "credential_pointers",
        JSONDoc,
        comment="JSON Pointers of credential values in payload.device_metadata (found when queued and when "
        "pushed): masked in output, and replaced by ******** once pushed",
    ),
    Column("requested_via", String(8), nullable=False, server_default=EditSource.SQL.value, comment="cli or sql"),
    Column(
        "requested_at",
        UTCDateTime,
        nullable=False,
        server_default=text("CURRENT_TIMESTAMP"),
        comment="when the edit was queued, on the database's clock",
    ),
    Column(
        "approval_requested_at",
        UTCDateTime,
        comment="when the edit began to await approval, on the database's clock (writeback.approval_ttl counts "
        "from here)",
    ),
    Column("approved_by", String(255), comment="who approved the edit (never its requester)"),
    Column("approved_at", UTCDateTime),
    Column("rejected_by", String(255)),
    Column("rejected_at", UTCDateTime),
    Column(
        "reason",
        Text,
        comment="why the edit ended unsent by a person's or a rule's decision: a rejection's reason, or that no "
        "approval came within writeback.approval_ttl",
    ),
    CheckConstraint(_one_of("action", EditAction), name="action"),
    CheckConstraint(_one_of("status", EditStatus), name="status"),
    Column(
        "held_by",
        String(16),
        comment="why a pending edit waits unsent: send_cap (its kind's cap on sends, e.g. "
        "writeback.max_deletes_per_hour; last_error says until when); NULL: not held",
    ),
    CheckConstraint(_one_of("requested_via", EditSource), name="requested_via"),
    CheckConstraint(_one_of("held_by", HoldReason), name="held_by"),
    Index(None, "status", "next_attempt_at"),
    Index(None, "device_id", "id"),
    Index(None, "action", "sent_at"),
)

# Door restrictions: one row per portal syncd has asked (portal_restrictions), one per portal and
# entity it restricts to (door_restrictions). An answered portal without door_restrictions rows is
# not restricted.
portal_restrictions = Table(
    "portal_restrictions",
    metadata,
    Column("device_id", String(64), ForeignKey("devices.id"), primary_key=True, comment="the portal"),
    Column("org_id", String(64), nullable=False),
    Column("status", String(16), nullable=False, comment="ok, not_a_portal (400), not_found (404), failed"),
    Column("restricted", Boolean, comment="the last answer listed entities (false: no restriction)"),
    Column("entity_count", Integer),
    Column("body_key", String(32), comment="apartment_entity_ids or listing_entity_ids, as the answer had it"),
    Column("raw", JSONDoc, comment="the last DoorRestrictionsResponse as received"),
    Column("fetched_at", UTCDateTime, comment="the last answer"),
    Column("changed_at", UTCDateTime, comment="when the list last changed"),
    Column("attempted_at", UTCDateTime, nullable=False),
    Column("next_fetch_at", UTCDateTime, nullable=False, comment="asked again after this, or when the device changes"),
    Column("device_fingerprint", String(32), comment="devices.fingerprint when last asked"),
    Column("last_error", Text),
    Column("failures", Integer, nullable=False, server_default="0", comment="failed attempts in a row"),
    CheckConstraint(_one_of("status", RestrictionStatus), name="status"),
    Index(None, "org_id", "next_fetch_at"),
)

door_restrictions = Table(
    "door_restrictions",
    metadata,
    Column("device_id", String(64), ForeignKey("devices.id"), primary_key=True, comment="the portal"),
    Column("entity_id", String(64), primary_key=True, comment="an apartment / listing it lets through"),
    Column("org_id", String(64), nullable=False),
    Column("since", UTCDateTime, nullable=False, comment="when syncd first saw the entity on the portal"),
    Index(None, "entity_id"),
    Index(None, "org_id"),
)

# Who could pass each portal, and when, as syncd observed it: one row per period in which an entity
# was on a portal's list, or (anyone) the portal was unrestricted. Written with portal_restrictions,
# in the same transaction (syncd.store.details.write_answers).
door_access_intervals = Table(
    "door_access_intervals",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("org_id", String(64), nullable=False),
    Column("device_id", String(64), ForeignKey("devices.id"), nullable=False, comment="the portal"),
    Column("entity_id", String(64), comment="the apartment / listing let through; NULL when anyone may pass"),
    Column("anyone", Boolean, nullable=False, comment="true: the portal was unrestricted (an empty list)"),
    Column("valid_from", UTCDateTime, nullable=False, comment="when syncd first saw it so"),
    Column("valid_to", UTCDateTime, comment="when syncd first saw it no longer so (NULL: still so)"),
    Column(
        "changed_after",
        UTCDateTime,
        comment="the portal's check before valid_from, which saw it otherwise: the change happened after this "
        "(NULL: syncd had not asked before)",
    ),
    Column("last_confirmed_at", UTCDateTime, nullable=False, comment="the last check that saw it so"),
    Column("from_run_id", BigId, comment="the pass that saw it begin (NULL: a local edit, or reconstructed)"),
    Column("from_edit_id", BigId, comment="the device_edits row that set it, if syncd pushed it"),
    Column("to_run_id", BigId, comment="the pass that saw it end"),
    Column("to_edit_id", BigId, comment="the device_edits row that ended it, if syncd pushed it"),
    CheckConstraint("anyone = (entity_id IS NULL)", name="anyone"),
    Index(None, "device_id", "valid_from"),
    Index(None, "entity_id", "valid_from"),
    Index(None, "org_id", "valid_from"),
)

# A provider's JSON Schema of device_metadata, asked of one device per integration (the shape of
# device_metadata depends on the integration's provider).
metadata_definitions = Table(
    "metadata_definitions",
    metadata,
    Column("org_id", String(64), primary_key=True),
    Column("integration_id", String(64), primary_key=True),
    Column("provider_type", String(64)),
    Column("json_schema", JSONDoc, comment="JSON Schema of device_metadata for this provider"),
    Column("fingerprint", String(32), comment="digest of json_schema (key order aside)"),
    Column("device_id", String(64), comment="the device it was asked of"),
    Column("raw", JSONDoc, comment="the last DeviceMetadataDefinitionResponse as received"),
    Column("fetched_at", UTCDateTime, comment="the last answer"),
    Column("changed_at", UTCDateTime, comment="when json_schema last changed"),
    Column("attempted_at", UTCDateTime, nullable=False),
    Column("next_fetch_at", UTCDateTime, nullable=False),
    Column("last_error", Text),
    Column("failures", Integer, nullable=False, server_default="0", comment="failed attempts in a row"),
    Column(
        "schema_problem",
        Text,
        comment="why syncd will not check metadata edits against json_schema (NULL: it is usable); "
        "metadata edits of this integration fail unsent while it is set",
    ),
    Index(None, "provider_type"),
)

RUN_COUNTERS = (
    "pages",
    "requests",
    "devices_seen",
    "created",
    "updated",
    "unchanged",
    "deleted",
    "restored",
    "purged",
    "rejected",
    "unreadable",
    "duplicates",
    "restrictions",
    "restriction_requests",
    "restriction_failures",
    "definition_requests",
    "definition_failures",
)
