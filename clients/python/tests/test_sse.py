"""The event stream's parsing against a scripted server on a Unix socket:
chunks cut mid-line, keepalives, CRLF lines, multi-line data, unknown types,
`lagged`, and the end of the stream. No daemon needed."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import List

from crew_client import EventStream, JobEnded, JobsSent, Lagged, OtherEvent, SlotCrashed, StreamEnded
from crew_client._http import UnixTransport

BODY = (
    b": subscribed\n\n"
    b"event: jobs_sent\ndata: {\"type\":\"jobs_sent\",\"ids\":[1,2]}\n\n"
    b": keepalive\n\n"
    b"event: job_ended\r\ndata: {\"type\":\"job_ended\",\"id\":1,\"name\":null,\r\n"
    b"data: \"status\":\"failed\",\"slot\":\"local-1\",\"attempt\":2}\r\n\r\n"
    b"event: slot_crashed\ndata: {\"type\":\"slot_crashed\",\"slot\":\"ssh-1\",\"class\":\"ssh\",\"reason\":\"gone\"}\n\n"
    b"event: lagged\ndata: {\"type\":\"lagged\",\"missed\":17}\n\n"
    b"event: job_paused\ndata: {\"type\":\"job_paused\",\"id\":2}\n\n"
)


def serve(path: str, pieces: List[bytes]) -> threading.Thread:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def run() -> None:
        conn, _ = server.accept()
        with conn, server:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            assert request.startswith(b"GET /v1/events ")
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for piece in pieces:
                conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                time.sleep(0.01)
            conn.sendall(b"0\r\n\r\n")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_events_parsed_across_chunk_boundaries(tmp_path: Path) -> None:
    path = str(tmp_path / "fake.sock")
    # Cut the body every 7 bytes: chunk boundaries fall mid-line and mid-CRLF.
    serve(path, [BODY[i : i + 7] for i in range(0, len(BODY), 7)])
    stream = EventStream(UnixTransport(path).subscribe())
    events = list(stream)
    assert [e.type for e in events] == ["jobs_sent", "job_ended", "slot_crashed", "lagged", "job_paused"]
    sent, ended, crashed, lagged, other = events
    assert isinstance(sent, JobsSent) and sent.ids == [1, 2]
    assert isinstance(ended, JobEnded) and (ended.id, ended.status, ended.attempt) == (1, "failed", 2)
    assert ended.name is None and not ended.ok
    assert isinstance(crashed, SlotCrashed) and (crashed.worker_class, crashed.reason) == ("ssh", "gone")
    assert isinstance(lagged, Lagged) and lagged.missed == 17
    assert isinstance(other, OtherEvent) and other.raw == {"type": "job_paused", "id": 2}
    # Ended: next() says so.
    try:
        stream.next()
    except StreamEnded:
        pass
    else:
        raise AssertionError("no StreamEnded after the end of the stream")
