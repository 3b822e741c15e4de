"""HTTP/1.1 + JSON over the daemon's Unix socket, with ``http.client``.

One connection per request: a Unix socket connects in microseconds, and a
fresh connection is safe to use from any thread (the executor's receiver
thread and the caller's thread share one client) and never replays a
request on a connection the daemon closed meanwhile (a ``POST /v1/jobs``
sent twice would send the jobs twice).

``GET /v1/events`` is the exception: a server-sent event stream held open
on its own connection (:class:`SseStream`), its chunked body decoded by
``http.client`` and read a line at a time.

Another transport (the TCP listener with its bearer token, when the daemon
has one) fits behind :class:`Transport` without touching the client.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from .errors import ApiError, DaemonError

__all__ = ["Transport", "UnixTransport", "SseStream", "StreamEnded"]


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

    def text(self, path: str, timeout: Optional[float] = 60.0) -> str:
        """The body of ``GET path`` as text (not JSON: ``/metrics``)."""
        conn = self._connection(timeout)
        try:
            try:
                conn.request("GET", path, headers={**self._headers(), "Accept": "*/*"})
                response = conn.getresponse()
                raw = response.read()
            except OSError as e:
                raise DaemonError(f"cannot talk to the crew daemon ({self}): {e}") from e
            if response.status != 200:
                _decode(response.status, raw)
            return raw.decode("utf-8", "replace")
        finally:
            conn.close()

    def subscribe(self, path: str = "/v1/events") -> "SseStream":
        """Opens the event stream ``GET path``; returns once subscribed (``: subscribed`` read).

        Every event after that moment reaches the stream.
        """
        conn = self._connection(None)
        try:
            try:
                conn.request("GET", path, headers={**self._headers(), "Accept": "text/event-stream"})
                sock = conn.sock
                response = conn.getresponse()
            except OSError as e:
                raise DaemonError(f"cannot talk to the crew daemon ({self}): {e}") from e
            if response.status != 200:
                _decode(response.status, response.read())
            stream = SseStream(conn, response, sock, str(self))
            stream._await_subscribed()
            return stream
        except BaseException:
            conn.close()
            raise

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


class StreamEnded(DaemonError):
    """The daemon closed an event stream (it stopped, or is stopping)."""


class SseStream:
    """One open ``text/event-stream`` answer, read an event at a time.

    ``http.client`` undoes the chunked transfer encoding; this parses the
    server-sent events format on top: ``event:`` and ``data:`` fields up to
    a blank line make one event; comment lines (``: keepalive``) and other
    fields are skipped. :meth:`next` returns ``(type, data)`` with ``data``
    the decoded JSON object. One reader at a time; :meth:`close` may be
    called from any thread (it wakes a blocked reader, which then sees the
    stream ended).
    """

    def __init__(
        self,
        conn: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
        sock: Optional[socket.socket],
        where: str,
    ) -> None:
        self._conn = conn
        self._response = response
        self._where = where
        self._sock = sock
        self._closed = False
        self._lock = threading.Lock()

    def _readline(self, timeout: Optional[float]) -> Optional[bytes]:
        """One line (``b""`` at the end), or None when ``timeout`` passed (the stream is then closed)."""
        if self._closed:
            return b""
        if self._sock is not None:
            try:
                self._sock.settimeout(timeout)
            except OSError:
                return b""
        try:
            return self._response.readline(1 << 24)
        except socket.timeout:
            # A timed-out socket file cannot be read again: the stream is done.
            self.close()
            return None
        except (http.client.HTTPException, OSError, ValueError, AttributeError):
            return b""

    def _await_subscribed(self) -> None:
        line = self._readline(60.0)
        if not line or not line.startswith(b":"):
            raise DaemonError(f"the crew daemon ({self._where}) did not open its event stream: {line!r}")

    def next(self, timeout: Optional[float] = None) -> Optional[Tuple[str, Dict[str, Any]]]:
        """The next event as ``(type, data)``; None when ``timeout`` seconds passed first
        (the stream is then closed: open another to go on).

        Raises :class:`StreamEnded` when the daemon ended the stream.
        """
        kind = ""
        data: List[bytes] = []
        while True:
            line = self._readline(timeout)
            if line is None:
                return None
            if not line:
                self.close()
                raise StreamEnded(f"the crew daemon ({self._where}) closed its event stream")
            line = line.rstrip(b"\r\n")
            if not line:
                if data or kind:
                    text = b"\n".join(data).decode("utf-8", "replace")
                    try:
                        obj = json.loads(text) if text else {}
                    except ValueError:
                        obj = {"data": text}
                    if not isinstance(obj, dict):
                        obj = {"data": obj}
                    kind = kind or str(obj.get("type", "message"))
                    return kind, obj
                continue
            if line.startswith(b":"):
                continue  # a comment: `: keepalive`
            field, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if field == b"event":
                kind = value.decode("utf-8", "replace")
            elif field == b"data":
                data.append(value)

    def close(self) -> None:
        """Ends the stream (also from another thread, waking its reader)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            self._response.close()
        finally:
            self._conn.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "SseStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
