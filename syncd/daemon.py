"""``syncd run``: passes on a schedule, for months, without babysitting.

One APScheduler interval job per org (jittered, coalesced, one instance at a time) runs a pass under
the org's lock. Several daemons sharing a PostgreSQL mirror split the orgs between them and share
the schedule: under the lock, a daemon whose timer fires runs the pass only if no daemon started one
of that org within the interval (``org_schedule``, on the database's clock); otherwise it skips
and sets its timer to when the org is due, so whichever daemon comes first then runs it, and the
orgs of a daemon that died are taken over within about one interval. The main thread only waits:
for signals (stop, reload), and to feed systemd's watchdog.

Failure handling, whose rules live in :mod:`syncd.health` (this module wires them in):
- an org whose passes fail backs off exponentially (up to ``sync.failure_backoff_max``): the Board;
- a 401 pauses every org and the write-back: one probe per interval, one error line per probe: the
  AuthGate, shared with the reconciler;
- state changes (an org starts failing, recovers; the key is rejected, accepted) are logged at
  ERROR/INFO, repeats at lower levels.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Mapping
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from syncd import health, logs
from syncd.api import OpenAppClient
from syncd.config import Config, ConfigDiff, OrgSettings, diff_config, load_config
from syncd.errors import AuthError, ConfigError, SyncdError
from syncd.health import AuthGate
from syncd.metrics import (
    EDIT_QUEUE,
    EDIT_QUEUE_OLDEST,
    ORG_MAX_AGE,
    MetricsServer,
    forget_org,
    show_awaiting_approval,
    track_org,
)
from syncd.notify import Notifier
from syncd.passes import instance_name, locked_pass, make_pass, writeback_client
from syncd.reconcile import Reconciler
from syncd.store import Store
from syncd.sync import PassOutcome
from syncd.vocab import EditStatus, PassStatus, RunTrigger

log = structlog.get_logger(__name__)

FIRST_PASS_WITHIN = 10.0  # seconds after start-up (or after an org is added)
MAX_JITTER = 60.0
LOOP_TICK = 5.0
RECONCILE_JOB = "reconcile"


class Daemon:
    """The scheduler, its jobs, and graceful stop / reload."""

    def __init__(
        self,
        config: Config,
        config_path: Path | None = None,
        logging_overrides: Mapping[str, Any] | None = None,
        notifier: Notifier | None = None,
        clock: health.Clock | None = None,
    ) -> None:
        """``logging_overrides``: the [logging] settings the command line gave, kept over a reload.
        ``clock``: the time of schedules, the Board and the AuthGate (tests move it themselves)."""
        self.config = config
        self.config_path = config_path
        self.logging_overrides = dict(logging_overrides or {})
        self.notifier = notifier or Notifier()
        self.stop = threading.Event()
        self._reload = threading.Event()
        self._wakeup = threading.Event()
        self._lock = threading.Lock()
        self.store = Store(config.database.url)
        self.instance = instance_name()
        self.client = OpenAppClient(config.api, stop=self.stop, instance=self.instance)
        self._retired_clients: list[OpenAppClient] = []
        self.clock = clock or health.Clock()
        self.auth = AuthGate(self.clock.monotonic)  # one 401 pauses passes and write-back alike
        self.reconciler = self._new_reconciler(config)
        self._reconcile_bug_logged = False  # a write-back round's own bug is logged with its traceback once
        self.board = health.Board(self.clock.now)
        self.running: set[str] = set()
        self._metrics: MetricsServer | None = None
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(max_workers=config.sync.concurrency)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )

    # -- lifecycle -------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; returns the exit code."""
        try:
            with self.store.locks.instance():
                if self.config.metrics.listen:
                    host, port = self.config.metrics.listen
                    try:
                        self._metrics = MetricsServer(host, port)
                    except OSError as exc:
                        raise ConfigError(
                            f"metrics.listen {host}:{port}: cannot listen there ({exc.strerror}); another program "
                            "may use the port: choose another one"
                        ) from None
                    log.info("metrics endpoint listening", address=f"{host}:{self._metrics.port}")
                self.store.prepare(self.config.database.auto_upgrade)  # after the port: a busy one changes nothing
                configured = {o.id for o in self.config.orgs}
                self.board.seed({k: v for k, v in self.store.last_successes().items() if k in configured})
                for org in self.config.orgs:
                    self._schedule(org, first=True)
                self._schedule_reconciler()
                self.scheduler.start()
                log.info("daemon started", orgs=len(self.config.orgs), instance=self.instance)
                self.notifier.ready(self.status_line())
                try:
                    self._loop()
                finally:
                    self._shutdown()
        finally:
            self._close()
        return 0

    def request_stop(self) -> None:
        """Stop taking work; running passes finish their current page (safe from a signal handler)."""
        self.stop.set()
        self._wakeup.set()

    def request_reload(self) -> None:
        """Re-read the configuration file at the next tick (safe from a signal handler)."""
        self._reload.set()
        self._wakeup.set()

    def _loop(self) -> None:
        tick = min(LOOP_TICK, self.notifier.watchdog_interval or LOOP_TICK)
        while not self.stop.is_set():
            self._wakeup.wait(tick)
            self._wakeup.clear()
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            if self.scheduler.running:
                self.notifier.watchdog()
                self.notifier.status(self.status_line())

    def _shutdown(self) -> None:
        with self._lock:
            running = sorted(self.running - {RECONCILE_JOB})
        log.info("stopping", running=running)
        self.notifier.stopping(f"stopping; finishing {len(running)} running pass(es)")
        self.stop.set()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        deadline = time.monotonic() + self.config.sync.shutdown_timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self.running:
                    break
            time.sleep(0.05)
        with self._lock:
            left = sorted(self.running)
        if left:
            log.warning("passes still running at shutdown; the next start marks them aborted", orgs=left)
        log.info("daemon stopped", instance=self.instance, **{f"passes_{k}": n for k, n in self.board.totals().items()})

    def _close(self) -> None:
        if self._metrics:
            self._metrics.stop()
        for client in [self.client, *self._retired_clients]:
            client.close()
        self.store.close()
        self.notifier.close()

    # -- scheduling --------------------------------------------------------------------------------

    def _schedule(self, org: OrgSettings, first: bool) -> None:
        interval = self.config.interval(org)
        if first:
            track_org(org.id, health.max_age(interval))
        else:
            ORG_MAX_AGE.labels(org.id).set(health.max_age(interval))
        delay = random.uniform(0, min(FIRST_PASS_WITHIN, interval / 10)) if first else interval
        self.scheduler.add_job(
            self._job,
            IntervalTrigger(seconds=interval, jitter=min(interval / 10, MAX_JITTER), timezone=UTC),
            args=[org.id],
            id=_job_id(org.id),
            name=f"sync {org.id}",
            next_run_time=self.clock.now() + timedelta(seconds=delay),
            replace_existing=True,
        )

    def _schedule_reconciler(self) -> None:
        interval = self.config.writeback.interval
        self.scheduler.add_job(
            self._reconcile_job,
            IntervalTrigger(seconds=interval, timezone=UTC),
            id=RECONCILE_JOB,
            name="push queued edits",
            next_run_time=self.clock.now() + timedelta(seconds=min(interval, FIRST_PASS_WITHIN)),
            replace_existing=True,
        )

    def _reconcile_job(self) -> None:
        if self.stop.is_set():
            return
        with self._lock:
            self.running.add(RECONCILE_JOB)
        try:
            results = self.reconciler.run_once()
            if results:
                log.debug("write-back round", **results)
            counts = self.reconciler.queue.counts()
            for status in EditStatus:
                EDIT_QUEUE.labels(status).set(counts.get(status, 0))
            oldest = self.reconciler.queue.oldest_pending()
            EDIT_QUEUE_OLDEST.set((self.clock.now() - oldest).total_seconds() if oldest else 0)
            show_awaiting_approval(self.reconciler.queue.awaiting_approval(), {o.id for o in self.config.orgs})
        except SyncdError as exc:
            log.error("write-back round failed", error=str(exc))
        except Exception as exc:  # a bug outside any one edit: its traceback once, then one line a round
            if not self._reconcile_bug_logged:
                self._reconcile_bug_logged = True
                log.exception("write-back round failed: internal error (please report it)")
            else:
                log.error("write-back round failed: internal error", error=f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self.running.discard(RECONCILE_JOB)

    def _job(self, org_id: str) -> None:
        org = next((o for o in self.config.orgs if o.id == org_id), None)
        if org is None or self.stop.is_set() or not self.auth.admit(org_id):
            return
        with self._lock:
            self.running.add(org_id)
        try:
            org_pass = make_pass(
                self.config,
                org,
                self.client,
                self.store,
                trigger=RunTrigger.SCHEDULED,
                instance=self.instance,
                stop=self.stop,
            )
            self._after(org, locked_pass(org_pass, spacing=self.config.interval(org)))
        finally:
            self.auth.done(org_id)
            with self._lock:
                self.running.discard(org_id)

    def _after(self, org: OrgSettings, outcome: PassOutcome) -> None:
        if all(o.id != org.id for o in self.config.orgs):
            return  # a reload removed the org while its pass ran: no state, no series for it any more
        interval = self.config.interval(org)
        if isinstance(outcome.exception, AuthError):
            self.auth.rejected(interval)
            log.error(  # once per probe: each one is a state the operator should see
                "OpenApp rejected the API key: all syncing is paused",
                retry_in_seconds=round(interval),
                error=outcome.error,
            )
        elif outcome.due_in is not None:
            self._ran_elsewhere(org, outcome.due_in, interval)
        else:
            self._record(org, outcome, interval)

    def _ran_elsewhere(self, org: OrgSettings, due_in: float, interval: float) -> None:
        """Another daemon's recent pass: be ready when the org is due, and count its success here
        too (STATUS=, the last-success gauge)."""
        job = self.scheduler.get_job(_job_id(org.id))
        if job is not None:
            delay = due_in + random.uniform(0, min(interval / 10, MAX_JITTER))
            job.modify(next_run_time=self.clock.now() + timedelta(seconds=delay))
        try:
            last = self.store.last_success(org.id)
        except SyncdError:
            return
        if last is not None:
            self.board.seed({org.id: last})

    def _record(self, org: OrgSettings, outcome: PassOutcome, interval: float) -> None:
        """This daemon's pass: the key accepted again, the org's verdict on the Board, its backoff."""
        if outcome.status != PassStatus.SKIPPED and self.auth.accepted():
            log.info("OpenApp accepted the API key again: syncing resumed")
        verdict = self.board.record(
            org.id, outcome.status, interval, self.config.sync.failure_backoff_max, self.stop.is_set()
        )
        org_log = log.bind(org_id=org.id)
        if verdict.recovered_after:
            org_log.info("org recovered", after_failures=verdict.recovered_after)
        if verdict.started_failing:
            org_log.error("org started failing", error=outcome.error)
        if verdict.backoff:
            job = self.scheduler.get_job(_job_id(org.id))
            if job is not None:
                job.modify(next_run_time=self.clock.now() + timedelta(seconds=verdict.backoff))
            org_log.info("backing off", failures=verdict.failures, next_pass_in_seconds=round(verdict.backoff))

    # -- reload ------------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Apply a changed configuration file; keep the running one if the new one is invalid."""
        new = self._load_for_reload()
        if new is None:
            return False
        old, change = self.config, diff_config(self.config, new)
        if change.database:
            log.error("configuration reload rejected: database.url changed; restart syncd to switch databases")
            return False
        self._replace_clients(change, new)
        self.config = new
        if change.logging:
            logs.configure(new.logging.format, new.logging.level)  # passes started from now on log at the new level
        if change.concurrency:
            log.warning(
                "sync.concurrency takes effect when syncd restarts",
                running=old.sync.concurrency,
                configured=new.sync.concurrency,
            )
        self._reschedule(change)
        log.info(
            "configuration reloaded",
            added=sorted(o.id for o in change.added),
            removed=list(change.removed),
            interval_changed=[o.id for o in change.interval_changed],
        )
        return True

    def _load_for_reload(self) -> Config | None:
        """The configuration file as it is now, with the command line's logging settings; None
        (and an error logged) when there is no file or it is invalid."""
        if self.config_path is None:
            return None
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("configuration reload rejected; the running configuration stays in force", error=str(exc))
            return None
        return new.with_logging(self.logging_overrides)  # the command line's --log-level / --log-format still win

    def _replace_clients(self, change: ConfigDiff, new: Config) -> None:
        """New API clients for changed [api] or [writeback] settings (the old ones are closed at
        stop: a pass may still be using one); the reconciler's orgs."""
        if change.api:
            self._retired_clients.append(self.client)
            self.client = OpenAppClient(new.api, stop=self.stop, instance=self.instance)
        if change.api or change.writeback:
            self._retired_clients.append(self.reconciler.client)
            self.reconciler = self._new_reconciler(new)
        self.reconciler.orgs = frozenset(org.id for org in new.orgs)

    def _reschedule(self, change: ConfigDiff) -> None:
        """The jobs after a reload: the reconciler's interval, orgs removed, re-timed and added."""
        if change.writeback_interval:
            self._schedule_reconciler()
        for org_id in change.removed:
            self.scheduler.remove_job(_job_id(org_id))
        self.board.forget(change.removed)
        for org_id in change.removed:
            forget_org(org_id)
        for org in change.interval_changed:
            self._schedule(org, first=False)
        for org in change.added:
            self._schedule(org, first=True)

    def _new_reconciler(self, config: Config) -> Reconciler:
        orgs = frozenset(org.id for org in config.orgs)
        client = writeback_client(config, self.stop, budget=self.client.budget)  # one budget per process
        return Reconciler(client, self.store, config.writeback, self.instance, orgs, self.stop, auth=self.auth)

    def status_line(self) -> str:
        """One line for systemd's STATUS=: orgs ok (a success within their max age, as ``syncd status``
        counts them), stale and failing, passes running, and a rejected key."""
        with self._lock:
            running = len(self.running - {RECONCILE_JOB})
        ok, stale, failing = self.board.summary({o.id: self.config.interval(o) for o in self.config.orgs})
        line = f"{ok + stale} orgs: {ok} ok, {stale} stale, {failing} failing, {running} running"
        return line + "; PAUSED: API key rejected" if self.auth.paused else line


def _job_id(org_id: str) -> str:
    return f"org:{org_id}"
