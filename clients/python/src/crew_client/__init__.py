"""Python client of the crew daemon (docs/api.md).

- :class:`Crew` — one project's daemon: ``recruit``, ``send``, ``receive``,
  ``wait``, ``status``, ``cancel``, ``logs``, ``fetch``, ``down``, the words of
  the ``crew`` CLI; ``job`` and ``jobs`` (where jobs are, without receiving
  them), ``events`` (the daemon's live event stream) and ``metrics``.
- :class:`CrewExecutor` — a ``concurrent.futures.Executor`` that runs Python
  calls and commands on crew workers.
- Output records and the other answers as dataclasses (:mod:`crew_client.records`);
  errors as exceptions (:mod:`crew_client.errors`).

Standard library only.
"""

from ._http import StreamEnded
from .client import Crew, Duration, EventStream, Job, crew_binary
from .errors import ApiError, CrewError, DaemonError, JobFailed
from .executor import CrewExecutor, CrewFuture, RemoteTraceback
from .records import (
    JOB_STATES,
    Cancelled,
    Event,
    JobAssigned,
    JobCounts,
    JobEnded,
    JobInfo,
    JobObjects,
    JobsSent,
    Lagged,
    Logs,
    OtherEvent,
    Output,
    Slot,
    SlotCrashed,
    SlotDown,
    SlotUp,
    Status,
    StoredObject,
    Stream,
)

__version__ = "0.1.0"

__all__ = [
    "JOB_STATES",
    "ApiError",
    "Cancelled",
    "Crew",
    "CrewError",
    "CrewExecutor",
    "CrewFuture",
    "DaemonError",
    "Duration",
    "Event",
    "EventStream",
    "Job",
    "JobAssigned",
    "JobEnded",
    "JobInfo",
    "JobsSent",
    "Lagged",
    "OtherEvent",
    "JobCounts",
    "JobFailed",
    "JobObjects",
    "Logs",
    "Output",
    "RemoteTraceback",
    "Slot",
    "SlotCrashed",
    "SlotDown",
    "SlotUp",
    "Status",
    "StoredObject",
    "Stream",
    "StreamEnded",
    "crew_binary",
]
