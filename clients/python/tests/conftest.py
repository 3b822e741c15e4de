"""Fixtures: a real daemon (`crew up`) in a fresh project folder per test,
stopped afterwards.

`crew` is `$CREW_BIN`, else `crew` on PATH (`cargo xtask clients` sets
`CREW_BIN` to the workspace's `target/debug/crew`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from crew_client import Crew, DaemonError


def _have_crew() -> bool:
    return bool(os.environ.get("CREW_BIN")) or shutil.which("crew") is not None


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder (`.crew` inside a fresh temporary folder)."""
    if not _have_crew():
        if os.environ.get("CI"):
            pytest.fail("no crew binary: set CREW_BIN or put crew on PATH")
        pytest.skip("no crew binary: set CREW_BIN or put crew on PATH")
    return tmp_path / ".crew"


@pytest.fixture
def crew(project: Path) -> Iterator[Crew]:
    """The daemon of `project`, with 4 local workers; stopped afterwards."""
    client = Crew(project)
    try:
        client.recruit(4)
        yield client
    finally:
        stop(project)


def stop(project: Path) -> None:
    """Stops the daemon of `project` if one runs (also after a failed test)."""
    if (project / "crew.sock").exists():
        try:
            Crew(project, start=False).down()
        except DaemonError:
            pass
