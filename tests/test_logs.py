"""Logging: one format for syncd's own lines and the libraries' (a JSON log stays JSON lines)."""

from __future__ import annotations

import io
import json
import logging

import structlog

from syncd import logs


def test_library_warnings_are_json_lines_like_ours() -> None:
    out = io.StringIO()
    logs.configure("json", "info", out)
    logging.getLogger("apscheduler.scheduler").warning("Execution of job %r skipped", "sync x")
    logging.getLogger("apscheduler.scheduler").info("not shown: libraries log warnings only")
    structlog.get_logger("syncd.daemon").info("daemon started", orgs=2)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(line["level"], line["event"]) for line in lines] == [
        ("warning", "Execution of job 'sync x' skipped"),
        ("info", "daemon started"),
    ]
    assert lines[0]["logger"] == "apscheduler.scheduler" and "timestamp" in lines[0]
