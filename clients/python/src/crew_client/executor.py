"""`CrewExecutor`: a ``concurrent.futures.Executor`` whose calls run on crew workers.

``submit(fn, *args, **kwargs)`` pickles the call into a file that goes to the
job as an input (the daemon stages it in the store; identical calls share one
object), and sends a job that runs the worker's Python on it
(:data:`RUNNER`): it unpickles the call, runs it, and pickles the outcome —
the value, or the exception with its traceback — into ``result.pkl``, a
declared output, uploaded to the store. The client reads it back from there
when the job's output arrives. ``submit_command([...])`` sends a command and
completes with its :class:`~crew_client.Output`.

Futures complete from one background thread that long-polls
``POST /v1/receive`` with the ids of this executor's unfinished jobs (so
outputs of other clients of the same daemon are left alone); it sleeps
while nothing is pending.

As with ``ProcessPoolExecutor`` under the ``spawn`` start method, a function
must be picklable by reference: defined at the top level of a module the
worker's Python can import. The client's ``sys.path`` travels with the call,
so modules importable here are importable on a worker of this machine; a
function of the main script is found by running that script as
``__mp_main__`` on the worker (keep its work under
``if __name__ == "__main__":``).
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
import threading
import time
from concurrent.futures import Executor, Future
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

from .client import Crew, Job
from .errors import CrewError, JobFailed
from .records import Output

__all__ = ["CrewExecutor", "CrewFuture", "RemoteTraceback", "RUNNER"]

T = TypeVar("T")

#: One call: the function, its positional and its keyword arguments.
_Call = Tuple[Callable[..., Any], Tuple[Any, ...], Dict[str, Any]]

#: Calls sent per request by :meth:`CrewExecutor.map`.
_BATCH = 500

#: What a worker runs (``python -c RUNNER``) for one submitted call; it reads
#: ``payload.pkl`` and writes ``result.pkl`` in the job's folder, and exits 1
#: when the call raised.
RUNNER = r"""
import pickle, sys, traceback
def outcome():
    try:
        with open("payload.pkl", "rb") as f:
            head = pickle.load(f)
            sys.path.extend(p for p in head["sys_path"] if p not in sys.path)
            if head.get("main"):
                import runpy, types
                main = types.ModuleType("__mp_main__")
                main.__file__ = head["main"]
                sys.modules["__mp_main__"] = main
                main.__dict__.update(runpy.run_path(head["main"], run_name="__mp_main__"))
                sys.modules["__main__"] = main
            fn, args, kwargs = pickle.load(f)
        return ("ok", fn(*args, **kwargs), None)
    except BaseException as e:
        return ("err", e, traceback.format_exc())
kind, value, tb = outcome()
try:
    data = pickle.dumps((kind, value, tb))
except BaseException as e:
    kind = "err"
    text = "the %s cannot be pickled: %r" % ("result" if tb is None else "exception %r" % (value,), e)
    data = pickle.dumps(("err", RuntimeError(text), tb or traceback.format_exc()))
with open("result.pkl", "wb") as f:
    f.write(data)
sys.exit(0 if kind == "ok" else 1)
"""


class RemoteTraceback(Exception):
    """The traceback of an exception raised on a worker (its ``__cause__``)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class CrewFuture(Future):  # type: ignore[type-arg]
    """A future of one crew job; cancelling it cancels the job."""

    def __init__(self, executor: "CrewExecutor") -> None:
        super().__init__()
        self._executor = executor
        #: The job's id, once sent.
        self.job_id: Optional[int] = None

    def cancel(self) -> bool:
        cancelled = super().cancel()
        if cancelled and self.job_id is not None:
            self._executor._cancel_job(self.job_id)
        return cancelled


