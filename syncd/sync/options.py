"""What a pass is told (:class:`PassOptions`, built once per pass by :func:`syncd.passes.make_pass`)
and the bounds it runs within once it has started (:class:`Bounds`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from syncd.config import OrgSettings, SyncSettings
from syncd.errors import SyncdError, TransientError
from syncd.vocab import RunTrigger

ProgressCallback = Callable[[str, int, int], None]  # (org id, pages read, devices seen)


@dataclass(frozen=True)
class PassOptions:
    """Everything a pass of one org is told."""

    org: OrgSettings
    settings: SyncSettings
    trigger: RunTrigger = RunTrigger.RUN_ONCE  # recorded on the sync_runs row
    instance: str = "syncd"  # host:pid, recorded on the sync_runs row
    allow_mass_purge: bool = False  # the operator confirmed a purge above sync.max_purge_fraction
    # An operator's limit on the list pages of this pass, instead of the one derived from the org's
    # size and sync.max_pages (run-once --max-pages, to confirm that an org really grew).
    max_pages: int | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    on_progress: ProgressCallback | None = None  # after each page


@dataclass(frozen=True)
class Bounds:
    """When a running pass gives up: at its deadline (``sync.pass_timeout``), or on a stop."""

    deadline: float  # time.monotonic() at which the pass gives up
    timeout: float  # sync.pass_timeout, for messages
    stop: threading.Event

    @classmethod
    def starting_now(cls, options: PassOptions) -> Bounds:
        """The bounds of a pass that starts now."""
        timeout = options.settings.pass_timeout
        return cls(time.monotonic() + timeout, timeout, options.stop)

    @property
    def stopped(self) -> bool:
        """Whether the pass was asked to stop."""
        return self.stop.is_set()

    def check_deadline(self) -> None:
        """TransientError once the deadline has passed."""
        if time.monotonic() >= self.deadline:
            raise TransientError(
                f"the pass took longer than sync.pass_timeout ({self.timeout:.0f}s) and was stopped; nothing was purged"
            )

    def explain(self, exc: SyncdError) -> str:
        """What ended the pass, saying so when it ran into its deadline."""
        if time.monotonic() >= self.deadline and "sync.pass_timeout" not in str(exc):
            return f"the pass ran into sync.pass_timeout ({self.timeout:.0f}s): {exc}"
        return str(exc)
