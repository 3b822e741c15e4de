"""The daemon's answers as typed values.

Each type mirrors one JSON object of docs/api.md and README.md ("Output
records"). Fields may be added to those objects within a format version, so
every parser here reads the fields it knows, ignores the others, and keeps the
whole object in ``raw`` for what it does not know yet.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

__all__ = [
    "Stream",
    "StoredObject",
    "Output",
    "Slot",
    "JobCounts",
    "Status",
    "Cancelled",
    "Logs",
    "JobObjects",
]

#: The statuses a job can end in (README, "Output records").
STATUSES = (
    "succeeded",
    "failed",
    "timed_out",
    "cpu_limit",
    "memory_limit",
    "crashed",
    "cancelled",
    "launch_failed",
)


def _time(value: Optional[str]) -> Optional[_dt.datetime]:
    """An RFC 3339 UTC timestamp (``2026-12-05T12:25:11.902596Z``) or None."""
    if value is None:
        return None
    text = value[:-1] + "+00:00" if value.endswith("Z") else value
    # Python before 3.11 takes at most 6 fractional digits.
    head, dot, rest = text.partition(".")
    if dot:
        digits = rest[: len(rest) - len(rest.lstrip("0123456789"))]
        text = head + "." + digits[:6].ljust(6, "0") + rest[len(digits) :]
    return _dt.datetime.fromisoformat(text)


@dataclass(frozen=True)
class Stream:
    """A job's stdout or stderr as the record holds it: the first 64 KiB."""

    text: str
    bytes: int
    truncated: bool
    #: The store key of the whole stream when ``truncated``.
    key: Optional[str] = None

    @classmethod
    def from_json(cls, obj: Optional[Mapping[str, Any]]) -> "Stream":
        obj = obj or {}
        return cls(
            text=obj.get("text", ""),
            bytes=int(obj.get("bytes", 0)),
            truncated=bool(obj.get("truncated", False)),
            key=obj.get("key"),
        )


@dataclass(frozen=True)
class StoredObject:
    """One output file a job uploaded to the store."""

    #: Relative path in the job's working folder.
    name: str
    #: Store key.
    key: str
    size: int
    sha256: str

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "StoredObject":
        return cls(name=obj["name"], key=obj["key"], size=int(obj["size"]), sha256=obj["sha256"])


@dataclass(frozen=True)
class Output:
    """The output record of a job: every job ends in exactly one."""

    id: int
    name: Optional[str]
    #: One of :data:`STATUSES`.
    status: str
    exit_code: Optional[int]
    signal: Optional[int]
    error: Optional[str]
    stdout: Stream
    stderr: Stream
    started: Optional[_dt.datetime]
    finished: Optional[_dt.datetime]
    wall_seconds: Optional[float]
    cpu_seconds: Optional[float]
    peak_rss_bytes: Optional[int]
    slot: Optional[str]
    #: The worker class of the last attempt (``class`` in JSON).
    worker_class: Optional[str]
    attempt: int
    seed: Optional[int]
    tags: List[str]
    objects: List[StoredObject]
    cpu_limit_seconds: Optional[float] = None
    memory_limit_bytes: Optional[int] = None
    #: Format version of the record.
    v: int = 1
    #: The record as received, with fields this client does not know.
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """Whether the job succeeded."""
        return self.status == "succeeded"

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "Output":
        return cls(
            v=int(obj.get("v", 1)),
            id=int(obj["id"]),
            name=obj.get("name"),
            status=obj["status"],
            exit_code=obj.get("exit_code"),
            signal=obj.get("signal"),
            error=obj.get("error"),
            stdout=Stream.from_json(obj.get("stdout")),
            stderr=Stream.from_json(obj.get("stderr")),
            started=_time(obj.get("started")),
            finished=_time(obj.get("finished")),
            wall_seconds=obj.get("wall_seconds"),
            cpu_seconds=obj.get("cpu_seconds"),
            peak_rss_bytes=obj.get("peak_rss_bytes"),
            slot=obj.get("slot"),
            worker_class=obj.get("class"),
            attempt=int(obj.get("attempt", 0)),
            seed=obj.get("seed"),
            tags=list(obj.get("tags") or []),
            objects=[StoredObject.from_json(o) for o in obj.get("objects") or []],
            cpu_limit_seconds=obj.get("cpu_limit_seconds"),
            memory_limit_bytes=obj.get("memory_limit_bytes"),
            raw=dict(obj),
        )


@dataclass(frozen=True)
class Slot:
    """One row of ``crew status``: a named place for one worker."""

    name: str
    worker_class: str
    tags: List[str]
    #: ``down``, ``launching``, ``idle``, ``busy``, ``stopping``, ``broken`` or ``resuming``.
    state: str
    handle: Optional[str]
    assigned: int
    jobs_done: int
    idle_seconds: Optional[float]
    last_reason: Optional[str]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "Slot":
        return cls(
            name=obj["name"],
            worker_class=obj.get("class", ""),
            tags=list(obj.get("tags") or []),
            state=obj.get("state", ""),
            handle=obj.get("handle"),
            assigned=int(obj.get("assigned", 0)),
            jobs_done=int(obj.get("jobs_done", 0)),
            idle_seconds=obj.get("idle_seconds"),
            last_reason=obj.get("last_reason"),
            raw=dict(obj),
        )


@dataclass(frozen=True)
class JobCounts:
    """Jobs queued, running, and finished but not yet received (``ready``)."""

    queued: int
    running: int
    ready: int

    @property
    def unfinished(self) -> int:
        return self.queued + self.running


@dataclass(frozen=True)
class Status:
    """The answer of ``GET /v1/status``."""

    pid: int
    dir: str
    slots: List[Slot]
    jobs: JobCounts
    #: Where workers connect: ``listen``, ``advertise``, ``tls``, ``tls_sha256``.
    workers: Dict[str, Any]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "Status":
        jobs = obj.get("jobs") or {}
        return cls(
            pid=int(obj.get("pid", 0)),
            dir=obj.get("dir", ""),
            slots=[Slot.from_json(s) for s in obj.get("slots") or []],
            jobs=JobCounts(
                queued=int(jobs.get("queued", 0)),
                running=int(jobs.get("running", 0)),
                ready=int(jobs.get("ready", 0)),
            ),
            workers=dict(obj.get("workers") or {}),
            raw=dict(obj),
        )


@dataclass(frozen=True)
class Cancelled:
    """The answer of a cancel: the ids cancelled, and those unknown or already finished."""

    cancelled: List[int]
    unknown: List[int]


@dataclass(frozen=True)
class Logs:
    """A finished job's whole stdout and stderr."""

    id: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class JobObjects:
    """The outputs a finished job uploaded, and the store that holds them."""

    id: int
    name: Optional[str]
    status: str
    attempt: int
    #: The store's URL (``file:///abs/path``, ``s3://bucket/prefix``).
    store: str
    objects: List[StoredObject]

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "JobObjects":
        return cls(
            id=int(obj["id"]),
            name=obj.get("name"),
            status=obj.get("status", ""),
            attempt=int(obj.get("attempt", 0)),
            store=obj["store"],
            objects=[StoredObject.from_json(o) for o in obj.get("objects") or []],
        )
