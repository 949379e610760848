"""One pass of one org: page through list_devices, write page by page, then detect purges.

Safety rules (README, "How a pass works"):
- every page is one transaction; a crash leaves only whole pages behind;
- an unchanged device is not written; a page the same byte for byte as one compared whole before,
  with nothing written to the org's devices since by anything else, is taken without comparing it
  again (:mod:`.unchanged`);
- nothing is marked purged unless the scan was complete and error-free *and* get_device answers 404;
- a pass that would purge more than ``sync.max_purge_fraction`` of the org refuses, unless confirmed;
- a device of another org is never written; a device that cannot be read or stored costs only itself
  (and purge detection); a device listed twice is taken once;
- a pass ends: at ``sync.pass_timeout``, and when a list runs on far past the org's known size;
- door restrictions and metadata definitions are read after purge detection (:mod:`syncd.details`).

The pass by job: :mod:`.options` (what a pass is told, and its bounds), :mod:`.scan` (reading
pages: filtering, parsing, sorting against the mirror), :mod:`.history` (comparing with the mirror
and the history rows), :mod:`.unchanged` (pages compared whole before), :mod:`.writes` (each page
in one transaction), :mod:`.purges` (purge detection), :mod:`.bookkeeping` (the run row, counters,
metrics, the outcome), and :mod:`.org_pass`, which runs them in turn.
"""

from syncd.sync.bookkeeping import PassOutcome
from syncd.sync.options import PassOptions, ProgressCallback
from syncd.sync.org_pass import OrgPass
from syncd.sync.unchanged import UnchangedPages
from syncd.sync.writes import PageWrites, PreparedPage

__all__ = ["OrgPass", "PageWrites", "PassOptions", "PassOutcome", "PreparedPage", "ProgressCallback", "UnchangedPages"]
