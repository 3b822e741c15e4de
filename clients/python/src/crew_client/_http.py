"""HTTP/1.1 + JSON over the daemon's Unix socket, with ``http.client``.

One connection per request: a Unix socket connects in microseconds, and a
fresh connection is safe to use from any thread (the executor's receiver
thread and the caller's thread share one client) and never replays a
request on a connection the daemon closed meanwhile (a ``POST /v1/jobs``
sent twice would send the jobs twice).

Another transport (the TCP listener with its bearer token, when the daemon
has one) fits behind :class:`Transport` without touching the client.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any, Dict, Iterator, Mapping, Optional

from .errors import ApiError, DaemonError

__all__ = ["Transport", "UnixTransport"]


class _UnixConnection(http.client.HTTPConnection):
    """An ``HTTPConnection`` whose socket is a Unix socket."""

    def __init__(self, path: str, timeout: Optional[float]) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Transport:
    """Sends one request and decodes the JSON answer; raises :class:`ApiError`."""

    def _connection(self, timeout: Optional[float]) -> http.client.HTTPConnection:
        raise NotImplementedError

    def _headers(self) -> Dict[str, str]:
        return {"Accept": "application/json"}

    def request(
        self,
        method: str,
        path: str,
        body: Optional[Mapping[str, Any]] = None,
        timeout: Optional[float] = None,
    ) -> Any:
        """``method path`` with ``body`` as JSON; the decoded answer."""
        conn = self._connection(timeout)
        try:
            headers = self._headers()
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            try:
                conn.request(method, path, body=data, headers=headers)
                response = conn.getresponse()
                raw = response.read()
            except OSError as e:
                raise DaemonError(f"cannot talk to the crew daemon ({self}): {e}") from e
            return _decode(response.status, raw)
        finally:
            conn.close()

    def stream(self, path: str, chunk: int = 1 << 16) -> Iterator[bytes]:
        """The raw body of ``GET path``, in pieces as they arrive."""
        conn = self._connection(None)
        try:
            try:
                conn.request("GET", path, headers=self._headers())
                response = conn.getresponse()
            except OSError as e:
                raise DaemonError(f"cannot talk to the crew daemon ({self}): {e}") from e
            if response.status != 200:
                _decode(response.status, response.read())
            while True:
                piece = response.read(chunk)
                if not piece:
                    return
                yield piece
        finally:
            conn.close()


class UnixTransport(Transport):
    """The daemon's Unix socket (``DIR/crew.sock``)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _connection(self, timeout: Optional[float]) -> http.client.HTTPConnection:
        return _UnixConnection(self.path, timeout)

    def __str__(self) -> str:
        return f"socket {self.path}"


def _decode(status: int, raw: bytes) -> Any:
    """The JSON of a 200 answer, or the :class:`ApiError` of another."""
    try:
        obj = json.loads(raw) if raw else {}
    except ValueError:
        obj = None
    if status == 200 and obj is not None:
        return obj
    error = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(error, dict):
        raise ApiError(status, str(error.get("code", "unknown")), str(error.get("message", "")))
    text = raw[:500].decode("utf-8", "replace")
    raise ApiError(status, "bad_response", f"the daemon answered {status} with {text!r}")
