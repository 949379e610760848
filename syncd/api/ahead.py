"""Requests run ahead of their consumer: up to ``width`` at once, answers handed over in order.

The concurrency is for waiting on the network, not for Python work: the consumer (one pass's
thread) still parses and writes one answer after the other, in the order asked.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def in_order(
    tasks: Iterable[Callable[[], T]], width: int, name: str, first_alone: bool = True
) -> Generator[Future[T], None, None]:
    """Run ``tasks`` up to ``width`` at a time; yield each one's finished future, in order.

    ``first_alone``: the first task runs by itself, and the others only once its answer is handed
    over, since that answer may end the whole list (a short first page, a rejected key): then one
    request is all it costs. A task is started only when fewer than ``width`` are waiting to be
    handed over, so at most ``width`` answers are held at once. ``tasks`` may be endless: whoever
    stops iterating (closes the generator) stops new tasks; tasks not yet started are cancelled,
    started ones are waited for (each is bounded by its own request deadline and the client's stop).
    """
    source = iter(tasks)
    if width <= 1:
        for task in source:
            future: Future[T] = Future()
            try:
                future.set_result(task())
            except Exception as exc:
                future.set_exception(exc)
            yield future
        return
    pool = ThreadPoolExecutor(max_workers=width, thread_name_prefix=name)
    pending: deque[Future[T]] = deque()
    room = 1 if first_alone else width
    try:
        exhausted = False
        while True:
            while not exhausted and len(pending) < room:
                upcoming = next(source, None)
                if upcoming is None:
                    exhausted = True
                else:
                    pending.append(pool.submit(upcoming))
            if not pending:
                return
            head = pending.popleft()
            head.exception()  # waits until it is done
            yield head
            room = width
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
