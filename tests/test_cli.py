"""`llm-proxy` as a user runs it: a real process, embedded servers, signals."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from proxy.cli import _gateway_mark
from proxy.infra.embedded import EmbeddedPostgres

pytest_plugins = ["tests.infra_servers"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def processes_using(path: Path) -> list[str]:
    """Command lines of live processes that mention `path` (postgres -D …, nats-server -sd …)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except OSError:
            continue
        if str(path) in cmdline and state != "Z":
            found.append(cmdline)
    return found


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_with_nothing_configured_starts_and_stops_cleanly(tmp_path: Path, workers: int) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("LLM_BASE_URL", "DATABASE_URL", "NATS_URL")}
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--bind", f"127.0.0.1:{port}", "--data-dir", str(tmp_path),
         "--workers", str(workers)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        ready = None
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert ready is not None and ready.status_code == 200, ready and ready.text
        assert ready.json()["checks"] == {"postgres": "ok", "nats": "ok"}
        chat = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                          json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}, timeout=5)
        assert chat.status_code == 404  # no backends: every model is unknown, in OpenAI's shape
        assert chat.json()["error"]["code"] == "model_not_found"
        assert processes_using(tmp_path)  # the embedded servers run on our data dir
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode in (0, -signal.SIGTERM, 128 + signal.SIGTERM), output
    assert "Traceback" not in output, output
    deadline = time.monotonic() + 10
    while processes_using(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_using(tmp_path) == []


def test_migrate_command(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "NATS_URL")}
    env["NATS_URL"] = "nats://127.0.0.1:9"  # migrate needs only PostgreSQL
    first = subprocess.run([sys.executable, "-m", "proxy", "migrate", "--data-dir", str(tmp_path)],
                           env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "0002_chat_log" in first.stdout
    second = subprocess.run([sys.executable, "-m", "proxy", "migrate", "--data-dir", str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "up to date" in second.stdout
    assert processes_using(tmp_path) == []


def test_keys_revoke_takes_the_leaked_key_itself_and_never_echoes_a_key(pg_database_url: str) -> None:
    env = os.environ | {"DATABASE_URL": pg_database_url}

    def keys(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "proxy", "keys", *argv],
                              env=env, capture_output=True, text=True, timeout=60)

    created = keys("create", "--name", "leaked")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("sk-llmp-") and len(key) > 40

    # Someone else's key (the same but its last character): not found, and not repeated.
    other = key[:-1] + ("A" if key[-1] != "A" else "B")
    missing = keys("revoke", other)
    assert missing.returncode == 1
    assert other not in missing.stderr + missing.stdout
    assert key[:16] in missing.stderr  # as much as listings show: the user sees which one it was

    revoked = keys("revoke", key)
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked key" in revoked.stdout and key not in revoked.stdout + revoked.stderr
    listed = keys("list", "--json")
    assert [json.loads(line)["status"] for line in listed.stdout.splitlines()] == ["revoked"]


@pytest.mark.parametrize(
    "argv", [["keys", "list"], ["keys", "create", "--name", "x"], ["migrate"], ["ingest", "docs", "README.md"]]
)
@pytest.mark.parametrize(
    ("database_url", "status", "says"),
    [
        ("postgresql://nobody@127.0.0.1:{port}/x", 1, "llm-proxy: database error: "),
        # not a connection string at all: the configuration is wrong, not the database
        ("not-a-url", 2, "llm-proxy: configuration error: `DATABASE_URL` "),
    ],
)
def test_database_commands_say_in_one_line_that_the_database_cannot_be_reached(
    argv: list[str], database_url: str, status: int, says: str
) -> None:
    env = {**os.environ, "DATABASE_URL": database_url.format(port=free_port())}
    done = subprocess.run([sys.executable, "-m", "proxy", *argv], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == status, done.stderr
    assert done.stderr.startswith(says), done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) <= 2  # libpq's own two lines


def _postmaster_pid(pgdata: Path) -> int | None:
    """The live postmaster of `pgdata`, if one runs."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except (OSError, ValueError):
        return None
    return pid if state != "Z" else None


def test_a_key_revoked_while_the_embedded_postgres_is_down_is_refused_by_the_running_gateway(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LLM_BASE_URL", "DATABASE_URL", "NATS_URL")}

    def keys(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "proxy", "keys", *argv, "--data-dir", str(tmp_path)],
                              env=env, capture_output=True, text=True, timeout=120)

    created = keys("create", "--name", "leaked")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--bind", f"127.0.0.1:{port}", "--data-dir", str(tmp_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )

    def status_after(seconds: float, wanted: int) -> int:
        deadline, status = time.monotonic() + seconds, 0
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                status = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2,
                                   headers={"authorization": f"Bearer {key}"}).status_code
            if status == wanted:
                break
            time.sleep(0.2)
        return status

    pgdata = tmp_path / "pgdata"
    try:
        assert status_after(60, 200) == 200
        first = _postmaster_pid(pgdata)
        assert first is not None
        os.kill(first, signal.SIGINT)  # the operator's (or the OOM killer's) doing
        revoked = keys("revoke", key)
        assert revoked.returncode == 0 and "revoked key" in revoked.stdout, revoked.stderr
        assert status_after(20, 401) == 401  # not accepted on and on by the gateway
        # And the gateway has a database again: it brings its PostgreSQL back itself.
        second = _postmaster_pid(pgdata)
        assert second is not None and second != first
        os.kill(second, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while _postmaster_pid(pgdata) in (None, second) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _postmaster_pid(pgdata) not in (None, second)
        ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5)
        for _ in range(50):
            if ready.json()["checks"]["postgres"] == "ok":
                break
            time.sleep(0.2)
            ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5)
        assert ready.json()["checks"]["postgres"] == "ok"
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert "started it again" in output
    assert "Traceback" not in output, output
    deadline = time.monotonic() + 10
    while processes_using(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_using(tmp_path) == []  # what the gateway (or the CLI) started, it stopped


def test_the_gateway_starts_its_embedded_nats_again_on_its_port_when_it_dies(tmp_path: Path) -> None:
    # Without it, a gateway whose nats-server was killed ran on without events, outbox or
    # workflows until it was restarted itself, warning once a second.
    env = {k: v for k, v in os.environ.items() if k not in ("LLM_BASE_URL", "DATABASE_URL", "NATS_URL")}
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--bind", f"127.0.0.1:{port}", "--data-dir", str(tmp_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    record = tmp_path / "nats" / "nats-server.pid.json"

    def nats_check(wanted: str, seconds: float) -> str:
        deadline, state = time.monotonic() + seconds, ""
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError, ValueError, KeyError):
                state = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).json()["checks"]["nats"]
            if state == wanted:
                break
            time.sleep(0.2)
        return state

    try:
        assert nats_check("ok", 60) == "ok"
        first = json.loads(record.read_text())
        os.kill(first["pid"], signal.SIGKILL)
        second, deadline = first, time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                second = json.loads(record.read_text())
                if second["pid"] != first["pid"]:
                    break
            time.sleep(0.2)
        assert second["pid"] != first["pid"] and second["port"] == first["port"]  # clients keep its URL
        assert nats_check("ok", 30) == "ok"
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert "embedded NATS" in output and "started it again" in output, output
    assert "Traceback" not in output, output
    deadline = time.monotonic() + 10
    while processes_using(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_using(tmp_path) == []  # the revived server was stopped with the gateway


def test_keys_leave_the_postgres_they_started_running_while_a_gateway_uses_the_data_dir(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "NATS_URL")}

    def keys(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "proxy", "keys", *argv, "--data-dir", str(tmp_path)],
                              env=env, capture_output=True, text=True, timeout=120)

    with _gateway_mark(tmp_path):  # as `serve` holds it
        assert keys("create", "--name", "k").returncode == 0
        assert _postmaster_pid(tmp_path / "pgdata") is not None  # the gateway's now: it stops it
    assert keys("list").returncode == 0  # adopted: left running
    assert _postmaster_pid(tmp_path / "pgdata") is not None
    EmbeddedPostgres(tmp_path / "pgdata").stop()
    assert keys("list").returncode == 0  # no gateway: stopped again on the way out
    assert _postmaster_pid(tmp_path / "pgdata") is None


def test_keys_create_help_says_what_an_admin_key_may_do() -> None:
    # It said "may change workspaces' documents" alone: an operator making a key for a
    # dashboard's scraper (metrics_admin_only) or for tooling on /v1/keys learnt neither.
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "keys", "create", "--help"], capture_output=True, text=True, timeout=30,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0
    admin = " ".join(result.stdout.split("--admin ", 2)[-1].split())
    assert "/v1/keys" in admin and "/metrics" in admin and "workspaces' documents" in admin


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["create", "--name", "k", "--rpm", "-1"], "--rpm"),
        (["create", "--name", "k", "--budget", "0"], "--budget"),
        (["create", "--name", " "], "--name"),
        (["create", "--name", "k", "--models", ""], "--models"),
        (["create", "--name", "k", "--expires", "2000-01-01"], "--expires"),
        (["create", "--name", "k", "--budget-period", "0d"], "--budget-period"),
        (["update", "abcdef", "--tpm", "99999999999999"], "--tpm"),
        (["update", "abcdef", "--workspaces", "a\tb"], "--workspaces"),
        (["update", "abcdef", "--expires", "yesterday"], "--expires"),
    ],
)
def test_keys_refuse_a_bad_flag_in_one_line_before_starting_a_database(
    tmp_path: Path, argv: list[str], flag: str
) -> None:
    # They started (or adopted) the embedded PostgreSQL first, then refused: seconds of waiting
    # and a database process for a typo.
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "NATS_URL")}
    done = subprocess.run([sys.executable, "-m", "proxy", "keys", *argv, "--data-dir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(f"llm-proxy: {flag}"), done.stderr
    assert not (tmp_path / "pgdata").exists() and processes_using(tmp_path) == []
