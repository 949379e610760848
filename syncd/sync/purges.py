"""Purge detection, after a complete and error-free scan: every mirrored device the scan did not see
is confirmed with get_device; 404 means purged. A pass that would purge more than
``sync.max_purge_fraction`` of the org (or all of it, from an empty scan) refuses, unless confirmed."""

from __future__ import annotations

from syncd.api import OpenAppClient
from syncd.errors import InvalidDeviceError, InvalidResponseError, MassPurgeRefusedError, NotFoundError
from syncd.models import is_device_id, preview
from syncd.store import Store
from syncd.sync.bookkeeping import Bookkeeping
from syncd.sync.history import History
from syncd.sync.options import Bounds, PassOptions
from syncd.sync.scan import Scan
from syncd.sync.writes import PageWrites
from syncd.vocab import DeviceState


class PurgeSweep:
    """The purge detection of one pass, after its :class:`Scan`; :meth:`run` once."""

    def __init__(
        self,
        client: OpenAppClient,
        store: Store,
        options: PassOptions,
        bounds: Bounds,
        book: Bookkeeping,
        scan: Scan,
        history: History,
        writes: PageWrites,
    ) -> None:
        """``scan``: the pass's, done (what it saw; a device it missed is applied through it)."""
        self.client = client
        self.store = store
        self.options = options
        self.bounds = bounds
        self.book = book
        self.scan = scan
        self.history = history
        self.writes = writes

    def run(self) -> bool:
        """Confirm every device missing from the scan; False when stopped before the last."""
        missing = self._missing()
        if not missing:
            return True
        self._refuse_mass_purge(missing)
        self.book.log.debug("confirming devices missing from the scan", count=len(missing))
        return self._confirm(missing)

    def _missing(self) -> list[str]:
        """The org's live mirrored devices (within its filters) the scan did not see."""
        org, seen = self.options.org, self.scan.distinct
        if not (org.integration_id or org.device_kind):
            by_state = self.store.state_counts(org.id).get(org.id, {})
            if sum(n for state, n in by_state.items() if state != DeviceState.PURGED) == seen:
                # Every device the scan saw is now live in the mirror, so equal counts mean nothing is
                # missing. (With filters, a server that ignores one could break that; compare ids then.)
                self.book.counted(by_state)  # nothing to purge: the pass changes no device after this
                return []
        live = self.store.live_ids(org.id, org.integration_id, org.device_kind)
        missing = list(self.scan.seen.unseen(live))
        foreign = [device_id for device_id in missing if not is_device_id(device_id)]
        if foreign:
            # Rows an older syncd took from a hostile list, or written by hand: never put into a URL.
            self.book.log.warning(
                "mirrored devices with ids OpenApp cannot have issued were not checked for purges",
                count=len(foreign),
                first=preview(foreign[0]),
            )
            missing = [device_id for device_id in missing if is_device_id(device_id)]
        return missing

    def _refuse_mass_purge(self, missing: list[str]) -> None:
        """MassPurgeRefusedError when more is missing than ``sync.max_purge_fraction`` allows, or
        everything is (unless the operator confirmed with --allow-mass-purge)."""
        if self.options.allow_mass_purge:
            return
        seen = self.scan.distinct
        live = len(missing) + seen
        fraction = self.options.settings.max_purge_fraction
        if not seen:
            raise MassPurgeRefusedError(
                f"the scan returned no devices but the mirror holds {live} live ones; nothing was purged "
                "(if OpenApp really has none left, rerun with --allow-mass-purge)"
            )
        if len(missing) > fraction * live:
            raise MassPurgeRefusedError(
                f"{len(missing)} of {live} devices ({len(missing) / live:.0%}) were missing from the scan, more "
                f"than sync.max_purge_fraction ({fraction:.0%}); nothing was purged "
                "(to confirm, rerun with --allow-mass-purge)"
            )

    def _confirm(self, missing: list[str]) -> bool:
        """Ask for each missing device: purged (404), hidden from the scan by shifting offsets (the
        device, applied as a page of one), or not to be believed (it costs only itself)."""
        for device_id, answer in self.client.get_devices(self.options.org.id, missing, deadline=self.bounds.deadline):
            if self.bounds.stopped:
                return False
            self.bounds.check_deadline()
            try:
                raw = answer.result()
            except NotFoundError:
                self.writes.purge(self.history, device_id)
                self.book.purged(device_id)
            except InvalidResponseError as exc:
                self.book.problem(InvalidDeviceError(str(exc), device_id=device_id))
            else:
                self.scan.apply([raw], None)
        return True
