"""`CrewExecutor` against the real daemon: functions and commands on local workers."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crew_client import Crew, CrewExecutor, JobFailed, RemoteTraceback
from funcs import divide, nap, square


def test_map_over_100_items(crew: Crew) -> None:
    with CrewExecutor(crew) as executor:
        assert list(executor.map(square, range(100))) == [x * x for x in range(100)]


def test_submit_with_kwargs_and_as_completed(crew: Crew) -> None:
    with CrewExecutor(crew) as executor:
        futures = [executor.submit(divide, 10, b=b) for b in (1, 2, 5)]
        done = {f.result() for f in concurrent.futures.as_completed(futures, timeout=60)}
    assert done == {10.0, 5.0, 2.0}


def test_a_failing_function_raises_its_exception(crew: Crew) -> None:
    with CrewExecutor(crew) as executor:
        future = executor.submit(divide, 1, 0)
        with pytest.raises(ZeroDivisionError) as raised:
            future.result(timeout=60)
    cause = raised.value.__cause__
    assert isinstance(cause, RemoteTraceback) and "ZeroDivisionError" in cause.tb


def test_a_failing_command_carries_its_record(crew: Crew) -> None:
    with CrewExecutor(crew) as executor:
        ok = executor.submit_command(["echo", "fine"])
        bad = executor.submit_command(["sh", "-c", "exit 7"])
        assert ok.result(timeout=60).stdout.text == "fine\n"
        with pytest.raises(JobFailed) as raised:
            bad.result(timeout=60)
    assert raised.value.output.exit_code == 7 and raised.value.output.status == "failed"


def test_cancel_a_future_cancels_its_job(crew: Crew) -> None:
    executor = CrewExecutor(crew)
    future = executor.submit_command(["sleep", "60"])
    assert future.cancel()
    start = time.monotonic()
    executor.shutdown(wait=True)
    assert time.monotonic() - start < 30
    assert future.cancelled()
    assert crew.status().jobs.running == 0


def test_shutdown_refuses_new_work(crew: Crew) -> None:
    executor = CrewExecutor(crew)
    executor.shutdown()
    with pytest.raises(RuntimeError):
        executor.submit(square, 2)


def test_other_clients_keep_their_outputs(crew: Crew) -> None:
    mine = crew.send(["echo", "not the executor's"])
    with CrewExecutor(crew) as executor:
        assert list(executor.map(square, [2, 3])) == [4, 9]
    (output,) = crew.receive(wait=True, timeout=30)
    assert output.id == mine and output.stdout.text == "not the executor's\n"


def test_map_timeout_raises_and_cancels_the_rest(crew: Crew) -> None:
    with CrewExecutor(crew) as executor:
        results = executor.map(nap, [30.0] * 3, timeout=0.5)
        with pytest.raises(concurrent.futures.TimeoutError):
            next(results)
    # Leaving the block waited for every job: all ended, cancelled.
    status = crew.status()
    assert status.jobs.running == 0 and status.jobs.queued == 0


def test_slots_recruited_by_the_executor_are_dismissed_at_shutdown(crew: Crew) -> None:
    with CrewExecutor(crew, workers=2, tags=["exec"]) as executor:
        assert len(executor.slots) == 2
        assert len(crew.status().slots) == 6
        assert executor.submit(square, 5).result(timeout=60) == 25
        assert executor.submit_command(["true"]).result(timeout=60).tags == ["exec"]
    assert sorted(s.name for s in crew.status().slots) == sorted(f"local-{i}" for i in range(1, 5))


def test_a_function_of_the_main_script(crew: Crew, tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(
        "import sys\n"
        "from crew_client import Crew, CrewExecutor\n"
        "def triple(x):\n"
        "    return 3 * x\n"
        "if __name__ == '__main__':\n"
        "    with CrewExecutor(Crew(sys.argv[1])) as executor:\n"
        "        print(list(executor.map(triple, range(5))))\n"
    )
    done = subprocess.run(
        [sys.executable, str(script), str(crew.dir)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[0, 3, 6, 9, 12]\n"
