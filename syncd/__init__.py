"""syncd: keep a local SQL mirror of OpenApp devices."""

__version__ = "0.1.0"
