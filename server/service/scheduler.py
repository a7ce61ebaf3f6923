"""Jobs and the scheduler of ``styleheat-server``: pure Python, no sockets, no engine.

The main thread submits, grants credit, cancels and drops jobs; the worker thread takes the next
runnable job (round robin) and finishes it. Every method takes the one lock (``cv``). A render is
runnable only while its granted credit exceeds the frames it produced, or once it is aborted (so the
worker can report how it ended).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, Callable

from server import protocol as P


class Job:
    """One request of one client, from submission to its terminal reply."""

    def __init__(self, client: bytes, rid: str, kind: str, payload: Any, credit: int = 0):
        self.client = client
        self.id = rid
        self.kind = kind              # "prepare" | "render" | "forget" | "extract" | "audio2exp"
        self.payload = payload
        self.peer = client            # who the per-client job cap counts: the CURVE key, else the socket
        self.trusted = True           # loopback client: error replies may carry details (paths, exceptions)
        self.abort: tuple | None = None   # ("cancelled",) | ("error", code, msg) | ("gone",)
        self.granted = credit
        self.produced = 0
        self.last_credit = 0.0           # clock time of the last grant (set on submit)
        # worker-only state
        self.gen = None
        self.indices: list[int] = []
        self.batch = 1
        self.audio = None
        self.placer = None            # render output "composite"/"matte": crop -> placed frame

    @property
    def key(self) -> tuple[bytes, str]:
        return (self.client, self.id)


class Scheduler:
    """``clock`` (seconds, monotonic) times credit stalls; tests pass their own.

    The worker finishes a job, then sends its terminal reply, which the main thread forwards later.
    Until the main thread has forwarded it (:meth:`reported`), the job is *ending*: a ``cancel`` that
    arrives then is answered by that terminal reply (:meth:`cancel` says ``"ending"``), not by an
    ``unknown_request`` error that could overtake it.
    """

    ENDING_MEMORY = 1024   # bound on jobs whose terminal reply is in flight (a safety net: replies clear them)

    def __init__(self, max_jobs: int, max_jobs_per_client: int, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.cv = threading.Condition()
        self.jobs: dict[tuple[bytes, str], Job] = {}
        self.max_jobs = max_jobs
        self.max_per_client = max_jobs_per_client
        self.closed = False
        self.identities: set[str] = set()
        self.owners: dict[str, set[bytes]] = {}     # identity -> peers that prepared it
        self.ending: OrderedDict[tuple[bytes, str], None] = OrderedDict()

    # main thread -------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self.cv:
            if self.closed:
                raise P.ProtocolError(P.E_SHUTTING_DOWN, "the server is shutting down")
            if job.key in self.jobs:
                raise P.ProtocolError(P.E_DUPLICATE, f"request {job.id!r} is still running; use a new id")
            if len(self.jobs) >= self.max_jobs:
                raise P.ProtocolError(P.E_BUSY, f"the server already has {len(self.jobs)} jobs queued or running "
                                                f"(limit {self.max_jobs}); retry when some finish")
            mine = sum(1 for j in self.jobs.values() if j.peer == job.peer)
            if mine >= self.max_per_client:
                raise P.ProtocolError(P.E_BUSY, f"this client already has {mine} jobs queued or running "
                                                f"(limit {self.max_per_client}); wait for one to finish")
            job.last_credit = self.clock()
            self.jobs[job.key] = job
            self.ending.pop(job.key, None)
            self.cv.notify_all()

    def grant(self, client: bytes, rid: str, n: int) -> None:
        with self.cv:
            job = self.jobs.get((client, rid))
            if job is None or job.kind not in ("render", "dub"):
                return
            job.granted = min(job.granted + n, job.produced + P.MAX_CREDIT)
            job.last_credit = self.clock()
            self.cv.notify_all()

    def cancel(self, client: bytes, rid: str) -> str:
        """``"running"`` (now aborted as cancelled, unless already aborted), ``"ending"`` (finished,
        its terminal reply not forwarded yet) or ``"unknown"``."""
        with self.cv:
            job = self.jobs.get((client, rid))
            if job is None:
                return "ending" if (client, rid) in self.ending else "unknown"
            if job.abort is None:
                job.abort = ("cancelled",)
            self.cv.notify_all()
            return "running"

    def drop_client(self, client: bytes) -> int:
        with self.cv:
            n = 0
            for job in self.jobs.values():
                if job.client == client and (job.abort is None or job.abort[0] != "gone"):
                    job.abort = ("gone",)
                    n += 1
            self.cv.notify_all()
            return n

    def expire_stalled(self, timeout: float, no_credit_timeout: float | None = None) -> None:
        """Abort renders waiting for credit longer than ``timeout`` s; a render never granted any credit
        (sent with ``credit: 0`` and no ``credit`` message since) already after ``no_credit_timeout`` s,
        so requests that never mean to take frames cannot hold job slots."""
        now = self.clock()
        short = timeout if no_credit_timeout is None else min(timeout, no_credit_timeout)
        with self.cv:
            for job in self.jobs.values():
                if job.kind != "render" or job.abort is not None or job.granted > job.produced:
                    continue
                limit = short if job.granted == 0 else timeout
                if now - job.last_credit > limit:
                    job.abort = ("error", P.E_STALLED,
                                 f"no credit granted for {limit:.0f} s; the render was dropped "
                                 f"(send 'credit' messages as frames arrive)")
            self.cv.notify_all()

    def count(self) -> int:
        with self.cv:
            return len(self.jobs)

    def clients(self) -> set[bytes]:
        with self.cv:
            return {k[0] for k in self.jobs}

    def close(self) -> None:
        with self.cv:
            self.closed = True
            for job in self.jobs.values():
                if job.abort is None:
                    job.abort = ("error", P.E_SHUTTING_DOWN, "the server is shutting down")
            self.cv.notify_all()

    def known_identity(self, identity: str) -> bool:
        with self.cv:
            return identity in self.identities

    def owns(self, peer: bytes, identity: str) -> bool:
        """True when ``peer`` prepared ``identity`` (only owners and trusted clients may forget it)."""
        with self.cv:
            return peer in self.owners.get(identity, ())

    # worker thread -----------------------------------------------------------------------
    def _runnable(self, job: Job) -> bool:
        return job.abort is not None or job.kind != "render" or job.granted > job.produced

    def next_job(self, timeout: float) -> Job | None:
        """The next job with work to do, round robin; None on timeout."""
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                for key, job in self.jobs.items():
                    if self._runnable(job):
                        # rotate: this job goes to the back of the line
                        del self.jobs[key]
                        self.jobs[key] = job
                        return job
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cv.wait(left)

    def credit_left(self, job: Job) -> int:
        with self.cv:
            return job.granted - job.produced

    def produced_one(self, job: Job) -> None:
        with self.cv:
            job.produced += 1

    def finish(self, job: Job) -> None:
        with self.cv:
            if self.jobs.pop(job.key, None) is not None and job.abort != ("gone",):  # gone: no reply follows
                self.ending[job.key] = None
                while len(self.ending) > self.ENDING_MEMORY:
                    self.ending.popitem(last=False)
            self.cv.notify_all()

    def reported(self, client: bytes, rid: str) -> None:
        """Main thread: the terminal reply of ``rid`` has been forwarded (or its client is gone)."""
        with self.cv:
            self.ending.pop((client, rid), None)

    def add_identity(self, identity: str, owner: bytes | None = None) -> None:
        with self.cv:
            self.identities.add(identity)
            if owner is not None:
                self.owners.setdefault(identity, set()).add(owner)

    def set_identities(self, identities) -> None:
        with self.cv:
            self.identities = set(identities)
            for gone in [i for i in self.owners if i not in self.identities]:
                del self.owners[gone]

    def remove_identity(self, identity: str) -> None:
        with self.cv:
            self.identities.discard(identity)
            self.owners.pop(identity, None)

    def idle(self) -> bool:
        with self.cv:
            return not self.jobs

