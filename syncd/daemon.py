"""``syncd run``: passes on a schedule, for months, without babysitting.

One APScheduler interval job per org (jittered, coalesced, one instance at a time) runs a pass under
the org's lock, so several daemons sharing a PostgreSQL mirror split the orgs between them. The main
thread only waits: for signals (stop, reload), and to feed systemd's watchdog.

Failure handling:
- an org whose passes fail backs off exponentially (up to ``sync.failure_backoff_max``);
- a 401 pauses every org: one probe pass per interval, one error line per probe;
- state changes (an org starts failing, recovers; the key is rejected, accepted) are logged at
  ERROR/INFO, repeats at lower levels.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from syncd import health, logs
from syncd.api import OpenAppClient
from syncd.config import Config, OrgSettings, diff_config, load_config
from syncd.errors import AuthError, ConfigError, SyncdError
from syncd.metrics import AUTH_PAUSED, EDIT_QUEUE, EDIT_QUEUE_OLDEST, ORG_FAILING, ORG_MAX_AGE, MetricsServer
from syncd.notify import Notifier
from syncd.reconcile import Reconciler
from syncd.runner import instance_name, locked_pass, passes_at_once, writeback_client
from syncd.store import Store
from syncd.store.schema import EDIT_STATUSES
from syncd.sync import OrgPass, PassOutcome

log = structlog.get_logger("syncd.daemon")

FIRST_PASS_WITHIN = 10.0  # seconds after start-up (or after an org is added)
MAX_JITTER = 60.0
LOOP_TICK = 5.0
RECONCILE_JOB = "reconcile"


@dataclass
class OrgHealth:
    """How an org's recent passes went."""

    failures: int = 0
    last_error: str | None = None


