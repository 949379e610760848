"""The OpenApp Devices API client: the only place syncd speaks HTTP."""

from syncd.api.budget import RequestBudget
from syncd.api.client import DevicePage, OpenAppClient
from syncd.api.retry import parse_retry_after

__all__ = ["DevicePage", "OpenAppClient", "RequestBudget", "parse_retry_after"]
