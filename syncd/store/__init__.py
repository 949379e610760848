"""The mirror database: the only place syncd uses SQLAlchemy."""

from syncd.store.store import KnownDevice, PageWriter, Store, redact_url

__all__ = ["KnownDevice", "PageWriter", "Store", "redact_url"]
