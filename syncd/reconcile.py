"""Write-back: push queued local edits (``device_edits``) to OpenApp. The reconciler only decides;
each kind of edit (:mod:`syncd.edits`) knows its payload, its reads and its push, and the queue
(:mod:`syncd.store.edits`) its transitions.

Per edit: check it (an OpenApp device id, a payload its kind can parse, and the org: always the
mirror's org of the device, which must be a configured one; an ``org_id`` written into the row that
says otherwise fails the edit, nothing is sent); read the device (and what the kind needs: a
portal's restrictions, the provider's metadata schema, which an edit's metadata must satisfy);
when OpenApp already shows the edit, it succeeded (also after an attempt whose answer was lost);
a field OpenApp changed away from both the edit's base and its value is a conflict (unless
``conflict_policy = force``); a send its kind's hold rule refuses waits (``held_by``: a soft
delete beyond ``writeback.max_deletes_per_hour``); else push, then record the result and update
the mirror from OpenApp's answer in one transaction. Nothing here is kind-specific.

Transient failures are retried later (exponential backoff with full jitter, honouring
Retry-After) up to ``writeback.max_attempts``; permanent ones fail at once; a 401 pauses the
reconciler without burning attempts. An edit left ``in_flight`` by a crash is checked again once
its lease expires (every push is safe to repeat).
"""

from __future__ import annotations

import contextlib
import getpass
import socket
import threading
import traceback
from collections import Counter
from collections.abc import Collection
from datetime import timedelta
from typing import Any

import structlog

from syncd.api import OpenAppClient
from syncd.backoff import backoff_delay
from syncd.config import WritebackSettings
from syncd.edits import KINDS, EditKind, EditProblem, HoldRule, Mirrored, Outcome, Reading, Remote, read_mirrored
from syncd.errors import (
    AuthError,
    ClaimLostError,
    InvalidResponseError,
    NotFoundError,
    StoppedError,
    StoreError,
    SyncdError,
    TransientError,
)
from syncd.health import AuthGate
from syncd.metrics import EDIT_RESULTS
from syncd.models import Device, change_kind, check_device_id, describe_change, masked, parse_device, preview, utcnow
from syncd.store import Store
from syncd.store.edits import Edit, EditQueue, Held
from syncd.vocab import EditResult

log = structlog.get_logger(__name__)
WRITEBACK = "write-back"  # who asks the AuthGate


