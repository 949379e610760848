"""A pass's memory does not grow with the org's size: peak RSS of `syncd run-once` (a child process,
so the figure is the pass's own) at two sizes of one org, against the simulator on loopback.

The child is started by a small launcher process: a child spawned straight from this process (vfork,
then exec) inherits this process's high-water RSS, simulator included, as its own ru_maxrss. So the
small org's pass may run while this process seeds the large org (each child's figure is its own)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from syncd.simulator import Simulator, World

from .conftest import API_KEY

SMALL, LARGE = 40_000, 120_000
# Peak RSS may grow by this much from SMALL to LARGE devices: page caches filling up (the scratch file
# of seen ids, 4 MB; SQLite's, 2 MB a connection) and the noise of a Python process. Measured
# 2026-12-05 with the seen ids in a scratch file: +3.0 and +3.3 MB (70.6 MB at 150,000, 70.9 MB at
# 300,000: the caches are full); the Python set of them it replaced: 175 bytes a device, +17 MB at
# 50,000 -> 150,000. Since 2026-12-06 the sizes are 40,000 and 120,000 (were 50,000 and 150,000):
# measured 68.0-69.8 MB and 68.8-70.2 MB. Below ~30,000 devices the caches are not full yet (64.0 MB
# at 20,000, 67.7 MB at 30,000), so SMALL stays above that. 80,000 devices apart, a leak of 100 bytes
# a device grows the peak by 80,000 x 100 B = 7.6 MB, over the bound on its own; the set: +13 MB.
GROWTH_BOUND_MB = 6.0
# Runs its arguments as a child and prints that child's peak RSS (KiB), measured from a small process.
LAUNCHER = (
    "import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); _, s, u = os.wait4(p.pid, 0); "
    "print(os.waitstatus_to_exitcode(s), u.ru_maxrss)"
)


def seeded(devices: int) -> World:
    """A world of one org of ``devices``, none of them portals."""
    world = World(seed=21)
    world.seed(1, devices, portal_fraction=0.0)
    world.add_key(API_KEY)
    return world


def peak_rss_mb(tmp_path: Path, world: World) -> float:
    """Peak RSS (MB) of a first sync of the one org of ``world``."""
    (org,) = world.orgs
    devices = len(world.orgs[org].devices)
    peak = 0.0
    with Simulator(world) as sim:
        config = tmp_path / f"memory-{devices}.toml"
        config.write_text(
            f'[api]\nbase_url = "{sim.url}"\napi_key_env = "SYNCD_MEMORY_KEY"\n'
            f'[database]\nurl = "sqlite:///{tmp_path}/memory-{devices}.db"\n'
            "[sync]\ndoor_restrictions = false\nmetadata_definitions = false\n"
            f'[logging]\nlevel = "warning"\n[[orgs]]\nid = "{org}"\n'
        )
        env = {**os.environ, "SYNCD_MEMORY_KEY": API_KEY}
        for command in (["db", "upgrade"], ["run-once"]):
            launched = subprocess.run(
                [sys.executable, "-c", LAUNCHER, sys.executable, "-m", "syncd", *command, "--config", str(config)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            exit_code, max_rss_kb = launched.stdout.split()[-2:]
            assert exit_code == "0", launched.stderr
            if command[0] == "run-once":
                peak = max(peak, int(max_rss_kb) / 1024)
    return peak


def test_a_pass_peak_memory_does_not_grow_with_the_org_size(tmp_path: Path) -> None:
    # The small org's pass (children, ~5 s) runs while this process seeds the large org (~5 s).
    with ThreadPoolExecutor(max_workers=1) as pool:
        measuring = pool.submit(peak_rss_mb, tmp_path, seeded(SMALL))
        big = seeded(LARGE)
        small = measuring.result()
    large = peak_rss_mb(tmp_path, big)
    assert large - small <= GROWTH_BOUND_MB, (
        f"peak RSS {small:.1f} MB at {SMALL:,} devices, {large:.1f} MB at {LARGE:,}"
    )
