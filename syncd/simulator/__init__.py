"""A faithful in-memory OpenApp Devices API for tests, demos and benchmarks (``syncd simulate``)."""

from syncd.simulator.server import Fault, RequestRecord, Simulator
from syncd.simulator.world import SimError, World, org_id_for

__all__ = ["Fault", "RequestRecord", "SimError", "Simulator", "World", "org_id_for"]
