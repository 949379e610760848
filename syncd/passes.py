"""Passes of orgs as ``run-once`` and the daemon run them: one place builds a pass (:func:`make_pass`),
one runs it under its org's lock (:func:`locked_pass`), one runs several side by side
(:func:`run_once`); and the interpreter settings that passes over large orgs want."""

from __future__ import annotations

import gc
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import structlog

from syncd.api import OpenAppClient, RequestBudget
from syncd.config import Config, OrgSettings
from syncd.errors import ConfigError, SyncdError
from syncd.models import utcnow
from syncd.store import Store
from syncd.sync import OrgPass, PassOptions, PassOutcome, ProgressCallback
from syncd.vocab import PassStatus, RunTrigger

log = structlog.get_logger(__name__)


def instance_name() -> str:
    """``host:pid``, recorded on every sync_runs row."""
    return f"{socket.gethostname()}:{os.getpid()}"


def writeback_client(
    config: Config, stop: threading.Event | None = None, budget: RequestBudget | None = None
) -> OpenAppClient:
    """A client for write-back: one HTTP attempt per call, since the edit queue schedules the retries.
    ``budget``: the process's request budget, when another client already holds it."""
    settings = replace(config.api, retry=replace(config.api.retry, max_attempts=1))
    return OpenAppClient(settings, stop=stop, instance=instance_name(), budget=budget)


def select_orgs(config: Config, names: Iterable[str] | None) -> list[OrgSettings]:
    """The configured orgs, or just the named ones (ConfigError for a name not configured)."""
    wanted = list(names or [])
    if not wanted:
        return list(config.orgs)
    unknown = [n for n in wanted if n not in {o.id for o in config.orgs}]
    if unknown:
        raise ConfigError(f"--org {', '.join(unknown)}: not in the configuration")
    return [config.org(n) for n in dict.fromkeys(wanted)]


def passes_at_once(config: Config, orgs: Sequence[OrgSettings]) -> int:
    """How many passes run side by side: ``sync.concurrency``, or fewer when there are fewer orgs."""
    return max(1, min(config.sync.concurrency, len(orgs)))


def tune_for_bulk_work(passes: int) -> None:
    """Interpreter settings for passes over large orgs (measured with bench/bench_sync.py).

    - How often a thread that waits for the GIL takes it from a busy one. A single pass has two
      threads busy at a time (its own, and the page fetcher whose answer it waits for) and goes
      fastest when the fetcher gets its turn within 0.5 ms. With several passes at once, hand-overs
      between their threads cost more than they overlap, and Python's default 5 ms was the faster
      (1 org x 100,000: 3.7 s against 4.2 s with 5 ms; 10 orgs x 10,000, 4 at once: 4.9 s against
      5.4 s with 0.5 ms).
    - Freeze what start-up allocated, so the collector's full passes over a busy heap skip it.
      (Raising the collection thresholds was faster still but cost 60 MB of peak RSS.)
    """
    sys.setswitchinterval(0.0005 if passes <= 1 else 0.005)
    gc.freeze()


def make_pass(
    config: Config,
    org: OrgSettings,
    client: OpenAppClient,
    store: Store,
    *,
    trigger: RunTrigger,
    instance: str,
    stop: threading.Event,
    allow_mass_purge: bool = False,
    max_pages: int | None = None,
    on_progress: ProgressCallback | None = None,
) -> OrgPass:
    """The pass of one org, as every caller builds it: its options are fixed here, once."""
    options = PassOptions(
        org,
        config.sync,
        trigger=trigger,
        instance=instance,
        allow_mass_purge=allow_mass_purge,
        max_pages=max_pages,
        stop=stop,
        on_progress=on_progress,
    )
    return OrgPass(client, store, options)


def run_once(
    config: Config,
    orgs: list[OrgSettings],
    *,
    store: Store,
    client: OpenAppClient,
    allow_mass_purge: bool = False,
    max_pages: int | None = None,
    stop: threading.Event | None = None,
    on_progress: ProgressCallback | None = None,
    on_done: Callable[[PassOutcome], None] | None = None,
    lock_wait: float = 0.0,
) -> list[PassOutcome]:
    """One pass per org, up to ``sync.concurrency`` at a time; outcomes in the order of ``orgs``.

    An org that another syncd is syncing is waited for up to ``lock_wait`` seconds, then skipped.
    ``on_progress``: called as each pass begins (0 pages) and after each page; ``on_done``: with
    each outcome as its pass ends.
    """
    stop = stop or threading.Event()
    instance = instance_name()
    workers = passes_at_once(config, orgs)

    def one(org: OrgSettings) -> PassOutcome:
        org_pass = make_pass(
            config,
            org,
            client,
            store,
            trigger=RunTrigger.RUN_ONCE,
            instance=instance,
            stop=stop,
            allow_mass_purge=allow_mass_purge,
            max_pages=max_pages,
            on_progress=on_progress,
        )
        if on_progress:
            on_progress(org.id, 0, 0)
        outcome = locked_pass(org_pass, wait=lock_wait)
        if on_done:
            on_done(outcome)
        return outcome

    if not orgs:
        return []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="org-pass") as pool:
        return list(pool.map(one, orgs))


def locked_pass(org_pass: OrgPass, wait: float = 0.0, spacing: float | None = None) -> PassOutcome:
    """Run the pass under the org's lock; a ``skipped`` outcome if another pass holds it.

    ``spacing`` (scheduled passes): on PostgreSQL, also skipped when any daemon started a scheduled
    pass of the org less than that many seconds ago, by the database's clock (the outcome's
    ``due_in`` says when the org is due). Never raises for what syncd reports: a lock that cannot be
    taken (the database is down) is a ``failed`` outcome, a stop before the pass began an
    ``aborted`` one without a run row. The pass writes under the lease (see :meth:`OrgPass.run`): one
    whose lock's database session ended is ``failed``.
    """
    options, store = org_pass.options, org_pass.store
    org_id = options.org.id
    now = utcnow()
    if options.stop.is_set():
        return PassOutcome(org_id, None, PassStatus.ABORTED, now, now, error="stopped before the pass began")
    try:
        with store.locks.org(org_id, wait=wait, stop=options.stop) as lease:
            if lease:
                due_in = store.claim_scheduled_pass(org_id, spacing, options.instance) if spacing else 0.0
                if spacing and due_in > 0:
                    return PassOutcome(
                        org_id,
                        None,
                        PassStatus.SKIPPED,
                        now,
                        utcnow(),
                        error=f"another syncd started a pass of this org {spacing - due_in:.0f}s ago",
                        due_in=due_in,
                    )
                outcome = org_pass.run(lease)
                if spacing and (outcome.status == PassStatus.ABORTED or outcome.run_id is None):
                    _release_claim(store, org_id, options.instance)
                return outcome
    except SyncdError as exc:
        log.error("pass could not start", org_id=org_id, error=str(exc))
        return PassOutcome(
            org_id, None, PassStatus.FAILED, now, utcnow(), error=f"could not start: {exc}", exception=exc
        )
    now = utcnow()
    log.warning("org skipped: another syncd pass holds it", org_id=org_id, waited=wait)
    return PassOutcome(org_id, None, PassStatus.SKIPPED, now, now, error="another syncd pass of this org is running")


def _release_claim(store: Store, org_id: str, instance: str) -> None:
    """A scheduled pass that was stopped, or never began, does not count: the next daemon's timer runs one."""
    try:
        store.release_scheduled_pass(org_id, instance)
    except SyncdError as exc:  # the claim then holds the org for one interval, as a finished pass would
        log.warning("could not release the org's scheduled pass", org_id=org_id, error=str(exc))
