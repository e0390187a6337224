"""The generation worker of ``lmzoo serve``: one thread owns the model, fed by a bounded queue.

Why a thread of its own, and no lock in the request handlers: one model (and its decoding state)
serves one generation at a time. Guarding it with a lock taken by each request handler ties the
model to the handlers' fate: a streaming handler holds the lock across every ``yield``, so a client
that stops reading holds the model hostage; and handlers waiting for the lock fill the worker-thread
pool that the holder needs to make progress, so enough concurrent requests deadlock the server.

Here no handler ever waits on a lock. A request becomes a :class:`Job` put in a bounded queue
(full: refused at once, :class:`QueueFull`); the worker thread takes jobs one at a time and sends
each text piece to the job's handler on the event loop as soon as it is made, never waiting for a
client (a slow reader's pieces wait in its job's buffer, which ``max_tokens`` bounds). A handler
whose client goes away abandons its job: a waiting job leaves the queue at once, a running one
stops after its next token (``stream_text``'s ``progress`` callback). The worker records the time
of its last token, so ``/health`` can tell a stuck generation (:meth:`GenerationWorker.health`).

Events a job receives, in order: ``("piece", i, text)`` for choice ``i`` (each piece as it is made
for a stream, else the whole text), ``("done", i, info)`` when choice ``i`` ends (``info``:
prompt/completion tokens and finish reason), or one ``("error", status, message)``; then :data:`END`.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lmzoo.errors import LmzooError

END = None  # the last event of every job


class QueueFull(Exception):
    """The queue of pending generations is full: the request is refused now rather than left waiting."""


@dataclass
class Task:
    """One generation: a prompt continued up to ``max_tokens`` tokens, cut at ``stops``."""

    prompt: str
    max_tokens: int
    stops: list[str]
    sampling: dict[str, Any] = field(default_factory=dict)


# (task, info, progress) -> text pieces: how the worker generates (Server._generate)
Generate = Callable[[Task, dict, Callable[[], bool]], Iterator[str]]


class Job:
    """One request's generations (``tasks``, run in order) and the channel back to its handler.

    Made on the event loop of the handler that awaits it; the worker thread posts events to that
    loop (``call_soon_threadsafe``), so the handler only ever awaits an ``asyncio.Queue``.
    ``stream``: each text piece is sent as it is made; otherwise one piece per choice, once complete.
    """

    def __init__(self, tasks: list[Task], stream: bool):
        self.tasks, self.stream = tasks, stream
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()  # at most sum(max_tokens) + a few events: bounded
        self.cancelled = threading.Event()
        self.finished = False  # END received (set on the loop)

    def post(self, event: Any) -> None:
        """From the worker thread: deliver ``event`` to the handler's loop (dropped if the loop is gone)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop was closed (server shutting down): nobody is listening
            pass

    async def next(self) -> Any:
        """The next event (on the loop); :data:`END` after the last. An error is the job's last word too."""
        event = await self.events.get()
        if event is END or event[0] == "error":
            self.finished = True
        return event


class GenerationWorker:
    """A thread that runs jobs one at a time through ``generate``, fed by a queue of ``queue_size``.

    ``stall_s``: a running generation without a new token for this long makes :meth:`health`
    report "stalled" (a model wedged in a kernel, a deadlocked device: the process still answers
    HTTP, but no request will ever finish).
    """

    def __init__(self, generate: Generate, queue_size: int, stall_s: float):
        self.generate, self.queue_size, self.stall_s = generate, queue_size, stall_s
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()  # guards the fields below; held for a few instructions only
        self._current: Job | None = None
        self._last_progress = time.monotonic()
        self._closed = False
        self._thread: threading.Thread | None = None
        # jobs run, jobs abandoned by their client (waiting or running), tokens generated, jobs failed by a bug
        self.stats = {"jobs": 0, "cancelled": 0, "tokens": 0, "errors": 0}

    # -- the handlers' side (event loop) -------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job``; :class:`QueueFull` when ``queue_size`` jobs are already waiting."""
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._pending) >= self.queue_size:
                raise QueueFull(f"{len(self._pending)} generations are already waiting (queue size "
                                f"{self.queue_size}); retry later")
            if self._thread is None:  # started with the first job: a Server built and never used has no thread
                self._thread = threading.Thread(target=self._run, name="lmzoo-generate", daemon=True)
                self._thread.start()
            self._pending.append(job)
            self._cond.notify()

    def abandon(self, job: Job) -> None:
        """The job's client has gone (or its handler ended): stop its work now. Idempotent; on the loop."""
        if job.finished or job.cancelled.is_set():
            return
        job.cancelled.set()  # a running job stops after its next token
        self.stats["cancelled"] += 1
        with self._cond:
            try:
                self._pending.remove(job)  # a waiting job frees its place in the queue at once
            except ValueError:
                pass
        job.events.put_nowait(END)  # wake whoever still awaits the job

    def health(self) -> dict[str, Any]:
        """``status``: "ok", "stalled" (no token for ``stall_s`` during a generation) or "dead"."""
        now = time.monotonic()
        with self._cond:
            busy, queued, since = self._current is not None, len(self._pending), now - self._last_progress
        dead = self._thread is not None and not self._thread.is_alive() and not self._closed
        status = "dead" if dead else "stalled" if busy and since > self.stall_s else "ok"
        return {"status": status, "busy": busy, "queued": queued, "queue_size": self.queue_size,
                "seconds_since_progress": round(since, 3) if busy else None, **self.stats}

    def close(self, timeout: float) -> None:
        """Refuse new jobs, stop the running one at its next token, end the waiting ones; join the thread."""
        with self._cond:
            self._closed = True
            waiting, self._pending = list(self._pending), deque()
            if self._current is not None:
                self._current.cancelled.set()
            self._cond.notify_all()
        for job in waiting:
            job.post(("error", 503, "the server is shutting down"))
            job.post(END)
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the worker thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._current = self._pending.popleft()
                self._last_progress = time.monotonic()
            try:
                self._run_job(job)
            except Exception as e:  # a bug, not the user's input: that request gets a 500, the worker goes on
                self.stats["errors"] += 1
                traceback.print_exc(file=sys.stderr)
                job.post(("error", 500, f"internal error: {type(e).__name__}"))
            finally:
                with self._cond:
                    self._current = None
                    self._last_progress = time.monotonic()
                self.stats["jobs"] += 1
                job.post(END)

    def _progress(self, job: Job) -> bool:
        """Called after every token: the watchdog's clock; False stops a job whose client has gone."""
        self._last_progress = time.monotonic()
        self.stats["tokens"] += 1
        return not job.cancelled.is_set()

    def _run_job(self, job: Job) -> None:
        for i, task in enumerate(job.tasks):
            if job.cancelled.is_set():
                return
            info: dict[str, Any] = {}
            pieces: list[str] = []
            try:
                for piece in self.generate(task, info, lambda: self._progress(job)):
                    if job.stream:
                        job.post(("piece", i, piece))
                    else:
                        pieces.append(piece)
            except LmzooError as e:  # any user-caused error (lmzoo.errors) is a 400, never a 500
                job.post(("error", 400, str(e)))
                return
            if job.cancelled.is_set():
                return
            if pieces:
                job.post(("piece", i, "".join(pieces)))
            job.post(("done", i, info))
