"""syncd's vocabularies: every set of words the mirror stores, checks or passes around as text, one
``StrEnum`` each and nowhere else.

A member is its value where it counts: it equals the string, binds as the string in SQL, prints and
serialises (``str``, f-strings, ``json``, ``orjson`` values) as the string. ``repr`` and ``orjson``
dict keys differ: use ``.value`` there. ``tests/test_vocab.py`` ties every CHECK constraint of the
schema and of the migrated databases to its enum.
"""

from __future__ import annotations

from enum import StrEnum


class DeviceState(StrEnum):
    """``devices.state`` (and ``device_changes.state``): where a device is in its life."""

    ACTIVE = "active"
    DELETED = "deleted"  # soft-deleted by OpenApp: restorable until purged
    PURGED = "purged"  # gone for good: OpenApp answers 404


class ChangeKind(StrEnum):
    """``device_changes.change``: what happened to a device."""

    OBSERVED = "observed"  # first seen by an org's first (baseline) pass: created now or long before
    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"
    RESTORED = "restored"
    PURGED = "purged"
    RESTRICTIONS = "restrictions"  # a portal's door restrictions changed


class ChangeSource(StrEnum):
    """``device_changes.source``: who made the change syncd recorded."""

    SYNC = "sync"  # a pass saw it on OpenApp
    LOCAL_EDIT = "local_edit"  # syncd pushed it (``edit_id`` names the edit)


class RunStatus(StrEnum):
    """``sync_runs.status``: a pass's run row, open (running) or how it ended."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"


class PassStatus(StrEnum):
    """How one org's pass ended, for its caller: a run's end, or skipped (no run: another pass of
    the org held its lock, or it was not due)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"
    SKIPPED = "skipped"


class RunTrigger(StrEnum):
    """``sync_runs.trigger``: what started the pass."""

    SCHEDULED = "scheduled"
    RUN_ONCE = "run-once"


class EditAction(StrEnum):
    """``device_edits.action``: the kinds of local edit (one class each in ``syncd.edits.KINDS``)."""

    UPDATE = "update"
    RESTORE = "restore"
    DELETE = "delete"
    DOOR_RESTRICTIONS = "door_restrictions"


class EditStatus(StrEnum):
    """``device_edits.status``: where an edit is in its life."""

    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CONFLICT = "conflict"
    CANCELLED = "cancelled"
    AWAITING_APPROVAL = "awaiting_approval"
    REJECTED = "rejected"


class HoldReason(StrEnum):
    """``device_edits.held_by``: why a pending edit waits unsent: its kind's cap on sends."""

    SEND_CAP = "send_cap"


class EditSource(StrEnum):
    """``device_edits.requested_via``: how the edit was queued."""

    CLI = "cli"
    SQL = "sql"


class RestrictionStatus(StrEnum):
    """``portal_restrictions.status``: the last answer to a portal's door restrictions."""

    OK = "ok"
    NOT_A_PORTAL = "not_a_portal"  # 400
    NOT_FOUND = "not_found"  # 404
    FAILED = "failed"


class EditResult(StrEnum):
    """What a write-back round did with one edit (or with several: expired), as the round counts it."""

    SUCCEEDED = "succeeded"
    CONFLICT = "conflict"
    FAILED = "failed"
    HELD = "held"  # its kind's cap on sends: pending, unsent
    RETRYING = "retrying"
    PAUSED = "paused"  # OpenApp refused the key: the round ends, the edit is untouched
    STOPPED = "stopped"
    LOST = "lost"  # its lease ran out and another reconciler claimed it
    EXPIRED = "expired"  # awaited approval past writeback.approval_ttl
