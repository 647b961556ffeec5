"""A basetemp for each test session that other pytest sessions starting leave alone.

Running as root, the suite's embedded PostgreSQL servers run as an unprivileged user that needs
o+x on every ancestor of their data dir (`_make_traversable` adds it at start). pytest's default
basetemp is under /tmp/pytest-of-<user>, which every pytest session resets to 0700 as it
starts: a second session (another terminal, a helper, an xdist worker) cut every PostgreSQL
running under it off from its data dir, and the next checkpoint crashed it. So, as root and
without `--basetemp`, each session's basetemp is under a root of our own that no pytest
resets. Like pytest, the last few sessions' dirs are kept for post-mortems; older ones whose
session has ended are removed as a new session starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import IO

import pytest

KEEP_SESSIONS = 3
_LOCK = ".session-lock"


def _in_use(session: Path) -> bool:
    """Whether a live session holds `session`'s lock (the kernel drops it when it dies)."""
    try:
        lock = (session / _LOCK).open("r")
    except FileNotFoundError:
        # Just made by a session that has yet to lock it, or left by one killed at that point.
        with contextlib.suppress(OSError):
            return time.time() - session.stat().st_mtime < 60
        return False
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def _prune(root: Path) -> None:
    def created(session: Path) -> float:
        with contextlib.suppress(OSError):
            return (session / _LOCK).stat().st_mtime
        return 0.0

    sessions = sorted((p for p in root.iterdir() if p.is_dir()), key=created, reverse=True)
    for old in sessions[KEEP_SESSIONS:]:
        if not _in_use(old):
            shutil.rmtree(old, ignore_errors=True)


def _own_root() -> Path | None:
    """/tmp/llm-proxy-tests-of-root (0711), or None if it is not safely ours."""
    root = Path(tempfile.gettempdir()).resolve() / "llm-proxy-tests-of-root"
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700)
    st = root.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        return None
    root.chmod(0o711)
    return root


@pytest.hookimpl(tryfirst=True)  # before pytest's own pytest_configure reads --basetemp
def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0 or config.option.basetemp or hasattr(config, "workerinput"):
        return
    root = _own_root()
    if root is None:
        return
    session = Path(tempfile.mkdtemp(prefix="session-", dir=root))
    lock: IO[str] = (session / _LOCK).open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    config.add_cleanup(lock.close)
    _prune(root)
    # Made here so that xdist workers, whose basetemps go inside it, find their parent.
    (session / "tmp").mkdir()
    config.option.basetemp = str(session / "tmp")
