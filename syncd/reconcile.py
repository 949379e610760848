"""Write-back: push queued local edits (``device_edits``) to OpenApp.

Per edit: validate it (an OpenApp device id, a payload syncd can push, and the org: always the
mirror's org of the device, which must be a configured one; an ``org_id`` written into the row that
says otherwise fails the edit, nothing is sent), fetch the device, detect a conflicting remote
change (``updated_at`` newer than ``base_updated_at``), push with update_device / restore_device,
then record the result and update the mirror from OpenApp's answer in one transaction. Transient
failures are retried later (exponential backoff with full jitter, honouring Retry-After) up to
``writeback.max_attempts``; permanent ones fail at once; a 401 pauses the reconciler without
burning attempts. An edit left ``in_flight`` by a crash is re-checked once its lease expires: if
OpenApp already shows the change it succeeded, otherwise it is pushed again (PUT and restore are
safe to repeat). Every attempt first checks whether OpenApp already shows the edit's effect (after
an attempt whose answer was lost, say): then it succeeds without a push, and is no conflict.
"""

from __future__ import annotations

import getpass
import socket
import threading
from collections import Counter
from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Any

import structlog

from syncd.api import OpenAppClient
from syncd.backoff import backoff_delay
from syncd.config import WritebackSettings
from syncd.errors import (
    AuthError,
    ConfigError,
    InvalidResponseError,
    NotFoundError,
    RejectedError,
    StoppedError,
    SyncdError,
    TransientError,
)
from syncd.health import AuthGate
from syncd.metrics import EDIT_RESULTS
from syncd.models import (
    Device,
    change_kind,
    check_device_id,
    describe_change,
    edit_applied,
    parse_device,
    preview,
    remote_values,
    utcnow,
    validate_edit,
)
from syncd.store import Store
from syncd.store.edits import EditQueue

log = structlog.get_logger(__name__)
WRITEBACK = "write-back"  # who asks the AuthGate


