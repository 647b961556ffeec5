"""`llm-proxy` as a user runs it: a real process, embedded servers, signals."""

from __future__ import annotations

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
@pytest.mark.parametrize("database_url", ["postgresql://nobody@127.0.0.1:{port}/x", "not-a-url"])
def test_database_commands_say_in_one_line_that_the_database_cannot_be_reached(
    argv: list[str], database_url: str
) -> None:
    env = {**os.environ, "DATABASE_URL": database_url.format(port=free_port())}
    done = subprocess.run([sys.executable, "-m", "proxy", *argv], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("llm-proxy: database error: ")
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) <= 2  # libpq's own two lines
