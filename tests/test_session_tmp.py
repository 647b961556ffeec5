"""The session's embedded servers keep working while other pytest sessions start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg


def test_session_postgres_survives_another_pytest_session_starting(pg_url: str, tmp_path: Path) -> None:
    tiny = tmp_path / "test_tiny.py"
    tiny.write_text("def test_tmp(tmp_path):\n    assert tmp_path.is_dir()\n")
    # A plain pytest session (not this suite's conftest) on pytest's default basetemp: as it
    # starts it resets /tmp/pytest-of-<user> to 0700, as a developer's second terminal would.
    other = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tiny)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert other.returncode == 0, other.stdout + other.stderr
    with psycopg.connect(pg_url, autocommit=True) as conn:
        # A checkpoint reaches the data dir by its full path: it crashed the server when an
        # ancestor had lost its o+x.
        conn.execute("CHECKPOINT")
        assert conn.execute("SELECT 1").fetchone() == (1,)