def requester() -> str:
    """``user@host`` of whoever runs the CLI."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def queue_edit(
    store: Store,
    device_id: str,
    action: str,
    payload: dict[str, Any] | None,
    requested_by: str,
    orgs: Collection[str],
) -> int:
    """Validate an edit against the mirror and the configured ``orgs``, and queue it; ConfigError
    names what is wrong."""
    try:
        check_device_id(device_id)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    problem = validate_edit(action, payload)
    if problem:
        raise ConfigError(f"edit of {device_id}: {problem}")
    device = store.device(device_id)
    if device is None:
        raise ConfigError(f"device {device_id} is not in the mirror (run `syncd run-once` first, or check the id)")
    if device["org_id"] not in orgs:
        raise ConfigError(f"device {device_id} belongs to org {preview(device['org_id'])}, which is not configured")
    if device["state"] == "purged":
        raise ConfigError(f"device {device_id} was purged from OpenApp; it cannot be edited or restored")
    if action == "restore" and device["state"] != "deleted":
        raise ConfigError(f"device {device_id} is not soft-deleted (state {device['state']}); nothing to restore")
    return EditQueue(store).add(
        {
            "device_id": device_id,
            "org_id": device["org_id"],
            "action": action,
            "payload": payload if action == "update" else None,
            "base_updated_at": device["updated_at"],
            "requested_by": requested_by,
        }
    )


class Reconciler:
    """Claims due edits and pushes them; one instance per process."""

    def __init__(
        self,
        client: OpenAppClient,
        store: Store,
        settings: WritebackSettings,
        instance: str,
        orgs: Collection[str],
        stop: threading.Event | None = None,
        *,
        auth: AuthGate | None = None,
    ) -> None:
        """``orgs``: the configured org ids; edits of devices of any other org fail unsent. ``auth``:
        the gate a 401 closes (shared with the daemon's passes there)."""
        self.client = client
        self.store = store
        self.orgs = frozenset(orgs)
        self.queue = EditQueue(store)
        self.settings = settings
        self.instance = instance
        self.stop = stop or threading.Event()
        self.auth = auth or AuthGate()

    def run_once(self) -> Counter[str]:
        """Process every edit due now (each at most once); returns how many ended how."""
        results: Counter[str] = Counter()
        if not self.auth.admit(WRITEBACK):  # the key was rejected: wait for the pause to run out
            return results
        try:
            self._round(results)
        finally:
            self.auth.done(WRITEBACK)
        return results

    def _round(self, results: Counter[str]) -> None:
        started = utcnow()
        seen: set[int] = set()
        while not self.stop.is_set():
            lease_cutoff = utcnow() - timedelta(seconds=self.settings.lease_timeout)
            claimed = self.queue.claim(started, lease_cutoff, self.settings.batch_size, self.instance)
            fresh = [r for r in claimed if r["id"] not in seen]
            self.queue.release([r["id"] for r in claimed if r["id"] in seen], utcnow())
            if not fresh:
                break
            for index, row in enumerate(fresh):
                seen.add(row["id"])
                if self.stop.is_set():
                    self.queue.release([r["id"] for r in fresh[index:]], utcnow())
                    return
                result = self._process(row)
                results[result] += 1
                EDIT_RESULTS.labels(result).inc()
                if result in ("paused", "stopped"):
                    self.queue.release([r["id"] for r in fresh[index + 1 :]], utcnow())
                    return

    # -- one edit ----------------------------------------------------------------------------------

    def _process(self, row: dict[str, Any]) -> str:
        edit_log = log.bind(edit_id=row["id"], device_id=preview(row["device_id"]))
        action, payload = row["action"], row["payload"]
        mirrored, problem = None, None
        try:
            check_device_id(row["device_id"])
        except ValueError as exc:
            problem = f"{exc}; nothing was sent"
        else:
            problem = "; ".join(row["unreadable"]) or validate_edit(action, payload)
            mirrored = self.store.device(row["device_id"])
            if problem is None:
                problem = self._org_problem(row, mirrored)
        if problem:
            return self._fail(row, problem, edit_log)
        assert mirrored is not None
        org_id = mirrored["org_id"]
        base = row["base_updated_at"] or mirrored["updated_at"]
        try:
            remote = self._fetch(org_id, row["device_id"])
            if edit_applied(remote, action, payload):
                # Also after an attempt whose answer was lost (the server applied it, the connection
                # dropped): the edit's own effect is not a conflict, and pushing it again is not needed.
                if row["attempts"] > 1 or row["recheck"]:
                    edit_log.info("edit found applied after an attempt whose outcome was unknown")
                return self._succeed(row, remote, mirrored, overwrote=base)
            if action == "restore":
                return self._restore(row, org_id, remote, mirrored, edit_log)
            if (
                self.settings.conflict_policy == "detect"
                and base is not None
                and remote.updated_at is not None
                and remote.updated_at > base
            ):
                return self._conflict(row, remote, edit_log)
            answer = self.client.update_device(org_id, row["device_id"], payload)
            return self._succeed(row, parse_device(answer), mirrored, overwrote=remote.updated_at)
        except AuthError as exc:
            return self._pause(row, exc)
        except StoppedError:  # only reads are interrupted: nothing was pushed
            self.queue.release([row["id"]], utcnow())
            return "stopped"
        except NotFoundError as exc:
            return self._fail(row, "the device no longer exists in OpenApp (purged)", edit_log, exc)
        except TransientError as exc:
            return self._retry_later(row, exc, edit_log)
        except SyncdError as exc:  # permanent API errors, unreadable answers
            return self._fail(row, str(exc), edit_log, exc)

    def _org_problem(self, row: dict[str, Any], mirrored: dict[str, Any] | None) -> str | None:
        """Why the edit may not be sent for this org, or None. The org is the mirror's org of the
        device; a row is not trusted to name it."""
        if mirrored is None:
            return "unknown device: it is not in the mirror"
        org_id = mirrored["org_id"]
        if row["org_id"] is not None and row["org_id"] != org_id:
            return (
                f"org_id {preview(row['org_id'])} is not the device's org ({preview(org_id)} in the mirror); "
                "nothing was sent"
            )
        if org_id not in self.orgs:
            return f"the device's org {preview(org_id)} is not configured in this syncd; nothing was sent"
        return None

    def _fetch(self, org_id: str, device_id: str) -> Device:
        raw = self.client.get_device(org_id, device_id)
        try:
            return parse_device(raw)
        except InvalidResponseError as exc:
            raise InvalidResponseError(f"get_device: {exc}") from exc

    def _restore(
        self, row: dict[str, Any], org_id: str, remote: Device, mirrored: dict[str, Any], edit_log: Any
    ) -> str:
        if remote.deleted_at is None:
            edit_log.info("restore: the device is already active")
            return self._succeed(row, remote, mirrored)
        try:
            answer = self.client.restore_device(org_id, row["device_id"])
        except RejectedError as exc:
            if exc.status != 422:
                raise
            confirmed = self._fetch(org_id, row["device_id"])  # 422 "not soft-deleted": check, then accept
            if confirmed.deleted_at is None:
                return self._succeed(row, confirmed, mirrored)
            raise
        return self._succeed(row, parse_device(answer), mirrored)

    # -- outcomes ----------------------------------------------------------------------------------

    def _succeed(
        self, row: dict[str, Any], device: Device, mirrored: dict[str, Any], overwrote: datetime | None = None
    ) -> str:
        now = utcnow()
        kind = change_kind(mirrored["state"], device.state)
        diff = describe_change(mirrored["raw"], device.raw, mirrored["state"], device.state)
        self.queue.finish(
            row["id"],
            {"status": "succeeded", "applied_at": now, "last_error": None, "last_status_code": 200},
            now,
            device=device,
            change=(kind, diff) if diff else None,
            rebase_from=overwrote,
        )
        log.info("edit applied", edit_id=row["id"], device_id=row["device_id"], action=row["action"])
        if self.auth.accepted():
            log.info("OpenApp accepted the API key again: write-back resumed")
        return "succeeded"

    def _conflict(self, row: dict[str, Any], remote: Device, edit_log: Any) -> str:
        now = utcnow()
        message = (
            f"OpenApp changed the device at {remote.updated_at.isoformat() if remote.updated_at else '?'}, "
            f"after the edit was queued (base {row['base_updated_at']}); nothing was pushed. "
            "`syncd edits retry ID` pushes it anyway; `syncd edits cancel ID` drops it"
        )
        self.queue.finish(
            row["id"],
            {
                "status": "conflict",
                "last_error": message,
                "remote": remote_values(remote, row["payload"]),
                "base_updated_at": remote.updated_at or row["base_updated_at"],
            },
            now,
            device=remote,
        )
        edit_log.warning("edit conflicts with a remote change", remote_updated_at=str(remote.updated_at))
        return "conflict"

    def _fail(self, row: dict[str, Any], reason: str, edit_log: Any, exc: SyncdError | None = None) -> str:
        self.queue.finish(
            row["id"],
            {"status": "failed", "last_error": reason, "last_status_code": exc.status if exc else None},
            utcnow(),
        )
        edit_log.warning("edit failed", error=reason)
        return "failed"

    def _retry_later(self, row: dict[str, Any], exc: TransientError, edit_log: Any) -> str:
        attempts = int(row["attempts"])
        if attempts >= self.settings.max_attempts:
            return self._fail(row, f"gave up after {attempts} attempts: {exc}", edit_log, exc)
        delay = (
            exc.retry_after
            if exc.retry_after is not None
            else backoff_delay(attempts, self.settings.base_delay, self.settings.max_delay)
        )
        now = utcnow()
        self.queue.finish(
            row["id"],
            {
                "status": "pending",
                "next_attempt_at": now + timedelta(seconds=delay),
                "last_error": str(exc),
                "last_status_code": exc.status,
            },
            now,
        )
        edit_log.debug("edit will be retried", attempt=attempts, delay=round(delay, 2), error=str(exc))
        return "retrying"

    def _pause(self, row: dict[str, Any], exc: AuthError) -> str:
        self.queue.release([row["id"]], utcnow())
        if self.auth.rejected(max(self.settings.interval, 30.0)):
            log.error("OpenApp rejected the API key: write-back is paused (no attempts are used up)", error=str(exc))
        return "paused"