class CrewExecutor(Executor):
    """Runs Python calls and commands as crew jobs.

    ``crew``: a :class:`Crew` (else one is made for ``dir``). ``workers``:
    slots to recruit now, of ``class_`` with ``tags`` (else the daemon's
    slots are used). ``python``: the interpreter on the workers (default:
    this one when every slot is ``local``, else ``python3``). ``job_fields``
    are job-line keys every job gets (``tags``, ``timeout``, ``retries``,
    ``env``, ``cpu``, ``memory``, ...).
    """

    def __init__(
        self,
        crew: Optional[Crew] = None,
        *,
        dir: Optional[str] = None,
        workers: Optional[int] = None,
        class_: str = "local",
        tags: Optional[Sequence[str]] = None,
        python: Optional[str] = None,
        poll: float = 1.0,
        **job_fields: Any,
    ) -> None:
        self.crew = crew if crew is not None else Crew(dir)
        #: The slots this executor recruited (dismissed at shutdown).
        self.slots: List[str] = []
        if workers is not None:
            self.slots = self.crew.recruit(workers, class_, tags=tags)
        if tags is not None:
            job_fields.setdefault("tags", list(tags))
        if python is None:
            slots = self.crew.status().slots
            local = bool(slots) and all(s.worker_class == "local" for s in slots)
            python = sys.executable if local and sys.executable else "python3"
        self.python = python
        self._fields = job_fields
        self._poll = poll
        self._lock = threading.Condition()
        self._futures: Dict[int, Tuple[CrewFuture, str]] = {}
        self._shutdown = False
        self._broken: Optional[BaseException] = None
        self._payloads = tempfile.mkdtemp(prefix="executor-", dir=str(self.crew.dir))
        self._thread = threading.Thread(target=self._receive_loop, name="crew-executor-receiver", daemon=True)
        self._thread.start()

    # -- submitting -------------------------------------------------------

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> "Future[T]":
        """Runs ``fn(*args, **kwargs)`` on a worker; its future."""
        return self._submit_calls([(fn, args, kwargs)])[0]

    def map(
        self, fn: Callable[..., T], *iterables: Iterable[Any], timeout: Optional[float] = None, chunksize: int = 1
    ) -> Iterator[T]:
        """``map(fn, *iterables)`` on workers: the results in order.

        The calls are sent in batches (``chunksize`` is ignored: each call is
        a job), so a long map costs a few requests, not one per item. A
        ``timeout`` passing raises ``TimeoutError`` from the iterator and
        cancels the calls not yet done, as ``Executor.map`` does.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        calls: List[_Call] = [(fn, args, {}) for args in zip(*iterables)]
        futures: List["Future[T]"] = []
        for start in range(0, len(calls), _BATCH):
            futures.extend(self._submit_calls(calls[start : start + _BATCH]))

        def results() -> Iterator[T]:
            try:
                futures.reverse()
                while futures:
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    yield futures[-1].result(left)
                    futures.pop()
            finally:
                for future in futures:
                    future.cancel()

        return results()

    def submit_command(self, command: Job, **fields: Any) -> "Future[Output]":
        """Runs a command (or shell line, or job-line dict) on a worker; a future of its record.

        The future's exception is :class:`JobFailed` (with the record) when
        the job did not succeed.
        """
        return self._send([command], "command", fields)[0]

    def _submit_calls(self, calls: Sequence[_Call]) -> List["Future[Any]"]:
        """Sends calls as jobs, in one request; their futures."""
        self._check_open()
        head: Dict[str, Any] = {"sys_path": [p for p in sys.path if p]}
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        paths: List[str] = []
        try:
            jobs = []
            for fn, args, kwargs in calls:
                fd, path = tempfile.mkstemp(suffix=".pkl", dir=self._payloads)
                paths.append(path)
                with os.fdopen(fd, "wb") as f:
                    call_head = head
                    if getattr(fn, "__module__", None) == "__main__" and main_file:
                        call_head = {**head, "main": os.path.abspath(main_file)}
                    pickle.dump(call_head, f)
                    pickle.dump((fn, args, kwargs), f)
                jobs.append(
                    {
                        "command": [self.python, "-c", RUNNER],
                        "inputs": [{"path": path, "name": "payload.pkl"}],
                        "outputs": ["result.pkl"],
                    }
                )
            return self._send(jobs, "call", {})
        finally:
            # Staged in the store before the daemon answered.
            for path in paths:
                os.unlink(path)

    def _send(self, jobs: Sequence[Job], kind: str, fields: Dict[str, Any]) -> List["Future[Any]"]:
        futures = [CrewFuture(self) for _ in jobs]
        with self._lock:
            self._check_open()
            # Under the lock, so that the receiver knows the ids before it
            # could receive their outputs.
            ids = self.crew.send(jobs=jobs, **{**self._fields, **fields})
            for future, job_id in zip(futures, ids):
                future.job_id = job_id
                self._futures[job_id] = (future, kind)
            self._lock.notify_all()
        return list(futures)

    def _check_open(self) -> None:
        if self._shutdown:
            raise RuntimeError("cannot submit after shutdown")
        if self._broken is not None:
            raise CrewError(f"the executor is broken: {self._broken}") from self._broken

    def _cancel_job(self, job_id: int) -> None:
        try:
            self.crew.cancel(job_id)
        except CrewError:
            pass

    # -- completing -------------------------------------------------------

    def _receive_loop(self) -> None:
        while True:
            with self._lock:
                while not self._futures and not self._shutdown:
                    self._lock.wait()
                if not self._futures:
                    break
                ids = list(self._futures)
            try:
                outputs, _ = self.crew._receive(wait=True, ids=ids, timeout=self._poll)
            except BaseException as e:  # the daemon is gone: fail what waits
                with self._lock:
                    self._broken = e
                    waiting = list(self._futures.values())
                    self._futures.clear()
                for future, _ in waiting:
                    if not future.done():
                        future.set_exception(e)
                return
            for output in outputs:
                with self._lock:
                    entry = self._futures.pop(output.id, None)
                if entry is not None:
                    self._complete(entry[0], entry[1], output)
        # Shut down and every job received: give back the slots recruited.
        for slot in self.slots:
            try:
                self.crew.dismiss(slot=slot)
            except CrewError:
                pass

    def _complete(self, future: CrewFuture, kind: str, output: Output) -> None:
        if future.done():  # cancelled here
            return
        try:
            if kind == "command":
                if output.ok:
                    future.set_result(output)
                else:
                    future.set_exception(JobFailed(output))
                return
            if not any(o.name == "result.pkl" for o in output.objects):
                future.set_exception(JobFailed(output))
                return
            outcome, value, tb = pickle.loads(self.crew.read(output, "result.pkl"))
            if outcome == "ok":
                future.set_result(value)
            else:
                if isinstance(value, BaseException) and tb:
                    value.__cause__ = RemoteTraceback(tb)
                future.set_exception(value)
        except BaseException as e:  # an unreadable result
            if not future.done():
                future.set_exception(e)

    # -- lifecycle ----------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submissions; ``cancel_futures`` cancels the unfinished jobs; ``wait`` waits for them."""
        with self._lock:
            self._shutdown = True
            pending: List[CrewFuture] = [f for f, _ in self._futures.values()]
            self._lock.notify_all()
        if cancel_futures:
            for future in pending:
                future.cancel()
        if wait:
            self._thread.join()
            try:
                os.rmdir(self._payloads)
            except OSError:
                pass
