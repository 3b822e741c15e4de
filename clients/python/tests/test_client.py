"""`Crew` against the real daemon: send, receive, wait, status, errors, cancel, logs, fetch."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from crew_client import ApiError, Crew, JobFailed, Output


def test_send_100_jobs_and_receive_all(crew: Crew) -> None:
    ids = crew.send(jobs=[["echo", str(i)] for i in range(100)])
    assert len(ids) == 100 and len(set(ids)) == 100
    outputs = crew.receive(all=True, wait=True)
    assert crew.pending == 0
    assert sorted(o.id for o in outputs) == sorted(ids)
    assert all(isinstance(o, Output) and o.ok and o.exit_code == 0 for o in outputs)
    by_id = {o.id: o for o in outputs}
    assert [by_id[i].stdout.text for i in ids] == [f"{i}\n" for i in range(100)]
    # Each output is delivered once.
    assert crew.receive(all=True) == []


def test_wait_then_status(crew: Crew) -> None:
    crew.send(["sleep", "0.2"], name="nap")
    crew.send("echo $((6 * 7))", tags=[])
    crew.wait(timeout=30)
    status = crew.status()
    assert status.jobs.queued == 0 and status.jobs.running == 0 and status.jobs.ready == 2
    assert len(status.slots) == 4
    assert {s.worker_class for s in status.slots} == {"local"}
    assert all(s.name.startswith("local-") for s in status.slots)
    assert crew.receivable()
    nap = crew.result("nap")
    assert nap.name == "nap" and nap.ok
    (other,) = crew.receive()
    assert other.stdout.text == "42\n"
    assert not crew.receivable()


def test_unknown_class_raises_with_its_code(crew: Crew) -> None:
    with pytest.raises(ApiError) as raised:
        crew.recruit(1, "no-such-class")
    assert raised.value.code == "unknown_class"
    assert raised.value.status == 400
    assert "no-such-class" in raised.value.message
    with pytest.raises(ApiError) as raised:
        crew.send(["true"], tags=["gpu"])
    assert raised.value.code == "no_matching_worker" and raised.value.status == 422


def test_failed_job_raises_with_its_record(crew: Crew) -> None:
    job = crew.send(["sh", "-c", "echo oops >&2; exit 3"])
    with pytest.raises(JobFailed) as raised:
        crew.result(job, timeout=30)
    record = raised.value.output
    assert record.id == job and record.status == "failed" and record.exit_code == 3
    assert record.stderr.text == "oops\n"


def test_cancel(crew: Crew) -> None:
    job = crew.send(["sleep", "60"])
    deadline = time.monotonic() + 20
    while crew.status().jobs.running == 0:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)
    answer = crew.cancel(job, 999999)
    assert answer.cancelled == [job] and answer.unknown == [999999]
    with pytest.raises(JobFailed) as raised:
        crew.result(job, timeout=30)
    assert raised.value.output.status == "cancelled"


def test_logs_and_fetch(crew: Crew, tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text("3 4\n")
    job = crew.send(
        ["sh", "-c", "mkdir -p out; awk '{print $1 * $2}' data.txt > out/product.txt; echo done; echo note >&2"],
        inputs=[str(data)],
        outputs=["out/*"],
    )
    record = crew.result(job, timeout=30)
    assert [o.name for o in record.objects] == ["out/product.txt"]
    logs = crew.logs(job)
    assert (logs.stdout, logs.stderr) == ("done\n", "note\n")
    assert b"".join(crew.log_stream(job, "stderr")) == b"note\n"
    fetched = crew.fetch(job, tmp_path / "results")
    assert fetched == [tmp_path / "results" / "out" / "product.txt"]
    assert fetched[0].read_text() == "12\n"
    assert crew.read(job, "out/product.txt") == b"12\n"
    assert crew.objects(job).store == crew.store
    with pytest.raises(ApiError) as raised:
        crew.logs(424242)
    assert raised.value.code == "not_found"


def test_down_stops_the_daemon(project: Path) -> None:
    crew = Crew(project)
    pid = crew.pid
    crew.down()
    assert not Path(f"/proc/{pid}").exists() or open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z"
    # A new client starts it again.
    again = Crew(project)
    try:
        assert again.pid != pid
    finally:
        again.down()


def test_fetch_through_crew_fetch(crew: Crew, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As for a store this client cannot read itself (S3): `crew fetch`.
    import crew_client.client

    monkeypatch.setattr(crew_client.client, "_file_store_root", lambda url: None)
    job = crew.send("mkdir -p d && echo one > d/a.txt && echo two > b.txt", outputs=["d/a.txt", "b.txt"])
    crew.result(job, timeout=30)
    fetched = crew.fetch(job, tmp_path / "got")
    assert sorted(p.relative_to(tmp_path / "got").as_posix() for p in fetched) == ["b.txt", "d/a.txt"]
    assert (tmp_path / "got" / "d" / "a.txt").read_text() == "one\n"
    assert crew.read(job, "b.txt") == b"two\n"


def test_result_times_out_and_knows_unknown_jobs(crew: Crew) -> None:
    job = crew.send(["sleep", "30"])
    with pytest.raises(TimeoutError):
        crew.result(job, timeout=0.3)
    with pytest.raises(KeyError):
        crew.result(987654)
    crew.cancel(job)
    # It ends cancelled:
    with pytest.raises(JobFailed):
        crew.result(job, timeout="30s")
