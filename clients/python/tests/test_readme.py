"""The README's Python examples, run as written (so that they cannot rot)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List

import pytest

from conftest import stop

README = Path(__file__).resolve().parents[3] / "README.md"


def python_blocks() -> List[str]:
    """The ```python blocks of README.md's section "### Python"."""
    text = README.read_text()
    section = text.split("\n### Python\n", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readme_has_the_five_lines() -> None:
    first = python_blocks()[0]
    statements = [line for line in first.splitlines() if line and not line.startswith("from ")]
    assert len(statements) == 5, first


def test_the_readme_examples_run(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project.parent)
    assert project.name == ".crew"
    blocks = python_blocks()
    assert len(blocks) >= 2
    try:
        scope: Dict[str, Any] = {}
        exec(compile(blocks[0], "README.md (Python)", "exec"), scope)
        assert sorted(scope["results"].values()) == sorted(f"{i}\n" for i in range(100))
        assert sorted(scope["results"]) == sorted(scope["ids"])
        scope = {}
        exec(compile(blocks[1], "README.md (Python executor)", "exec"), scope)
        assert scope["squares"] == [i * i for i in range(100)]
        assert scope["record"].ok and scope["record"].stdout.text.strip() == os.uname().machine
    finally:
        stop(project)
