"""One model, many clients: requests are decoded together in one batch, and join it as they arrive.

A server's requests come from many connections at once; decoding them one after another leaves most of the
hardware idle, since one decode step of a small batch costs about what one row costs (the weights are read
once per step, whatever the number of rows). The engine's loop, `run`, is the only code that touches the model;
it runs `generate_batch` (litft/batch_generate.py):

    wait for a request  ->  decode it, and at every step take in all requests that arrived meanwhile
                            (each row with its own prompt, sampling settings and LoRA)
                        ->  when no row is left, wait again

Each request gets its tokens through an asyncio queue, on the event loop that serves its connection:
token ids as they are produced, then "stop" (a stop token), "length" (max tokens reached) or "cancelled",
or the exception that ended the batch. A client that goes away sets `row.done`, and its row leaves the batch
at the next step.

scripts/serve.py runs the loop on the main thread and the HTTP server on another: on a CPU, PyTorch's many small
ops of a decode step ran 2.5x slower from a secondary thread (bench/RESULTS.md, "Serving": 25.6 s against 10.3 s
for the same `generate_batch` call).
`start` runs it on a thread of its own, for tests.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field

import torch

from litft.batch_generate import Row, generate_batch
from litft.generate import check_fits


class Stopping(RuntimeError):
    """A request that came after the server began to stop."""

    def __init__(self) -> None:
        super().__init__("the server is stopping; send the request again when it is back")


@dataclass(eq=False)
class Job:
    row: Row
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens: int = 0  # sent so far

    def send(self, event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    def __init__(self, model: torch.nn.Module, max_batch_size: int = 32, min_shared: int = 16) -> None:
        self.model, self.max_batch_size, self.min_shared = model, max_batch_size, min_shared  # (generate_batch's)
        self.device = model.embed.weight.device
        self.waiting: queue.SimpleQueue[Job | None] = queue.SimpleQueue()  # put() is safe from a signal handler
        self.stopping = threading.Event()
        # a request is queued, or refused, wholly before or after `stop`; re-entrant, as a second Ctrl-C may come
        # while the first one's `stop` holds it
        self.accepting = threading.RLock()
        self.thread = threading.Thread(target=self.run, name="litft-engine", daemon=True)
        self.largest_batch = 0  # the most rows decoded together so far

    def start(self) -> None:
        """Run the loop on a thread of its own."""
        self.thread.start()

    def stop(self) -> None:
        """Take no more requests; the batch being decoded finishes, then the loop ends (callable from any thread
        or a signal handler). Requests still waiting are told the server is stopping."""
        with self.accepting:  # from here on `submit` refuses, so the loop's last look at the queue misses nobody
            self.stopping.set()
        self.waiting.put(None)  # wakes the loop if it is waiting
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout=60)

    def submit(self, row: Row) -> asyncio.Queue:
        """Queue a row for decoding (from the event loop); returns the queue its events arrive on.
        Raises UserError when the row does not fit the model's context, Stopping once `stop` was called."""
        check_fits(self.model.config.block_size, row.prompt.size(0), row.max_new_tokens)
        job = Job(row, asyncio.get_running_loop())
        with self.accepting:
            if self.stopping.is_set():
                raise Stopping()
            self.waiting.put(job)
        return job.events

    def run(self) -> None:
        """Decode requests as they come, until `stop`."""
        while not self.stopping.is_set():
            if (first := self.waiting.get()) is not None:
                self.decode([first])
        while True:  # requests that came too late
            try:
                job = self.waiting.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.send(Stopping())

    def decode(self, jobs: list[Job]) -> None:
        active: dict[int, Job] = {}  # id(row) -> job, for the rows in the batch

        def more() -> list[Row]:  # asked after every step: the requests that arrived meanwhile, while there is room
            for key in [key for key, job in active.items() if job.row.done]:  # clients that went away
                active.pop(key).send("cancelled")
            joining = []
            while len(active) + len(joining) < self.max_batch_size and not self.stopping.is_set():
                try:
                    job = self.waiting.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    joining.append(job)
            return admit(joining)

        def admit(new: list[Job]) -> list[Row]:
            active.update((id(job.row), job) for job in new)
            self.largest_batch = max(self.largest_batch, len(active))
            return [job.row for job in new]

        try:
            for row, token in generate_batch(self.model, admit(jobs), more, min_shared=self.min_shared):
                job = active[id(row)]
                if token is None:
                    active.pop(id(row)).send("stop")
                    continue
                job.send(token)
                job.tokens += 1
                if job.tokens == row.max_new_tokens:
                    active.pop(id(row)).send("length")
        except BaseException as e:  # noqa: BLE001 (each client of the batch is told; an error ends only the batch)
            for job in active.values():
                job.send(e if isinstance(e, Exception) else Stopping())
            if not isinstance(e, Exception):  # a second Ctrl-C: the server stops here
                raise
            return
        for job in active.values():
            job.send("cancelled")
