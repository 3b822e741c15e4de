"""The exceptions of the client.

- :class:`ApiError`: the daemon refused a request; ``code`` is the stable
  code of docs/api.md (``unknown_class``, ``invalid_job``, ...), ``status``
  the HTTP status, ``message`` the daemon's words (which say how to fix it).
- :class:`JobFailed`: a job whose result was asked for did not succeed;
  ``output`` is its whole record.
- :class:`DaemonError`: the daemon could not be started or reached, or the
  ``crew`` binary failed.
"""

from __future__ import annotations

from typing import Optional

from .records import Output

__all__ = ["CrewError", "ApiError", "JobFailed", "DaemonError"]


class CrewError(Exception):
    """Base class of every error of this client."""


class ApiError(CrewError):
    """The daemon answered a request with an error (docs/api.md, "Errors")."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code} ({status}): {message}")
        self.status = status
        self.code = code
        self.message = message


class DaemonError(CrewError):
    """The daemon could not be started or reached, or ``crew`` failed."""


class JobFailed(CrewError):
    """A job did not succeed; ``output`` is its record."""

    def __init__(self, output: Output, message: Optional[str] = None) -> None:
        why = output.error or output.status
        super().__init__(message or f"job {output.id} {output.status}: {why}")
        self.output = output
