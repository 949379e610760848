"""The mirror database: the only place syncd uses SQLAlchemy."""

from syncd.store.locks import OrgLease
from syncd.store.seen import SeenIds, Settled
from syncd.store.store import KnownDevice, PageReader, PageWriter, Session, Store, redact_url

__all__ = [
    "KnownDevice",
    "OrgLease",
    "PageReader",
    "PageWriter",
    "SeenIds",
    "Session",
    "Settled",
    "Store",
    "redact_url",
]
