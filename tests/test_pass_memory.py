"""A pass's memory does not grow with the org's size: peak RSS of `syncd run-once` (a child process,
so the figure is the pass's own) at two sizes of one org, against the simulator on loopback.

The child is started by a small launcher process: a child spawned straight from this process (vfork,
then exec) inherits this process's high-water RSS, simulator included, as its own ru_maxrss."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from syncd.simulator import Simulator, World

from .conftest import API_KEY

SMALL, LARGE = 50_000, 150_000
# Peak RSS may grow by this much from SMALL to LARGE devices: page caches filling up (the scratch file
# of seen ids, 4 MB; SQLite's, 2 MB a connection) and the noise of a Python process. Measured
# 2026-12-05 with the seen ids in a scratch file: +3.0 and +3.3 MB (70.6 MB at 150,000, 70.9 MB at
# 300,000: the caches are full); the Python set of them it replaced: 175 bytes a device, +17 MB here.
GROWTH_BOUND_MB = 6.0
# Runs its arguments as a child and prints that child's peak RSS (KiB), measured from a small process.
LAUNCHER = (
    "import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); _, s, u = os.wait4(p.pid, 0); "
    "print(os.waitstatus_to_exitcode(s), u.ru_maxrss)"
)


def peak_rss_mb(tmp_path: Path, devices: int) -> float:
    """Peak RSS (MB) of a first sync of one org of ``devices``."""
    world = World(seed=21)
    (org,) = world.seed(1, devices, portal_fraction=0.0)
    world.add_key(API_KEY)
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
    small, large = peak_rss_mb(tmp_path, SMALL), peak_rss_mb(tmp_path, LARGE)
    assert large - small <= GROWTH_BOUND_MB, (
        f"peak RSS {small:.1f} MB at {SMALL:,} devices, {large:.1f} MB at {LARGE:,}"
    )