def requester() -> str:
    """``user@host`` of whoever runs the CLI."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


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
        self._bugs: set[tuple[str, str, int]] = set()  # kinds of bug already logged with a traceback

    def run_once(self) -> Counter[str]:
        """Process every edit due now (each at most once); returns how many ended how."""
        results: Counter[str] = Counter()
        lease = timedelta(seconds=self.settings.lease_timeout)
        self._enforce_approval(results, lease)  # needs no API: also while the key is refused
        if not self.auth.admit(WRITEBACK):  # the key was rejected: wait for the pause to run out
            return results
        try:
            self._round(results, lease)
        finally:
            self.auth.done(WRITEBACK)
        return results

    def _round(self, results: Counter[str], lease: timedelta) -> None:
        started = utcnow()
        seen: set[int] = set()
        needs_approval = self.settings.require_approval
        while not self.stop.is_set():
            claimed = self.queue.claim(started, lease, self.settings.batch_size, self.instance, needs_approval)
            fresh = [e for e in claimed if e.id not in seen]
            self.queue.release([e.id for e in claimed if e.id in seen], utcnow())
            if not fresh:
                break
            for index, edit in enumerate(fresh):
                seen.add(edit.id)
                if self.stop.is_set():
                    self.queue.release([e.id for e in fresh[index:]], utcnow())
                    return
                try:
                    result = self._process(edit)
                except BaseException:  # the database failed (or Ctrl-C): the rest go back, untouched
                    with contextlib.suppress(SyncdError):
                        self.queue.release([e.id for e in fresh[index + 1 :]], utcnow())
                    raise
                results[result] += 1
                EDIT_RESULTS.labels(result).inc()
                if result in (EditResult.PAUSED, EditResult.STOPPED):
                    self.queue.release([e.id for e in fresh[index + 1 :]], utcnow())
                    return

    def _enforce_approval(self, results: Counter[str], lease: timedelta) -> None:
        """Two-person approval, before anything is claimed: unapproved edits of the kinds that need
        an approval wait, approvals made in SQL take effect, waits past ``approval_ttl`` end."""
        ttl = timedelta(seconds=self.settings.approval_ttl)
        changed = self.queue.enforce_approval(self.settings.require_approval, ttl, lease)
        if changed.awaiting:
            log.info("edits await a second person's approval (`syncd edits approve ID`)", edits=changed.awaiting)
        if changed.approved:
            log.info("edits approved in SQL are pending", edits=changed.approved)
        if changed.expired:
            results[EditResult.EXPIRED] += len(changed.expired)
            EDIT_RESULTS.labels(EditResult.EXPIRED).inc(len(changed.expired))
            log.warning(
                "edits cancelled: nobody approved them within writeback.approval_ttl", edit_ids=list(changed.expired)
            )

    # -- one edit ----------------------------------------------------------------------------------

    def _process(self, edit: Edit) -> EditResult:
        """Decide and push one edit. Whatever goes wrong with it costs this edit only: a bug
        (any exception syncd did not foresee) fails it, or retries it when its write may have gone
        out, logged once with its traceback; only a database failure ends the round (the edit's
        lease brings it back)."""
        edit_log = log.bind(edit_id=edit.id, device_id=preview(edit.device_id), action=edit.action)
        attempt = _Attempt(edit)
        try:
            return self._decide(edit, attempt, edit_log)
        except StoreError:
            raise
        except Exception as exc:
            return self._bug(edit, exc, attempt, edit_log)

    def _decide(self, edit: Edit, attempt: _Attempt, edit_log: Any) -> EditResult:
        problem = self._problem(edit, attempt)
        if problem:
            return self._fail(edit, problem, edit_log)
        try:
            return self._send(edit, attempt, edit_log)
        except EditProblem as exc:
            return self._fail(edit, f"{exc}; nothing was sent", edit_log, attempt=attempt)
        except AuthError as exc:
            return self._pause(edit, exc)
        except StoppedError:  # only reads are interrupted: nothing was pushed
            self.queue.release([edit.id], utcnow())
            return EditResult.STOPPED
        except NotFoundError as exc:
            return self._fail(edit, "the device no longer exists in OpenApp (purged)", edit_log, exc, attempt)
        except TransientError as exc:
            return self._retry_later(edit, exc, edit_log, attempt)
        except ClaimLostError as exc:  # its lease ran out and another reconciler has it now
            edit_log.warning("edit left to the reconciler that claimed it since", error=str(exc))
            return EditResult.LOST
        except StoreError:
            raise
        except SyncdError as exc:  # permanent API errors, unreadable answers
            return self._fail(edit, str(exc), edit_log, exc, attempt)

    def _problem(self, edit: Edit, attempt: _Attempt) -> str | None:
        """Why the edit may not be sent at all, or None: then its payload is parsed and the mirrored
        device read (once), on ``attempt``. The org is the mirror's org of the device; a row is not
        trusted to name it."""
        try:
            check_device_id(edit.device_id)
        except ValueError as exc:
            return f"{exc}; nothing was sent"
        if edit.unreadable:
            return "; ".join(edit.unreadable)
        try:
            attempt.payload = attempt.kind.parse(edit.payload)
            attempt.mirrored = read_mirrored(self.store, edit.device_id)
        except (EditProblem, InvalidResponseError) as exc:
            return str(exc)
        if attempt.mirrored is None:
            return "unknown device: it is not in the mirror"
        org_id = attempt.mirrored.device.org_id
        if edit.org_id is not None and edit.org_id != org_id:
            return (
                f"org_id {preview(edit.org_id)} is not the device's org ({preview(org_id)} in the mirror); "
                "nothing was sent"
            )
        if org_id not in self.orgs:
            return f"the device's org {preview(org_id)} is not configured in this syncd; nothing was sent"
        recorded = edit.base  # the mirror's values of the fields it sets: when queued, else now
        attempt.base = (
            recorded if recorded is not None else attempt.kind.base(attempt.payload, attempt.mirrored, self.store)
        )
        return None

    def _send(self, edit: Edit, attempt: _Attempt, edit_log: Any) -> EditResult:
        """Read what the edit needs; then it is done already, in conflict, unsendable, held by its
        kind's hold rule, or pushed."""
        kind, payload = attempt.kind, attempt.payload
        remote = self._read(edit, attempt)
        if kind.applied(payload, remote):
            if edit.attempts > 1 or edit.recheck:
                edit_log.info("edit found applied in OpenApp after an attempt whose outcome was unknown")
            return self._succeed(edit, attempt, kind.found(payload, remote))
        unsent = self._unsent(edit, attempt, remote, edit_log)
        if unsent:
            return unsent
        rule = kind.hold_rule(self.settings)
        held = self.queue.sending(edit, rule.cap if rule else None, remote.credentials)
        if held is not None:
            assert rule is not None  # only a hold rule holds a send
            return self._hold(edit, rule, held, edit_log, attempt)
        attempt.sent = True
        return self._succeed(edit, attempt, kind.push(payload, remote, self._reading(edit, attempt)))

    def _read(self, edit: Edit, attempt: _Attempt) -> Remote:
        """OpenApp's device (or the mirror's, when the kind's own read says whether it exists) and
        what else the kind reads."""
        mirrored = attempt.ready()
        device = self._fetch(mirrored.device.org_id, edit.device_id) if attempt.kind.reads_device else mirrored.device
        attempt.remote = remote = Remote(device)
        return attempt.kind.read(attempt.payload, remote, self._reading(edit, attempt))

    def _unsent(self, edit: Edit, attempt: _Attempt, remote: Remote, edit_log: Any) -> EditResult | None:
        """The edit's end when it must not be sent now (a conflict, or unsendable), else None."""
        kind, payload = attempt.kind, attempt.payload
        if self.settings.conflict_policy == "detect":
            fields = kind.conflicts(payload, attempt.base, remote)
            if fields:
                return self._conflict(edit, fields, remote, edit_log, attempt)
        problem = kind.unsendable(payload, remote)
        if problem:
            return self._fail(edit, f"{problem}; nothing was sent", edit_log, attempt=attempt)
        return None

    def _reading(self, edit: Edit, attempt: _Attempt) -> Reading:
        org_id = attempt.ready().device.org_id
        recorded = frozenset(edit.credential_pointers)
        return Reading(self.client, self.store, org_id, edit.device_id, self.settings, recorded)

    def _fetch(self, org_id: str, device_id: str) -> Device:
        raw = self.client.get_device(org_id, device_id)
        try:
            return parse_device(raw)
        except InvalidResponseError as exc:
            raise InvalidResponseError(f"get_device: {exc}") from exc

    def _hold(self, edit: Edit, rule: HoldRule, held: Held, edit_log: Any, attempt: _Attempt) -> EditResult:
        """The kind's cap is reached: the edit waits, unsent, until a slot frees (the attempt is not counted)."""
        now = utcnow()
        until = now + held.wait
        self.queue.hold(edit, now, until, rule.reason(held, until), attempt.credentials())
        edit_log.warning(f"{rule.capped} held by the hourly cap", sent_last_hour=held.count, cap=rule.cap.limit)
        return EditResult.HELD

    # -- outcomes ----------------------------------------------------------------------------------

    def _succeed(self, edit: Edit, attempt: _Attempt, outcome: Outcome) -> EditResult:
        now = utcnow()
        kind, payload, mirrored = attempt.kind, attempt.payload, attempt.ready()
        remote = attempt.remote
        assert remote is not None
        remote.took(outcome)  # what OpenApp now says it holds is masked too
        device = outcome.device
        diff = describe_change(mirrored.device.raw, device.raw, mirrored.state, device.state)
        change = (change_kind(mirrored.state, device.state), diff) if diff else None
        self.queue.succeed(
            edit,
            now,
            device=device,
            change=change,
            restrictions=outcome.restrictions,
            rebase=kind.rebase(payload, attempt.base, remote),
            payload=kind.stored(payload, remote),
            credentials=remote.credentials,
        )
        log.info("edit applied", edit_id=edit.id, device_id=edit.device_id, what=kind.describe(payload))
        if self.auth.accepted():
            log.info("OpenApp accepted the API key again: write-back resumed")
        return EditResult.SUCCEEDED

    def _conflict(
        self, edit: Edit, fields: dict[str, dict[str, Any]], remote: Remote, edit_log: Any, attempt: _Attempt
    ) -> EditResult:
        when = remote.device.updated_at.isoformat() if remote.device.updated_at else "?"
        message = (
            f"OpenApp changed {', '.join(fields)} since the edit was queued (device updated at {when}); "
            "nothing was pushed. `syncd edits` shows the base, remote and queued values; "
            "`syncd edits retry ID` pushes it anyway, `syncd edits cancel ID` drops it"
        )
        self.queue.conflict(edit, utcnow(), message, fields, remote.device, attempt.credentials())
        edit_log.warning("edit conflicts with a remote change", fields=sorted(fields))
        return EditResult.CONFLICT

    def _fail(
        self,
        edit: Edit,
        reason: str,
        edit_log: Any,
        exc: SyncdError | None = None,
        attempt: _Attempt | None = None,
    ) -> EditResult:
        """The edit failed. Its credential pointers are recorded, and once its write went out
        (refused, say) its credential values are redacted as after a success."""
        kept = attempt.stored() if attempt is not None else None
        reason = masked(reason, attempt.secrets() if attempt else ())
        credentials = attempt.credentials() if attempt else ()
        self.queue.fail(edit, utcnow(), reason, exc.status if exc else None, credentials=credentials, payload=kept)
        edit_log.warning("edit failed", error=reason)
        return EditResult.FAILED

    def _retry_later(self, edit: Edit, exc: TransientError, edit_log: Any, attempt: _Attempt) -> EditResult:
        if edit.attempts >= self.settings.max_attempts:
            return self._fail(edit, f"gave up after {edit.attempts} attempts: {exc}", edit_log, exc, attempt)
        delay = (
            exc.retry_after
            if exc.retry_after is not None
            else backoff_delay(edit.attempts, self.settings.base_delay, self.settings.max_delay)
        )
        now = utcnow()
        error = masked(str(exc), attempt.secrets())
        later = now + timedelta(seconds=delay)
        self.queue.retry_later(edit, now, later, error, exc.status, attempt.credentials())
        edit_log.debug("edit will be retried", attempt=edit.attempts, delay=round(delay, 2), error=error)
        return EditResult.RETRYING

    def _pause(self, edit: Edit, exc: AuthError) -> EditResult:
        self.queue.release([edit.id], utcnow())
        if self.auth.rejected(max(self.settings.interval, 30.0)):
            log.error("OpenApp rejected the API key: write-back is paused (no attempts are used up)", error=str(exc))
        return EditResult.PAUSED

    def _bug(self, edit: Edit, exc: Exception, attempt: _Attempt, edit_log: Any) -> EditResult:
        """An exception syncd did not foresee: the edit fails (nothing was sent), or is retried
        later when its write may have gone out (the next attempt first looks whether it applied),
        up to ``writeback.max_attempts``. Its traceback is logged once per kind of bug."""
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        signature = (type(exc).__name__, where.filename if where else "", (where.lineno or 0) if where else 0)
        error = masked(f"internal error: {type(exc).__name__}: {exc}", attempt.secrets())
        if signature not in self._bugs:
            self._bugs.add(signature)
            trace = masked("".join(traceback.format_exception(exc)), attempt.secrets())
            edit_log.error("internal error while processing an edit (please report it)", traceback=trace)
        if attempt.sent and edit.attempts < self.settings.max_attempts:
            now = utcnow()
            delay = backoff_delay(edit.attempts, self.settings.base_delay, self.settings.max_delay)
            later = now + timedelta(seconds=delay)
            self.queue.retry_later(
                edit, now, later, f"{error}; its write may have gone out", None, attempt.credentials()
            )
            return EditResult.RETRYING
        suffix = "; nothing was sent" if not attempt.sent else ""
        return self._fail(edit, error + suffix, edit_log, attempt=attempt)


