"""Dynamic batching: rows of requests that arrive together are decoded in one `generate` call.

Decoding a batch of 32 rows costs a few times one row, not 32 times (the weights are read once per step for the
whole batch), so rows waiting at the same moment share a call. Each row is queued with a future; one worker takes
the first waiting row, collects more for up to `window_s` (or until `max_batch` rows), decodes them in a
dedicated thread (the event loop keeps answering meanwhile), and resolves the futures. Rows queued while a batch
decodes form the next batch at once. A row whose request gave up (timeout, client gone) before its batch started is
dropped unread. Torch-free: `decode` is any function from prompts to completions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


class Overloaded(Exception):
    """More rows are waiting than the queue takes: the request is refused rather than left to time out."""


class DynamicBatcher:
    def __init__(
        self,
        decode: Callable[[list[str]], list[str]],
        *,
        max_batch: int,
        window_s: float,
        max_queued_rows: int,
        on_batch: Callable[[int], None] = lambda rows: None,
    ):
        self.decode = decode
        self.max_batch = max_batch
        self.window_s = window_s
        self.max_queued_rows = max_queued_rows
        self.on_batch = on_batch  # called with each decoded batch's row count (metrics)
        self._queue: asyncio.Queue[tuple[str, asyncio.Future]] | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def queued_rows(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        """Start the worker on the running event loop (the app's lifespan calls this)."""
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mrtune-decode")
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the worker; a batch being decoded finishes first (the server drains requests before this)."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def submit(self, prompts: list[str]) -> list[str]:
        """Completions of `prompts`, in order, decoded in whatever batches they fall into."""
        if self._queue is None:
            raise RuntimeError("DynamicBatcher.start() was not called")
        if self._queue.qsize() + len(prompts) > self.max_queued_rows:
            raise Overloaded(f"{self._queue.qsize()} rows are waiting to be decoded")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in prompts]
        for prompt, future in zip(prompts, futures):
            self._queue.put_nowait((prompt, future))
        # Cancelling this coroutine cancels the futures, and the worker skips cancelled rows.
        return list(await asyncio.gather(*futures))

    async def _collect(self) -> list[tuple[str, asyncio.Future]]:
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.window_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return [(prompt, future) for prompt, future in batch if not future.done()]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            self.on_batch(len(batch))
            try:
                outputs = await loop.run_in_executor(self._executor, self.decode, [prompt for prompt, _ in batch])
            except Exception as error:  # every row of the batch fails the same way; the worker lives on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), output in zip(batch, outputs):
                if not future.done():
                    future.set_result(output)
