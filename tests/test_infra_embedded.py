"""proxy.infra.embedded: start, stop, adoption of servers whose owner was killed, no orphans."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import psycopg
import pytest

from proxy.infra import embedded
from proxy.infra.embedded import (
    EmbeddedNats,
    EmbeddedPostgres,
    EmbeddedServerError,
    default_data_dir,
)

REPO = Path(__file__).resolve().parents[1]

_OWNER = """
import sys, time
from pathlib import Path
from proxy.infra.embedded import EmbeddedNats, EmbeddedPostgres
server = {cls}(Path(sys.argv[1]))
print(server.start(), server.pid, flush=True)
if sys.argv[2] == "linger":
    time.sleep(60)
"""


def _run_owner(cls: str, directory: Path, *, linger: bool) -> tuple[subprocess.Popen[str], str, int]:
    """Start a server from a separate Python process; returns (process, url, server pid)."""
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER.format(cls=cls), str(directory), "linger" if linger else "exit"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    url, pid = owner.stdout.readline().split()
    return owner, url, int(pid)


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _postgres_on(data: Path) -> list[int]:
    """Pids of postgres processes serving `data` (the postmaster and its children chdir there)."""
    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            if proc.info["name"] == "postgres" and Path(proc.cwd()) == data.resolve():
                found.append(proc.pid)
        except psutil.Error:
            pass
    return found


def _select_one(url: str) -> object:
    with psycopg.connect(url, connect_timeout=5) as conn:
        return conn.execute("SELECT 1").fetchone()


def test_postgres_survives_a_killed_owner_and_is_reused_then_stopped(tmp_path: Path) -> None:
    data = tmp_path / "pgdata"
    owner, url, pid = _run_owner("EmbeddedPostgres", data, linger=True)
    owner.kill()
    owner.wait()
    assert _alive(pid), "the postmaster should outlive its killed owner"

    pg = EmbeddedPostgres(data)
    try:
        assert pg.start() == url
        assert (pg.reused, pg.pid) == (True, pid)  # adopted, not a second server
        assert _select_one(url) == (1,)
    finally:
        pg.stop()
    assert not _alive(pid)
    assert _postgres_on(data) == []

    # A stale postmaster.pid naming a live, unrelated process must not block a fresh start.
    (data / "postmaster.pid").write_text(f"{os.getpid()}\n{data}\n")
    with EmbeddedPostgres(data) as again:
        assert not again.reused
        assert again.url is not None
        assert _select_one(again.url) == (1,)
    assert _postgres_on(data) == []

    # An owner that exits normally without calling stop() leaves nothing behind (atexit).
    owner, _, pid = _run_owner("EmbeddedPostgres", data, linger=False)
    assert owner.wait(30) == 0
    assert not _alive(pid)
    assert _postgres_on(data) == []


def test_postgres_failing_vector_self_test_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a vector.so built for a newer CPU does to the backend: it dies mid-query.
    monkeypatch.setattr(
        embedded, "_VECTOR_SELF_TEST", "SELECT pg_terminate_backend(pg_backend_pid())"
    )
    data = tmp_path / "pgdata"
    with pytest.raises(EmbeddedServerError, match="pgvector self-test failed"):
        EmbeddedPostgres(data).start()
    assert _postgres_on(data) == []


def test_postgres_with_a_data_dir_too_long_for_a_socket_path(tmp_path: Path) -> None:
    data = tmp_path / ("d" * 50) / ("e" * 50) / "pgdata"
    with EmbeddedPostgres(data) as pg:
        assert pg.url is not None
        assert f"host={data}" not in pg.url  # the socket lives in a short directory
        assert _select_one(pg.url) == (1,)
    assert _postgres_on(data) == []


def test_nats_survives_a_killed_owner_and_is_reused_then_stopped(tmp_path: Path) -> None:
    store = tmp_path / "nats"
    owner, url, pid = _run_owner("EmbeddedNats", store, linger=True)
    owner.kill()
    owner.wait()
    assert _alive(pid)

    server = EmbeddedNats(store)
    try:
        assert server.start() == url
        assert (server.reused, server.pid) == (True, pid)
    finally:
        server.stop()
    assert not _alive(pid)
    assert not (store / EmbeddedNats.PID_FILE).exists()

    owner, _, pid = _run_owner("EmbeddedNats", store, linger=False)
    assert owner.wait(10) == 0
    assert not _alive(pid)


def test_nats_ignores_a_stale_pid_file_and_honours_the_port(tmp_path: Path) -> None:
    store = tmp_path / "nats"
    store.mkdir()
    # our own pid: alive, but not a nats-server on this store
    stale = {"pid": os.getpid(), "port": 1, "create_time": psutil.Process().create_time()}
    (store / EmbeddedNats.PID_FILE).write_text(json.dumps(stale))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with EmbeddedNats(store, port=port) as server:
        assert not server.reused
        assert server.url == f"nats://127.0.0.1:{port}"
        assert server.pid is not None
        pid = server.pid
        with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
            assert conn.recv(5) == b"INFO "
    assert not _alive(pid)


def test_default_data_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / "llm-proxy"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_data_dir() == Path.home() / ".local" / "share" / "llm-proxy"


def test_nats_keeps_its_port_across_restarts_of_the_same_store(tmp_path: Path) -> None:
    store = tmp_path / "nats"
    with EmbeddedNats(store) as first:
        url, pid = first.url, first.pid
    assert not _alive(pid)
    with EmbeddedNats(store) as second:
        assert not second.reused
        assert second.url == url
        port = int(url.rsplit(":", 1)[1]) if url else 0
        with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
            assert conn.recv(5) == b"INFO "


def test_nats_takes_a_new_port_when_its_old_one_is_taken(tmp_path: Path) -> None:
    store = tmp_path / "nats"
    with EmbeddedNats(store) as first:
        assert first.url is not None
        old_port = int(first.url.rsplit(":", 1)[1])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", old_port))
        squatter.listen()
        with EmbeddedNats(store) as second:
            assert second.url is not None
            new_port = int(second.url.rsplit(":", 1)[1])
            assert new_port != old_port
            with socket.create_connection(("127.0.0.1", new_port), timeout=2) as conn:
                assert conn.recv(5) == b"INFO "
    with EmbeddedNats(store) as third:  # the port it got last is the one remembered now
        assert third.url == f"nats://127.0.0.1:{new_port}"


def test_nats_never_takes_another_nats_server_on_its_port_for_its_own(tmp_path: Path) -> None:
    # Another nats-server won the port (a second gateway or test run starting at the same
    # moment). It answers INFO too; ours cannot listen, and must not pass for started.
    with EmbeddedNats(tmp_path / "other") as other:
        assert other.url is not None
        port = int(other.url.rsplit(":", 1)[1])
        ours = EmbeddedNats(tmp_path / "ours", port=port, start_timeout=2.0)
        with pytest.raises(EmbeddedServerError):
            ours.start()
        assert ours.pid is None
