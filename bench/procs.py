"""Starting, pinning, probing and stopping the benchmark's processes.

Every child runs in its own session (process group) so that it, and any workers it forks,
can be stopped as one; ``Processes`` stops them all when its block ends, whether by a
normal end, an error or Ctrl-C. Each child's output goes to a log file, never to a pipe
that could fill up and stall it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "Family",
    "Proc",
    "Processes",
    "free_port",
    "http_json",
    "machine_busy",
    "stop_marked",
]


@dataclass(slots=True)
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Processes:
    """Owns every child process; the block's end stops them (SIGTERM, then SIGKILL)."""

    def __init__(self, workdir: Path, cwd: Path) -> None:
        self.workdir = workdir
        self.cwd = cwd
        self.procs: list[Proc] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        # Servers that detached from their parent (a daemonized PostgreSQL) carry the work
        # directory in their command line; a parent stopped cleanly has stopped them already.
        stop_marked(str(self.workdir))

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        cpus: str | None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        """Start ``argv``, pinned with ``taskset -c cpus`` (None: inherit this process's)."""
        command = ["taskset", "-c", cpus, *argv] if cpus is not None else argv
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                command,
                cwd=cwd or self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 8.0) -> None:
        if proc.popen.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.popen.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                continue

    def wait_line(self, proc: Proc, prefix: str, timeout: float = 20.0) -> str:
        """The first line of the child's output starting with ``prefix`` (its rest)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in proc.log.read_text(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line[len(prefix) :].strip()
            self._check_alive(proc)
            time.sleep(0.05)
        raise RuntimeError(f"{proc.name} printed no {prefix!r} in {timeout}s:\n{proc.tail()}")

    def wait_http(self, proc: Proc, url: str, timeout: float = 60.0) -> None:
        """Poll ``url`` until it answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            self._check_alive(proc)
            time.sleep(0.1)
        raise RuntimeError(f"{proc.name} did not answer {url} in {timeout}s:\n{proc.tail()}")

    @staticmethod
    def _check_alive(proc: Proc) -> None:
        if proc.popen.poll() is not None:
            raise RuntimeError(
                f"{proc.name} exited with status {proc.popen.returncode}:\n{proc.tail()}"
            )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_json(url: str, body: Any = None, timeout: float = 10.0) -> Any:
    """GET (or POST ``body`` as JSON) and parse the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@dataclass(frozen=True, slots=True)
class Family:
    """A server's processes: ``root`` and its descendants, plus helper servers it started
    that detach from its tree (the embedded PostgreSQL daemonizes), found by ``marker``: a
    string only their command lines contain (their data directory)."""

    root: int
    marker: str | None = None

    def pids(self) -> tuple[set[int], set[int]]:
        """(the server's own processes, its helpers' processes)."""
        parents: dict[int, int] = {}
        marked: list[int] = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                if self.marker is not None:
                    cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                    if self.marker.encode() in cmdline:
                        marked.append(pid)
            except OSError:
                continue
            parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
        children: dict[int, list[int]] = {}
        for pid, ppid in parents.items():
            children.setdefault(ppid, []).append(pid)
        helpers = _descendants(marked, children)
        own = _descendants([self.root], children) - helpers
        return own, helpers

    def cpu(self) -> float:
        """CPU seconds (user + system) used so far by all its live processes, helpers too."""
        own, helpers = self.pids()
        total = 0
        for pid in own | helpers:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / _TICKS

    def rss(self) -> int:
        """Resident bytes of the server's own processes (helpers left out)."""
        total = 0
        for pid in self.pids()[0]:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                continue
        return total

    def fds(self) -> int:
        """Open file descriptors of the server's own processes."""
        total = 0
        for pid in self.pids()[0]:
            try:
                total += len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                continue
        return total


def _descendants(roots: list[int], children: dict[int, list[int]]) -> set[int]:
    found: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def stop_marked(marker: str, timeout: float = 8.0) -> None:
    """Stop every process whose command line contains ``marker`` (a path only this run
    created): helpers a server left behind when it was killed."""
    me = os.getpid()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [p for p in Family(me, marker).pids()[1] if p != me]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


_TICKS = os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds all cores have spent busy since boot (user, nice, system, irq, softirq,
    steal), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    return (user + nice + system + irq + softirq + steal) / _TICKS
