"""The ids a pass saw, kept out of its memory (syncd/store/seen.py)."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.store import SeenIds
from syncd.store import seen as seen_module


def test_each_id_counts_once_and_repeats_across_pages_are_reported() -> None:
    with SeenIds() as seen:
        seen.add(["a", "b", "c"])
        seen.add(["d", "b"])  # b: listed on an earlier page too
        seen.add([])
        seen.add(["e", "a", "c"])
        settled = seen.settle()
        assert (settled.distinct, settled.repeats, sorted(settled.repeated)) == (5, 3, ["a", "b", "c"])
        assert seen.among(["a", "e", "x", "y"]) == {"a", "e"}
        assert list(seen.unseen(iter(["x", "a", "y", "e", "z"]))) == ["x", "y", "z"]


def test_the_pass_does_not_wait_for_the_inserts_until_the_backlog_is_full() -> None:
    gate = threading.Event()
    seen = SeenIds().__enter__()
    try:
        seen._worker.submit(gate.wait)  # the thread is busy: what is handed over waits in the backlog
        for page in range(seen_module.BACKLOG):
            seen.add([f"id-{page}"])  # returns at once
        assert len(seen._pending) == seen_module.BACKLOG
        gate.set()
        assert seen.settle().distinct == seen_module.BACKLOG
    finally:
        gate.set()
        seen.close()


def test_closing_deletes_the_scratch_database_and_twice_is_harmless() -> None:
    seen = SeenIds().__enter__()
    seen.add(["a"])
    seen.close()
    seen.close()
    assert seen._db is None and seen._worker._shutdown


def test_many_pages_beyond_the_backlog() -> None:
    pages = [[f"{p}-{i}" for i in range(200)] for p in range(3 * seen_module.BACKLOG)]
    with SeenIds() as seen:
        for page in pages:
            seen.add(page)
        assert seen.settle().distinct == 200 * len(pages)
        stream = (device_id for page in pages for device_id in page)
        assert list(seen.unseen(stream)) == []


# Ids as JSON carries them: no NUL (SQLite's text ends there; ids syncd takes match models.DEVICE_ID)
# and no lone surrogates (not UTF-8).
IDS = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(pages=st.lists(st.lists(IDS, unique=True, max_size=30), max_size=12), probe=st.lists(IDS, max_size=40))
def test_the_counts_and_answers_are_those_of_a_python_set(pages: list[list[str]], probe: list[str]) -> None:
    everything: set[str] = set()
    handed = 0
    with SeenIds() as seen:
        for page in pages:
            seen.add(page)
            everything.update(page)
            handed += len(page)
        settled = seen.settle()
        assert settled.distinct == len(everything) and settled.repeats == handed - len(everything)
        assert set(settled.repeated) <= everything
        assert seen.among(probe) == everything & set(probe)
        assert list(seen.unseen(probe)) == [p for p in probe if p not in everything]