class _Attempt:
    """One edit's attempt: its payload, parsed, and the mirrored device, once checked; what was
    read of OpenApp; whether a write went out."""

    def __init__(self, edit: Edit) -> None:
        self.edit = edit
        self.payload: object = None  # the kind's payload, once parsed
        self.mirrored: Mirrored | None = None
        self.base: Any = None  # the base its conflicts are judged against
        self.remote: Remote | None = None
        self.sent = False

    @property
    def kind(self) -> EditKind[Any]:
        """The edit's kind."""
        return KINDS[self.edit.action]

    def ready(self) -> Mirrored:
        """The mirrored device, once the edit is checked."""
        assert self.mirrored is not None
        return self.mirrored

    def stored(self) -> dict[str, Any] | None:
        """What the row keeps of the payload once the write went out (None: as it is)."""
        if not self.sent or self.remote is None:
            return None
        return self.kind.stored(self.payload, self.remote)

    def credentials(self) -> frozenset[str]:
        """Where the edit's credential values are: the pointers recorded with it and those found
        while reading."""
        found = self.remote.credentials if self.remote is not None else frozenset()
        return frozenset(self.edit.credential_pointers) | found

    def secrets(self) -> list[str]:
        """The credential values the edit carries (no message may quote one)."""
        if self.payload is None:  # not parsed: no message quotes its values
            return []
        return self.kind.secrets(self.payload, self.credentials())
