"""Batches prepared ahead in a background thread.

The thread runs the host side of each batch: reading its windows from a memory map (page
faults, or disk reads when the file is larger than RAM) and pinning them. The training
thread then only queues the non-blocking copy to the device, on its own CUDA stream, so no
stream synchronisation is needed. Order and content are those of the wrapped loader, so
determinism and exact resume are untouched. Only loaders that never use the global RNG may
be wrapped: a second thread drawing from it would change the run.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Iterator

log = logging.getLogger("bigmodel")

_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetched:
    """Runs `loader.host_windows()` up to `depth` items ahead in a background thread and
    yields `loader.finish(item)` from the caller's thread. Everything else (len, set_epoch,
    batch_size) is the loader's."""

    def __init__(self, loader, depth: int):
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self.loader, self.depth = loader, depth

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for item in self.loader.host_windows():
                    if not put(item):
                        return
                put(_END)
            except BaseException as err:  # handed to the consumer, which raises it
                put(_Failed(err))

        worker = threading.Thread(target=produce, name="bigmodel-prefetch", daemon=True)
        worker.start()
        try:
            while True:
                try:
                    item = ready.get(timeout=1.0)
                except queue.Empty:
                    if not worker.is_alive() and ready.empty():
                        raise RuntimeError("the prefetch thread ended without a result") from None
                    continue
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                yield self.loader.finish(item)
        finally:  # also when the consumer stops early: let the producer see it and end
            stop.set()
            worker.join(timeout=5)
            if worker.is_alive():
                log.warning("the data prefetch thread is still reading after 5 s; it ends with the process")
