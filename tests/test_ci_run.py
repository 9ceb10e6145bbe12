""".ci/run installs into virtual environments of its own, never into the python3 on PATH."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from ros_testing import REPO

SCRIPT = REPO / ".ci" / "run"


def code_lines() -> list[str]:
    """The script's lines without comments (heredoc bodies included, as written)."""
    return [
        line.split("#", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
        for line in SCRIPT.read_text().splitlines()
    ]


def test_ci_script_parses() -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    result = subprocess.run([bash, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_pip_install_runs_in_a_virtual_environment_the_script_created() -> None:
    lines = code_lines()
    created = [i for i, line in enumerate(lines) if re.search(r"python3 -m venv ", line)]
    activated = [i for i, line in enumerate(lines) if re.search(r"source \S*bin/activate", line)]
    assert created and activated, ".ci/run creates no virtual environment"
    installs = [i for i, line in enumerate(lines) if re.search(r"\bpip3? install\b", line)]
    readme = [i for i, line in enumerate(lines) if 'bash -c "$cmd"' in line]
    assert installs and readme
    for i in installs + readme:  # the README's test command installs too
        assert any(c < i for c in created) and any(a < i for a in activated), (
            f".ci/run line {i + 1} installs before a virtual environment is created and activated: {lines[i]}"
        )
    assert not any(re.search(r"\bpip3? install\b.*--user|--break-system-packages", line) for line in lines)
