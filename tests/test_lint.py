"""ruff over the whole tree and mypy over service/, as configured in pyproject.toml: a finding fails the suite, so
CI enforces both. Both come with the test extra."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration  # runs external programs


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, check=False)


def test_ruff_finds_nothing():
    completed = run("ruff", "check", ".")
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_mypy_finds_nothing_in_service():
    completed = run("mypy")  # pyproject.toml names the package and the strictness
    assert completed.returncode == 0, completed.stdout + completed.stderr
