"""A generator run on a background thread, a few items ahead of its consumer."""

from __future__ import annotations

import queue
import threading


def prefetch(items, depth: int):
    """Run a generator on a background thread, `depth` items ahead of the consumer."""
    q = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        """Wait for room, unless the consumer has gone away."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except Exception as err:  # hand the error to the consumer
            put(err)

    thread = threading.Thread(target=produce, name="store-prefetch", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
