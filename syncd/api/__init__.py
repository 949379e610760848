"""The OpenApp Devices API client: the only place syncd speaks HTTP."""

from syncd.api.client import DevicePage, OpenAppClient
from syncd.api.retry import backoff_delay, parse_retry_after

__all__ = ["DevicePage", "OpenAppClient", "backoff_delay", "parse_retry_after"]
