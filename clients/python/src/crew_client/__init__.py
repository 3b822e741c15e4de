"""Python client of the crew daemon (docs/api.md).

- :class:`Crew` — one project's daemon: ``recruit``, ``send``, ``receive``,
  ``wait``, ``status``, ``cancel``, ``logs``, ``fetch``, ``down``, the words of
  the ``crew`` CLI.
- :class:`CrewExecutor` — a ``concurrent.futures.Executor`` that runs Python
  calls and commands on crew workers.
- Output records and the other answers as dataclasses (:mod:`crew_client.records`);
  errors as exceptions (:mod:`crew_client.errors`).

Standard library only.
"""

from .client import Crew, Duration, Job, crew_binary
from .errors import ApiError, CrewError, DaemonError, JobFailed
from .executor import CrewExecutor, CrewFuture, RemoteTraceback
from .records import (
    Cancelled,
    JobCounts,
    JobObjects,
    Logs,
    Output,
    Slot,
    Status,
    StoredObject,
    Stream,
)

__version__ = "0.1.0"

__all__ = [
    "ApiError",
    "Cancelled",
    "Crew",
    "CrewError",
    "CrewExecutor",
    "CrewFuture",
    "DaemonError",
    "Duration",
    "Job",
    "JobCounts",
    "JobFailed",
    "JobObjects",
    "Logs",
    "Output",
    "RemoteTraceback",
    "Slot",
    "Status",
    "StoredObject",
    "Stream",
    "crew_binary",
]
