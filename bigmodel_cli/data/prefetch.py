"""Batches built ahead in a background thread.

The training loop then finds each batch ready: reading the windows from a memory map (page
faults, or disk reads when the file is larger than RAM) and starting the host-to-device copy
overlap the step that runs on the accelerator. Order and content are those of the wrapped
loader, so determinism and exact resume are untouched. Only loaders that never use the
global RNG may be wrapped: a second thread drawing from it would change the run.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator

_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetched:
    """Iterates `loader` in a background thread, up to `depth` batches ahead; everything
    else (len, set_epoch, batch_size) is the loader's."""

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
                for batch in self.loader:
                    if not put(batch):
                        return
                put(_END)
            except BaseException as err:  # handed to the consumer, which raises it
                put(_Failed(err))

        worker = threading.Thread(target=produce, name="bigmodel-prefetch", daemon=True)
        worker.start()
        try:
            while True:
                item = ready.get()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:  # also when the consumer stops early: let the producer see it and end
            stop.set()
            worker.join(timeout=5)
