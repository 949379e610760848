"""Requests run ahead of their consumer: up to ``width`` at once, answers handed over in order.

The concurrency is for waiting on the network, not for Python work: the consumer (one pass's
thread) still parses and writes one answer after the other, in the order asked.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

K = TypeVar("K")
T = TypeVar("T")


def in_order(
    tasks: Iterable[Callable[[], T]],
    width: int,
    name: str,
    first_alone: bool = True,
    allowed: Callable[[], int] | None = None,
) -> Generator[Future[T], None, None]:
    """Run ``tasks`` up to ``width`` at a time; yield each one's finished future, in order.

    ``allowed``: asked before each start, how many may be under way now (at least one), when
    fewer than ``width``: a request budget's limit. A task started beyond it would only wait at the
    budget on a thread of its own, and every answer would wake it for nothing.

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
            if allowed is not None:
                room = max(1, min(room, allowed()))
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


class Ahead(Generic[K, T]):
    """Tasks handed in over time by one consumer, up to ``width`` running at once on threads of
    their own; their finished futures handed back in the order given, with or without waiting.

    For requests whose need is learnt bit by bit while the consumer does other work (a pass's door
    restrictions, asked while its scan goes on). The consumer bounds what it hands in (:meth:`__len__`).
    """

    def __init__(self, width: int, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(1, width), thread_name_prefix=name)
        self._pending: deque[tuple[K, Future[T]]] = deque()

    def __len__(self) -> int:
        """Tasks handed in whose futures were not handed back yet."""
        return len(self._pending)

    def submit(self, key: K, task: Callable[[], T]) -> None:
        """Start ``task`` when a thread is free."""
        self._pending.append((key, self._pool.submit(task)))

    def finished(self) -> Iterator[tuple[K, Future[T]]]:
        """The futures finished so far, in the order given, up to the first one still running."""
        while self._pending and self._pending[0][1].done():
            yield self._pending.popleft()

    def drop_waiting(self) -> None:
        """Cancel the tasks no thread has started yet; those started are still handed back by :meth:`rest`."""
        self._pending = deque((key, future) for key, future in self._pending if not future.cancel())

    def rest(self) -> Iterator[tuple[K, Future[T]]]:
        """Every future not handed back yet, in the order given, each once finished."""
        while self._pending:
            key, future = self._pending.popleft()
            future.exception()  # waits until it is done
            yield key, future

    def close(self) -> None:
        """Cancel what has not started; wait for what has (each bounded by its request's deadline)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