class Daemon:
    """The scheduler, its jobs, and graceful stop / reload."""

    def __init__(self, config: Config, config_path: Path | None = None, notifier: Notifier | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.stop = threading.Event()
        self._reload = threading.Event()
        self._wakeup = threading.Event()
        self._lock = threading.Lock()
        self.store = Store(config.database.url)
        self.instance = instance_name()
        self.client = OpenAppClient(config.api, stop=self.stop, instance=self.instance)
        self._retired_clients: list[OpenAppClient] = []
        self.reconciler = self._new_reconciler(config)
        self.health: dict[str, OrgHealth] = {}
        self.running: set[str] = set()
        self.totals: Counter[str] = Counter()
        self._auth_paused_until: float | None = None
        self._auth_probe: str | None = None
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
                self.store.prepare(self.config.database.auto_upgrade)
                if self.config.metrics.listen:
                    host, port = self.config.metrics.listen
                    self._metrics = MetricsServer(host, port)
                    log.info("metrics endpoint listening", address=f"{host}:{self._metrics.port}")
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
        log.info("daemon stopped", passes=dict(self.totals), instance=self.instance)

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
        ORG_MAX_AGE.labels(org.id).set(health.max_age(interval))
        delay = random.uniform(0, min(FIRST_PASS_WITHIN, interval / 10)) if first else interval
        self.scheduler.add_job(
            self._job,
            IntervalTrigger(seconds=interval, jitter=min(interval / 10, MAX_JITTER), timezone=UTC),
            args=[org.id],
            id=_job_id(org.id),
            name=f"sync {org.id}",
            next_run_time=datetime.now(UTC) + timedelta(seconds=delay),
            replace_existing=True,
        )

    def _schedule_reconciler(self) -> None:
        interval = self.config.writeback.interval
        self.scheduler.add_job(
            self._reconcile_job,
            IntervalTrigger(seconds=interval, timezone=UTC),
            id=RECONCILE_JOB,
            name="push queued edits",
            next_run_time=datetime.now(UTC) + timedelta(seconds=min(interval, FIRST_PASS_WITHIN)),
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
            for status in EDIT_STATUSES:
                EDIT_QUEUE.labels(status).set(0)
            for status, count in self.reconciler.queue.counts().items():
                EDIT_QUEUE.labels(status).set(count)
            oldest = self.reconciler.queue.oldest_pending()
            EDIT_QUEUE_OLDEST.set((datetime.now(UTC) - oldest).total_seconds() if oldest else 0)
        except SyncdError as exc:
            log.error("write-back round failed", error=str(exc))
        finally:
            with self._lock:
                self.running.discard(RECONCILE_JOB)

    def _job(self, org_id: str) -> None:
        org = next((o for o in self.config.orgs if o.id == org_id), None)
        if org is None or self.stop.is_set() or not self._may_run(org_id):
            return
        with self._lock:
            self.running.add(org_id)
        try:
            with structlog.contextvars.bound_contextvars(org_id=org_id):
                org_pass = OrgPass(
                    self.client,
                    self.store,
                    org,
                    self.config.sync,
                    trigger="scheduled",
                    instance=self.instance,
                    stop=self.stop,
                    fetch_ahead=passes_at_once(self.config, self.config.orgs) == 1,
                )
                self._after(org, locked_pass(org_pass))
        finally:
            with self._lock:
                self.running.discard(org_id)
                if self._auth_probe == org_id:
                    self._auth_probe = None

    def _may_run(self, org_id: str) -> bool:
        """False while a 401 pauses syncing, except for one probe pass per interval."""
        with self._lock:
            if self._auth_paused_until is None:
                return True
            if self._auth_probe is not None or time.monotonic() < self._auth_paused_until:
                return False
            self._auth_probe = org_id
            return True

    def _after(self, org: OrgSettings, outcome: PassOutcome) -> None:
        self.totals[outcome.status] += 1
        org_log = log.bind(org_id=org.id)
        if outcome.status == "skipped":
            return
        interval = self.config.interval(org)
        if isinstance(outcome.exception, AuthError):
            with self._lock:
                self._auth_paused_until = time.monotonic() + interval
            AUTH_PAUSED.set(1)
            log.error(
                "OpenApp rejected the API key: all syncing is paused",
                retry_in_seconds=round(interval),
                error=outcome.error,
            )
            return
        with self._lock:
            resumed = self._auth_paused_until is not None
            self._auth_paused_until = None
        if resumed:
            AUTH_PAUSED.set(0)
            log.info("OpenApp accepted the API key again: syncing resumed")
        health = self.health.setdefault(org.id, OrgHealth())
        if outcome.status == "succeeded":
            if health.failures:
                org_log.info("org recovered", after_failures=health.failures)
                ORG_FAILING.labels(org.id).set(0)
            health.failures, health.last_error = 0, None
            return
        if outcome.status == "aborted" and self.stop.is_set():
            return
        health.failures += 1
        health.last_error = outcome.error
        if health.failures == 1:
            org_log.error("org started failing", error=outcome.error)
            ORG_FAILING.labels(org.id).set(1)
        backoff = min(interval * 2 ** (health.failures - 1), max(interval, self.config.sync.failure_backoff_max))
        if backoff > interval:
            job = self.scheduler.get_job(_job_id(org.id))
            if job is not None:
                job.modify(next_run_time=datetime.now(UTC) + timedelta(seconds=backoff))
            org_log.info("backing off", failures=health.failures, next_pass_in_seconds=round(backoff))

    # -- reload ------------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Apply a changed configuration file; keep the running one if the new one is invalid."""
        if self.config_path is None:
            return False
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("configuration reload rejected; the running configuration stays in force", error=str(exc))
            return False
        old, change = self.config, diff_config(self.config, new)
        if change.database:
            log.error("configuration reload rejected: database.url changed; restart syncd to switch databases")
            return False
        if change.api:
            self._retired_clients.append(self.client)
            self.client = OpenAppClient(new.api, stop=self.stop, instance=self.instance)
        if change.api or change.writeback:
            self._retired_clients.append(self.reconciler.client)
            self.reconciler = self._new_reconciler(new)
        self.reconciler.orgs = frozenset(org.id for org in new.orgs)
        self.config = new
        if change.logging:
            logs.configure(new.logging.format, new.logging.level)  # passes started from now on log at the new level
        if change.concurrency:
            log.warning(
                "sync.concurrency takes effect when syncd restarts",
                running=old.sync.concurrency,
                configured=new.sync.concurrency,
            )
        if new.writeback.interval != old.writeback.interval:
            self._schedule_reconciler()
        for org_id in change.removed:
            self.scheduler.remove_job(_job_id(org_id))
        for org in change.interval_changed:
            self._schedule(org, first=False)
        for org in change.added:
            self._schedule(org, first=True)
        log.info(
            "configuration reloaded",
            added=sorted(o.id for o in change.added),
            removed=list(change.removed),
            interval_changed=[o.id for o in change.interval_changed],
        )
        return True

    def _new_reconciler(self, config: Config) -> Reconciler:
        orgs = frozenset(org.id for org in config.orgs)
        return Reconciler(
            writeback_client(config, self.stop), self.store, config.writeback, self.instance, orgs, self.stop
        )

    def status_line(self) -> str:
        """One line for systemd's STATUS=."""
        with self._lock:
            failing = sum(1 for h in self.health.values() if h.failures)
            running = len(self.running - {RECONCILE_JOB})
            paused = self._auth_paused_until is not None
        orgs = len(self.config.orgs)
        line = f"{orgs} orgs: {orgs - failing} ok, {failing} failing, {running} running"
        return line + "; PAUSED: API key rejected" if paused else line


def _job_id(org_id: str) -> str:
    return f"org:{org_id}"
