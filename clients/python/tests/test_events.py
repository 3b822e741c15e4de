"""`Crew.job`, `Crew.jobs`, `Crew.events`, `Crew.metrics` and the event-driven
`wait` and `result`, against the real daemon."""

from __future__ import annotations

import threading
import time
from typing import List

import pytest

from crew_client import (
    ApiError,
    Crew,
    Event,
    JobAssigned,
    JobEnded,
    JobInfo,
    JobsSent,
    Output,
    StreamEnded,
)


def test_job_through_its_states(crew: Crew) -> None:
    job = crew.send(["sleep", "1"], name="napper")
    seen: List[str] = []
    deadline = time.monotonic() + 30
    while True:
        info = crew.job(job)
        if not seen or seen[-1] != info.state:
            seen.append(info.state)
        if info.state == "finished":
            break
        assert time.monotonic() < deadline, f"states seen: {seen}"
        time.sleep(0.02)
    assert "running" in seen, seen
    assert set(seen) <= {"queued", "assigned", "running", "finished"}
    assert isinstance(info, JobInfo)
    assert info.id == job and info.name == "napper" and info.status == "succeeded" and info.final
    assert info.slot is not None and info.slot.startswith("local-") and info.attempt == 1
    assert info.sent is not None and info.assigned is not None and info.started is not None
    assert info.finished is not None and info.finished >= info.started
    assert isinstance(info.output, Output) and info.output.id == job and info.output.ok
    assert info.raw["state"] == "finished"
    # By name too; still not received:
    assert crew.job("napper").id == job
    (got,) = crew.receive(ids=[job])
    assert got.id == job
    after = crew.job(job)
    assert after.state == "received" and after.output is not None and after.output.status == "succeeded"
    with pytest.raises(ApiError) as raised:
        crew.job(987654)
    assert raised.value.code == "not_found" and raised.value.status == 404


def test_jobs_pages_over_more_than_100_jobs(crew: Crew) -> None:
    ids = crew.send(jobs=[["true"] for _ in range(250)])
    every = list(crew.jobs())
    assert [j.id for j in every] == sorted(ids)
    assert all(isinstance(j, JobInfo) and j.output is None for j in every)
    small = list(crew.jobs(page_size=7))
    assert [j.id for j in small] == sorted(ids)
    crew.wait(timeout=120)
    finished = list(crew.jobs("finished"))
    assert [j.id for j in finished] == sorted(ids)
    assert all(j.status == "succeeded" for j in finished)
    assert list(crew.jobs("queued")) == [] and list(crew.jobs("running")) == []
    crew.receive(all=True)
    assert len(list(crew.jobs("received", page_size=1000))) == 250
    assert list(crew.jobs("finished")) == []
    with pytest.raises(ValueError):
        crew.jobs("sleeping")


def test_events_of_jobs_sent_after_subscribing(crew: Crew) -> None:
    events = crew.events()  # subscribed now, before the send
    ids = crew.send(jobs=[["echo", str(i)] for i in range(3)] + [["sh", "-c", "exit 4"]])
    seen: List[Event] = []
    ended = set()
    for event in events:
        seen.append(event)
        if isinstance(event, JobEnded):
            ended.add(event.id)
        if ended == set(ids):
            break
    events.close()
    sent = [e for e in seen if isinstance(e, JobsSent)]
    assert sent and sent[0].ids == ids and sent[0].type == "jobs_sent"
    assigned = {e.id: e for e in seen if isinstance(e, JobAssigned)}
    assert set(assigned) == set(ids)
    assert all(e.slot.startswith("local-") and e.attempt == 1 for e in assigned.values())
    ends = {e.id: e for e in seen if isinstance(e, JobEnded)}
    assert [ends[i].status for i in ids] == ["succeeded"] * 3 + ["failed"]
    # jobs_sent comes before any event of those jobs, and each job is
    # assigned before it ends.
    order = [(type(e).__name__, getattr(e, "id", None)) for e in seen]
    assert order.index(("JobsSent", None)) < min(order.index(("JobAssigned", i)) for i in ids)
    assert all(order.index(("JobAssigned", i)) < order.index(("JobEnded", i)) for i in ids)


def test_event_stream_ends_when_the_daemon_stops(crew: Crew) -> None:
    idle = crew.subscribe()
    assert idle.next(timeout=0.2) is None  # nothing happens: a timeout, and the stream closed
    assert idle.closed
    stream = crew.subscribe()
    got: List[Event] = []
    done = threading.Event()

    def read() -> None:
        for event in stream:
            got.append(event)
        done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    crew.down()
    assert done.wait(30), "the iteration did not end when the daemon stopped"
    with pytest.raises(StreamEnded):
        stream.next()


def test_wait_returns_promptly_after_the_last_job_ends(crew: Crew) -> None:
    crew.send(jobs=[["sleep", "0.3"], ["sleep", "1"], ["true"]])
    start = time.monotonic()
    crew.wait(timeout=30)
    took = time.monotonic() - start
    infos = list(crew.jobs())
    assert all(j.state == "finished" for j in infos)
    last_end = max(j.finished for j in infos if j.finished is not None)
    # Returned within a fraction of a second of the last job's end (no 100 ms
    # or 1 s polling period), and not before it.
    assert 0.9 <= took < 3
    lag = time.time() - last_end.timestamp()
    assert lag < took
    # Nothing unfinished: at once.
    start = time.monotonic()
    crew.wait()
    assert time.monotonic() - start < 0.5


def test_wait_one_and_timeout(crew: Crew) -> None:
    crew.send(["sleep", "30"])
    with pytest.raises(TimeoutError):
        crew.wait(timeout=0.3)
    crew.send(["true"])
    crew.wait(one=True, timeout=30)
    assert crew.status().jobs.ready == 1


def test_result_waits_on_events(crew: Crew) -> None:
    job = crew.send(["sleep", "0.5"], name="half")
    start = time.monotonic()
    record = crew.result("half", timeout=30)
    assert record.id == job and record.ok
    assert time.monotonic() - start < 5
    with pytest.raises(KeyError):
        crew.result(job)  # received already


def test_metrics(crew: Crew) -> None:
    crew.send(jobs=[["true"], ["true"]])
    crew.wait(timeout=30)
    text = crew.metrics()
    assert "crew_jobs_sent_total 2" in text
    assert "crew_jobs_finished_total" in text and "crew_slots" in text
