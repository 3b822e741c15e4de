"""`Crew`: one project's daemon, with the CLI's verbs as methods.

The client finds the daemon of a project folder (``DIR``, else ``$CREW_DIR``,
else ``./.crew``) or starts it with ``crew --dir DIR up --json``, then speaks
HTTP to ``DIR/crew.sock`` (docs/api.md). ``crew`` is ``$CREW_BIN``, else
``crew`` on ``PATH``; it is also run for what the API leaves to the CLI:
``crew fetch`` from stores other than a local folder.

Waiting (``wait``) polls ``GET /v1/status`` every 100 ms, as ``crew wait``
does; receiving with ``wait=True`` is a long poll the daemon answers when an
output is ready.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union, overload

from ._http import Transport, UnixTransport
from .errors import ApiError, CrewError, DaemonError, JobFailed
from .records import Cancelled, JobObjects, Logs, Output, Status, StoredObject

__all__ = ["Crew", "Job", "Duration", "crew_binary"]

#: A duration: seconds, a ``timedelta``, or a string such as ``"1m30s"``.
Duration = Union[int, float, str, _dt.timedelta]
#: One job: a command (list of strings, run directly), a shell line (str),
#: or a job-line object (dict with ``command``, ``shell`` or ``builtin``).
Job = Union[Sequence[str], str, Mapping[str, Any]]


def crew_binary() -> str:
    """The ``crew`` program: ``$CREW_BIN``, else ``crew`` on ``PATH``."""
    configured = os.environ.get("CREW_BIN")
    if configured:
        return configured
    found = shutil.which("crew")
    if found is None:
        raise DaemonError("cannot find crew: put it on PATH or set CREW_BIN to its path")
    return found


def _duration(value: Optional[Duration]) -> Any:
    """A duration as the API takes it (a string, or a number of seconds)."""
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    return value


def _absolute_input(entry: Any) -> Any:
    """An input with its path made absolute (the daemon's folder is not ours)."""
    if isinstance(entry, str):
        path, sep, name = entry.rpartition("=")
        if not sep:
            return os.path.abspath(entry)
        return f"{os.path.abspath(path)}={name}"
    if isinstance(entry, os.PathLike):
        return os.path.abspath(os.fspath(entry))
    if isinstance(entry, Mapping) and "path" in entry:
        fixed = dict(entry)
        fixed["path"] = os.path.abspath(os.fspath(entry["path"]))
        return fixed
    return entry


def _job(job: Job, defaults: Mapping[str, Any]) -> Dict[str, Any]:
    """A job-line object from ``job``, with ``defaults`` for keys it lacks."""
    if isinstance(job, str):
        obj: Dict[str, Any] = {"shell": job}
    elif isinstance(job, Mapping):
        obj = dict(job)
    else:
        obj = {"command": [os.fspath(a) for a in job]}
    for key, value in defaults.items():
        if value is not None and key not in obj:
            obj[key] = value
    for key in ("timeout", "cpu"):
        if key in obj:
            obj[key] = _duration(obj[key])
    if "inputs" in obj:
        obj["inputs"] = [_absolute_input(i) for i in obj["inputs"]]
    if "cwd" in obj and obj["cwd"] is not None:
        obj["cwd"] = os.path.abspath(os.fspath(obj["cwd"]))
    return obj


class Crew:
    """The daemon of one project folder.

    ``Crew(dir)`` starts the daemon when it is not running (``start=False``:
    only connect). ``store`` starts it on that store (refused when it already
    runs with another). The object holds no connection between calls: it is
    safe to share between threads. ``close()`` (or leaving a ``with`` block)
    leaves the daemon running; ``down()`` stops it and its workers.
    """

    def __init__(
        self,
        dir: Union[str, "os.PathLike[str]", None] = None,
        *,
        store: Optional[str] = None,
        start: bool = True,
        crew_bin: Optional[str] = None,
    ) -> None:
        if dir is None:
            dir = os.environ.get("CREW_DIR") or ".crew"
        self.dir = Path(os.path.abspath(os.fspath(dir)))
        self._crew_bin = crew_bin
        self.transport: Transport = UnixTransport(str(self.dir / "crew.sock"))
        #: Jobs sent and not yet received, as of the last :meth:`receive`.
        self.pending = 0
        if start:
            args = ["up", "--json"]
            if store is not None:
                args += ["--store", store]
            self._health: Dict[str, Any] = json.loads(self._run_crew(args))
        else:
            self._health = self.health()

    # -- the crew binary ------------------------------------------------

    @property
    def crew_bin(self) -> str:
        """The ``crew`` program this client runs."""
        if self._crew_bin is None:
            self._crew_bin = crew_binary()
        return self._crew_bin

    def _run_crew(self, args: Sequence[str]) -> str:
        """Runs ``crew --dir DIR ARGS``; its stdout, or :class:`DaemonError`."""
        command = [self.crew_bin, "--dir", str(self.dir), *args]
        try:
            done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        except OSError as e:
            raise DaemonError(f"cannot run {command[0]}: {e}") from e
        if done.returncode != 0:
            raise DaemonError(
                f"`crew {' '.join(args)}` failed (exit {done.returncode}): {done.stderr.strip()}"
            )
        return done.stdout

    # -- requests -------------------------------------------------------

    def _get(self, path: str, timeout: Optional[float] = 60.0) -> Any:
        return self.transport.request("GET", path, timeout=timeout)

    def _post(self, path: str, body: Mapping[str, Any], timeout: Optional[float] = 60.0) -> Any:
        return self.transport.request("POST", path, body, timeout=timeout)

    # -- the verbs --------------------------------------------------------

    def health(self) -> Dict[str, Any]:
        """``GET /v1/health``: pid, version, dir, store, worker addresses."""
        return dict(self._get("/v1/health"))

    @property
    def store(self) -> str:
        """The URL of the daemon's store."""
        return str(self._health["store"])

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        return int(self._health["pid"])

    def recruit(
        self,
        workers: int,
        class_: str = "local",
        *,
        tags: Optional[Sequence[str]] = None,
        idle: Optional[Duration] = None,
        wall: Optional[Duration] = None,
        tasks_max: Optional[int] = None,
        launch_timeout: Optional[Duration] = None,
        launch_max: Optional[int] = None,
        prefetch: Optional[int] = None,
        options: Optional[Mapping[str, str]] = None,
    ) -> List[str]:
        """Adds ``workers`` slots of a class; their names. Slots start when jobs need them."""
        body: Dict[str, Any] = {"class": class_, "workers": workers}
        optional = {
            "tags": list(tags) if tags is not None else None,
            "idle": _duration(idle),
            "wall": _duration(wall),
            "tasks_max": tasks_max,
            "launch_timeout": _duration(launch_timeout),
            "launch_max": launch_max,
            "prefetch": prefetch,
            "options": dict(options) if options is not None else None,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        return list(self._post("/v1/recruit", body)["slots"])

    def launch(self, *, tags: Optional[Sequence[str]] = None, workers: Optional[int] = None) -> int:
        """Starts down slots now; how many."""
        body: Dict[str, Any] = {}
        if tags is not None:
            body["tags"] = list(tags)
        if workers is not None:
            body["workers"] = workers
        return int(self._post("/v1/launch", body)["launched"])

    @overload
    def send(self, job: Job, **fields: Any) -> int: ...

    @overload
    def send(self, *, jobs: Iterable[Job], **defaults: Any) -> List[int]: ...

    def send(self, job: Optional[Job] = None, *, jobs: Optional[Iterable[Job]] = None, **fields: Any) -> Any:
        """Sends one job (its id) or, with ``jobs=``, many at once, all or nothing (their ids).

        A job is a command (``["python3", "fit.py"]``, run directly), a shell
        line (``"echo $HOME"``), or a job-line dict (README, "Job lines").
        ``fields`` are job-line keys (``name``, ``tags``, ``timeout``,
        ``inputs``, ``outputs``, ``env``, ...): for one job, set on it; for
        ``jobs=``, defaults for the jobs that lack them. Input paths are
        made absolute here.
        """
        if (job is None) == (jobs is None):
            raise TypeError("send takes one job, or jobs=[...]")
        if jobs is not None:
            objs = [_job(j, fields) for j in jobs]
            return [int(i) for i in self._post("/v1/jobs", {"jobs": objs})["ids"]] if objs else []
        assert job is not None
        return int(self._post("/v1/jobs", {"jobs": [_job(job, fields)]})["ids"][0])

    def receive(
        self,
        *,
        wait: bool = False,
        timeout: Optional[Duration] = None,
        all: bool = False,
        name: Optional[str] = None,
        ids: Optional[Iterable[int]] = None,
    ) -> List[Output]:
        """Pops finished outputs, each delivered once (``POST /v1/receive``).

        At most one, or every one ready with ``all``; with ``wait``, waits
        until there is one (with ``all``: until every job sent has finished),
        or ``timeout`` passes. ``name``: only that job's; ``ids``: only these
        jobs' (every one of them that is ready). :attr:`pending` is then the
        number of jobs sent and not yet received.
        """
        outputs, self.pending = self._receive(wait=wait, timeout=timeout, all=all, name=name, ids=ids)
        return outputs

    def _receive(
        self,
        *,
        wait: bool = False,
        timeout: Optional[Duration] = None,
        all: bool = False,
        name: Optional[str] = None,
        ids: Optional[Iterable[int]] = None,
    ) -> Tuple[List[Output], int]:
        """``POST /v1/receive``: the outputs, and the number of jobs pending."""
        body: Dict[str, Any] = {"wait": wait, "all": all}
        if timeout is not None:
            body["timeout"] = _duration(timeout)
        if name is not None:
            body["name"] = name
        if ids is not None:
            body["ids"] = [int(i) for i in ids]
        answer = self._post("/v1/receive", body, timeout=None if wait else 60.0)
        return [Output.from_json(o) for o in answer["outputs"]], int(answer.get("pending", 0))

    def result(self, job: Union[int, str], timeout: Optional[Duration] = None) -> Output:
        """Waits for one job (an id or a name) and receives its output.

        Raises :class:`JobFailed` (carrying the record) when it did not
        succeed, ``TimeoutError`` when ``timeout`` passed first and
        ``KeyError`` when no such job is waiting to be received.
        """
        deadline = None if timeout is None else time.monotonic() + _duration_seconds(timeout)
        if isinstance(job, int):
            got = self.receive(wait=True, ids=[job], timeout=timeout)
        else:
            got = self.receive(wait=True, name=job, timeout=timeout)
        if got:
            output = got[0]
            if not output.ok:
                raise JobFailed(output)
            return output
        # Empty: the timeout passed, or the daemon waits for no such job
        # (then it answers at once).
        if deadline is not None and time.monotonic() >= deadline - 0.05:
            raise TimeoutError(f"job {job!r} did not finish within {timeout}")
        raise KeyError(f"no job {job!r} is waiting to be received")

    def wait(self, *, one: bool = False, timeout: Optional[Duration] = None) -> None:
        """Blocks until every job sent has finished (``one``: until an output is ready).

        Leaves the outputs to :meth:`receive`. ``TimeoutError`` when
        ``timeout`` passes first.
        """
        deadline = None if timeout is None else time.monotonic() + _duration_seconds(timeout)
        while True:
            jobs = self.status().jobs
            if jobs.unfinished == 0 or (one and jobs.ready > 0):
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"jobs still unfinished after {timeout}")
            time.sleep(0.1)

    def status(self) -> Status:
        """The slots and the job counts (``GET /v1/status``)."""
        return Status.from_json(self._get("/v1/status"))

    def sendable(self, tags: Sequence[str] = ()) -> bool:
        """Whether some usable slot has all these tags."""
        query = urllib.parse.urlencode({"tags": ",".join(tags)})
        return bool(self._get(f"/v1/sendable?{query}")["sendable"])

    def receivable(self) -> bool:
        """Whether an output is ready."""
        return bool(self._get("/v1/receivable")["receivable"])

    def cancel(self, *ids: int) -> Cancelled:
        """Cancels jobs; each still ends in a ``cancelled`` output to receive."""
        answer = self._post("/v1/cancel", {"ids": [int(i) for i in ids]})
        return Cancelled(cancelled=list(answer["cancelled"]), unknown=list(answer["unknown"]))

    def shutdown(self, *, all: bool = False, tags: Optional[Sequence[str]] = None, slot: Optional[str] = None) -> int:
        """Stops workers (idle ones unless ``all``); their slots stay. How many."""
        body: Dict[str, Any] = {"all": all}
        if tags is not None:
            body["tags"] = list(tags)
        if slot is not None:
            body["slot"] = slot
        return int(self._post("/v1/shutdown", body)["stopped"])

    def dismiss(self, *, tags: Optional[Sequence[str]] = None, slot: Optional[str] = None) -> int:
        """Removes slots; how many."""
        body: Dict[str, Any] = {}
        if tags is not None:
            body["tags"] = list(tags)
        if slot is not None:
            body["slot"] = slot
        return int(self._post("/v1/dismiss", body)["dismissed"])

    def restart(self) -> int:
        """Relaunches stuck slots and makes broken ones usable; how many."""
        return int(self._post("/v1/restart", {})["restarted"])

    def logs(self, job: int) -> Logs:
        """A finished job's whole stdout and stderr (also after it was received)."""
        answer = self._get(f"/v1/jobs/{int(job)}/logs")
        return Logs(id=int(answer["id"]), stdout=answer["stdout"], stderr=answer["stderr"])

    def log_stream(self, job: int, stream: str = "stdout") -> Iterator[bytes]:
        """One stream of a finished job, raw bytes in pieces: logs of any size."""
        if stream not in ("stdout", "stderr"):
            raise ValueError("stream is 'stdout' or 'stderr'")
        return self.transport.stream(f"/v1/jobs/{int(job)}/logs/{stream}")

    def objects(self, job: Union[int, str]) -> JobObjects:
        """The outputs a finished job uploaded (by id, or name: the last so named)."""
        ref = urllib.parse.quote(str(job), safe="")
        return JobObjects.from_json(self._get(f"/v1/jobs/{ref}/objects"))

    def fetch(self, job: Union[int, str], to: Union[str, "os.PathLike[str]"] = ".") -> List[Path]:
        """Downloads a finished job's outputs into ``to``, checked; their paths (``[]``: none).

        From a local folder store the files are copied directly; from any
        other store (S3) by ``crew fetch``.
        """
        found = self.objects(job)
        if not found.objects:
            return []
        dest = Path(os.fspath(to))
        root = _file_store_root(found.store)
        if root is not None and all(_store_path(root, o.key).is_file() for o in found.objects):
            return [_copy_checked(root, obj, dest) for obj in found.objects]
        out = self._run_crew(["fetch", str(found.id), "--to", str(dest), "--json"])
        return [Path(os.path.abspath(json.loads(line)["path"])) for line in out.splitlines() if line.strip()]

    def read(self, job: Union[int, str, Output], name: str) -> bytes:
        """The bytes of one output file of a finished job (an id, a name or its record), checked.

        With a record no request is made when the store is a local folder:
        its ``objects`` name the keys.
        """
        if isinstance(job, Output):
            job_id, store, objects = job.id, self.store, job.objects
        else:
            found = self.objects(job)
            job_id, store, objects = found.id, found.store, found.objects
        for obj in objects:
            if obj.name != name:
                continue
            root = _file_store_root(store)
            if root is not None and _store_path(root, obj.key).is_file():
                data = _store_path(root, obj.key).read_bytes()
                _check(obj, data)
                return data
            with tempfile.TemporaryDirectory() as tmp:
                self._run_crew(["fetch", str(job_id), "--to", tmp])
                return (Path(tmp) / obj.name).read_bytes()
        raise KeyError(f"job {job_id} has no output {name!r}")

    def down(self, timeout: float = 30.0) -> None:
        """Stops every worker and the daemon, and waits until it is gone."""
        try:
            self._post("/v1/down", {})
        except (DaemonError, ApiError):
            pass
        deadline = time.monotonic() + timeout
        while _alive(self.pid):
            if time.monotonic() >= deadline:
                raise DaemonError(f"the daemon (pid {self.pid}) did not stop within {timeout} s")
            time.sleep(0.05)

    def close(self) -> None:
        """Releases the client (no connection is held); the daemon keeps running."""

    def __enter__(self) -> "Crew":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Crew(dir={str(self.dir)!r})"


def _duration_seconds(value: Duration) -> float:
    """Seconds of a duration; strings as the daemon reads them (``1m30s``, ``500ms``)."""
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, (int, float)):
        return float(value)
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    total, number, i = 0.0, "", 0
    text = value.strip()
    while i < len(text):
        c = text[i]
        if c.isdigit() or c == ".":
            number += c
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else c
        if unit not in units or not number:
            raise ValueError(f"invalid duration {value!r}")
        total += float(number) * units[unit]
        number = ""
        i += len(unit)
    if number:
        total += float(number)
    return total


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _file_store_root(url: str) -> Optional[Path]:
    """The folder of a ``file://`` store URL, or None for other stores."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme.lower() != "file" or parsed.netloc not in ("", "localhost"):
        return None
    return Path(urllib.parse.unquote(parsed.path))


# Bytes a local folder store keeps as they are in a file name; every other
# byte of a key segment is written %XX (object_store's path-part encoding,
# crew-core store.rs "Layout on disk").
_KEEP = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    b" !$&'()+,-.:;=@_"
)


def _store_path(root: Path, key: str) -> Path:
    """The file of store key ``key`` in a local folder store."""
    parts = []
    for segment in key.split("/"):
        parts.append("".join(chr(b) if b in _KEEP else f"%{b:02X}" for b in segment.encode()))
    return root.joinpath(*parts)


def _check(obj: StoredObject, data: bytes) -> None:
    if len(data) != obj.size or hashlib.sha256(data).hexdigest() != obj.sha256:
        raise CrewError(f"the stored object {obj.key} does not match its record (size or SHA-256)")


def _copy_checked(root: Path, obj: StoredObject, dest: Path) -> Path:
    """Copies one object to ``dest/name`` through a temp file, checked; its path."""
    target = dest / obj.name
    if os.path.isabs(obj.name) or ".." in Path(obj.name).parts:
        raise CrewError(f"refusing output name {obj.name!r}: not a relative path inside the folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.crew-tmp")
    digest, size = hashlib.sha256(), 0
    with open(_store_path(root, obj.key), "rb") as src, open(tmp, "wb") as out:
        while True:
            piece = src.read(1 << 20)
            if not piece:
                break
            digest.update(piece)
            size += len(piece)
            out.write(piece)
    if size != obj.size or digest.hexdigest() != obj.sha256:
        tmp.unlink()
        raise CrewError(f"the stored object {obj.key} does not match its record (size or SHA-256)")
    os.replace(tmp, target)
    return target
