"""server.service.scheduler without sockets, threads or an engine: limits, credit, round robin, aborts, stalls."""
from __future__ import annotations

import threading

import pytest

from server import protocol as P
from server.service.scheduler import Job, Scheduler

A, B = b"client-a", b"client-b"


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def render(client: bytes, rid: str, credit: int = 0) -> Job:
    return Job(client, rid, "render", payload=None, credit=credit)


def code_of(excinfo) -> str:
    return excinfo.value.code


def test_limits_duplicates_and_shutdown():
    s = Scheduler(max_jobs=3, max_jobs_per_client=2)
    s.submit(render(A, "1"))
    with pytest.raises(P.ProtocolError) as e:
        s.submit(render(A, "1"))
    assert code_of(e) == P.E_DUPLICATE and "'1'" in e.value.message
    s.submit(Job(B, "1", "prepare", None))           # the same id from another client is another job
    s.submit(render(A, "2"))
    with pytest.raises(P.ProtocolError) as e:       # the whole server is full
        s.submit(render(B, "2"))
    assert code_of(e) == P.E_BUSY and "limit 3" in e.value.message
    s.finish(s.jobs[(B, "1")])
    with pytest.raises(P.ProtocolError) as e:       # room again, but client A has its 2
        s.submit(render(A, "3"))
    assert code_of(e) == P.E_BUSY and "this client" in e.value.message
    s.submit(render(B, "2"))
    assert s.count() == 3 and s.clients() == {A, B}
    s.close()
    assert all(j.abort[:2] == ("error", P.E_SHUTTING_DOWN) for j in s.jobs.values())
    with pytest.raises(P.ProtocolError) as e:
        s.submit(render(B, "9"))
    assert code_of(e) == P.E_SHUTTING_DOWN


def test_a_render_runs_only_while_it_has_credit_and_credit_is_capped():
    s = Scheduler(8, 8)
    job = render(A, "r", credit=0)
    s.submit(job)
    assert s.next_job(timeout=0.0) is None           # no credit: not runnable
    s.grant(A, "r", 2)
    assert s.next_job(timeout=0.0) is job and s.credit_left(job) == 2
    s.produced_one(job)
    s.produced_one(job)
    assert s.credit_left(job) == 0 and s.next_job(timeout=0.0) is None
    s.grant(A, "r", 1000)                            # capped: at most MAX_CREDIT ahead of what was produced
    assert s.credit_left(job) == P.MAX_CREDIT
    s.grant(A, "nope", 5)                            # unknown request: ignored
    prep = Job(A, "p", "prepare", None)
    s.submit(prep)
    s.grant(A, "p", 5)                               # credit only means something for renders
    assert prep.granted == 0


def test_round_robin_between_runnable_jobs():
    s = Scheduler(8, 8)
    jobs = [render(A, "1", 9), render(B, "2", 9), Job(A, "3", "prepare", None)]
    for j in jobs:
        s.submit(j)
    picked = [s.next_job(0.0).id for _ in range(6)]
    assert picked == ["1", "2", "3", "1", "2", "3"]
    waiting = render(B, "4", 0)                      # a render without credit is skipped, not blocking
    s.submit(waiting)
    assert waiting not in [s.next_job(0.0) for _ in range(6)]


def test_next_job_wakes_on_grant_and_times_out():
    s = Scheduler(8, 8)
    job = render(A, "r", 0)
    s.submit(job)
    got = []
    t = threading.Thread(target=lambda: got.append(s.next_job(timeout=30.0)))
    t.start()
    s.grant(A, "r", 1)
    t.join(30)
    assert got == [job]
    assert Scheduler(1, 1).next_job(timeout=0.01) is None


def test_cancel_drop_client_and_aborted_jobs_are_runnable():
    s = Scheduler(8, 8)
    a1, a2, b1 = render(A, "1"), render(A, "2"), render(B, "1")
    for j in (a1, a2, b1):
        s.submit(j)
    assert s.cancel(A, "1") == "running" and a1.abort == ("cancelled",)
    assert s.cancel(A, "1") == "running" and a1.abort == ("cancelled",)   # twice: the same
    assert s.cancel(A, "zzz") == "unknown"
    assert s.cancel(B, "2") == "unknown"
    assert s.drop_client(A) == 2                     # the cancelled one too: nobody is left to tell
    assert a1.abort == ("gone",) and a2.abort == ("gone",) and b1.abort is None
    assert s.drop_client(A) == 0
    # aborted renders are runnable without credit, so the worker can end them
    assert {s.next_job(0.0).id for _ in range(2)} == {"1", "2"}


def test_a_cancel_while_the_terminal_reply_is_in_flight_is_recognised():
    """The worker finishes a job before the main thread forwards its terminal reply; a cancel that
    arrives in between is for a request that is ending, not an unknown one. Once the reply has been
    forwarded, the id is unknown again; a new job with that id runs normally."""
    s = Scheduler(8, 8)
    job = render(A, "r", 4)
    s.submit(job)
    s.finish(job)
    assert s.cancel(A, "r") == "ending" and job.abort is None
    assert s.cancel(B, "r") == "unknown"
    s.reported(A, "r")
    assert s.cancel(A, "r") == "unknown"
    again = render(A, "r", 4)
    s.submit(again)
    assert s.cancel(A, "r") == "running" and again.abort == ("cancelled",)
    gone = render(B, "g")
    s.submit(gone)
    s.drop_client(B)
    s.finish(gone)                                   # nobody to answer: nothing stays in flight
    assert s.cancel(B, "g") == "unknown" and (B, "g") not in s.ending
    for i in range(Scheduler.ENDING_MEMORY + 10):    # bounded even if replies were never reported
        j = Job(B, f"x{i}", "prepare", None)
        s.submit(j)
        s.finish(j)
    assert len(s.ending) == Scheduler.ENDING_MEMORY


def test_stalled_renders_expire_by_the_clock():
    clock = Clock()
    s = Scheduler(8, 8, clock=clock)
    starved, fed, prep = render(A, "s", 0), render(A, "f", 0), Job(A, "p", "prepare", None)
    for j in (starved, fed, prep):
        s.submit(j)
    clock.now += 5
    s.grant(A, "f", 1)                               # a grant restarts the stall clock
    clock.now += 6
    s.expire_stalled(10.0)
    assert starved.abort[:2] == ("error", P.E_STALLED) and "10 s" in starved.abort[2]
    assert fed.abort is None and prep.abort is None  # fed has credit; prepare never stalls
    s.produced_one(fed)                              # used its credit: stalls 10 s after its last grant
    clock.now += 3.5
    s.expire_stalled(10.0)
    assert fed.abort is None
    clock.now += 1
    s.expire_stalled(10.0)
    assert fed.abort[1] == P.E_STALLED


def test_identities_mirror():
    s = Scheduler(1, 1)
    s.add_identity("a")
    s.add_identity("b")
    s.remove_identity("a")
    assert not s.known_identity("a") and s.known_identity("b")
    s.set_identities(["c"])
    assert not s.known_identity("b") and s.known_identity("c")
    assert s.idle()
