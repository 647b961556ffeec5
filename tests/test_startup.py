"""Start-up as a user meets it: `llm-proxy serve` with a bad config, environment or address stops
with one line naming the culprit (exit status 2), never a traceback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Iterator
from pathlib import Path

import httpx
import pytest

from proxy.config import ConfigError, Settings, load_settings
from tests.harness import refusing_port, running_gateway
from tests.test_cli import free_port

OK = "embedded = false\n"


def serve(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "DATABASE_URL", "NATS_URL"))}
    return subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--bind", f"127.0.0.1:{free_port()}", *args],
        env={**base, **(env or {})}, capture_output=True, text=True, timeout=30,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_config_that_is_a_directory(tmp_path: Path) -> None:
    assert_one_line(serve(["--config", str(tmp_path)]), str(tmp_path), "is a directory")


def test_config_that_is_not_utf8(tmp_path: Path) -> None:
    config = write(tmp_path / "bad.toml", b'embedded = false\nlog_level = "\xff\xfe"\n')
    assert_one_line(serve(["--config", str(config)]), str(config), "UTF-8")


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"LLM_PROXY_LOG_LEVEL": "verbose"}, "LLM_PROXY_LOG_LEVEL"),
        ({"LLM_PROXY_DATA_DIR": "/etc/passwd"}, "LLM_PROXY_DATA_DIR"),
        ({"LLM_PROXY_DATA_DIR": "/etc/passwd/sub"}, "LLM_PROXY_DATA_DIR"),
        ({"LLM_BASE_URL": "http://127.0.0.1:abc/v1"}, "LLM_BASE_URL"),
        ({"LLM_BASE_URL": "http://127.0.0.1:99999/v1"}, "LLM_BASE_URL"),
    ],
)
def test_bad_environment_value(tmp_path: Path, env: dict[str, str], key: str) -> None:
    config = write(tmp_path / "ok.toml", OK)
    assert_one_line(serve(["--config", str(config)], env), key)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[timeouts]\ntotal = nan\n", "`timeouts.total` must be a finite number, got nan"),
        ("[timeouts]\ntotal = inf\n", "`timeouts.total` must be a finite number, got inf"),
        ('[[backends]]\nname = "a"\nbase_url = "http://127.0.0.1:9/v1"\ntimeouts = { idle = -inf }\n',
         "`backends[0].timeouts.idle` must be a finite number"),
        ("cache_ttl_seconds = nan\n", "`cache_ttl_seconds` must be a finite number"),
        ("events_retention_seconds = inf\n", "`events_retention_seconds` must be a finite number"),
        ("models_cache_seconds = -5\n", "`models_cache_seconds` must not be negative"),
        ("models_cache_seconds = nan\n", "`models_cache_seconds` must be a finite number"),
        ("[workflow]\njob_timeout_seconds = inf\n", "`workflow.job_timeout_seconds` must be a finite number"),
        ("[semantic_cache]\nttl_seconds = nan\n", "`semantic_cache.ttl_seconds` must be a finite number"),
        ("events_retention_seconds = 1e30\n", "`events_retention_seconds` must be at most 1e+09"),
        ("[workflow]\njob_retention_seconds = 1e12\n", "`workflow.job_retention_seconds` must be at most 1e+09"),
    ],
)
def test_numbers_that_are_not_finite_negative_or_too_large_stop_start_up(tmp_path: Path, text: str, key: str) -> None:
    """TOML has nan and inf; `total = nan` used to load and then fail every chat with a 502."""
    config = write(tmp_path / "n.toml", OK + text)
    assert_one_line(serve(["--config", str(config)]), key)


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        # SQLAlchemy's spelling, copied from another service's settings
        ('database_url = "postgresql+psycopg://app:s3cret@db/app"\n', {}, ("`database_url`", "postgresql+psycopg")),
        ("", {"DATABASE_URL": "postgresql://app:s3cret@db/app?sslmode=require&pool_size=5"},
         ("`DATABASE_URL`", "pool_size")),
        ("", {"NATS_URL": "http://app:s3cret@nats:4222"}, ("`NATS_URL`", "http://app:***@nats:4222")),
        ('nats_url = "nats://nats:422200"\n', {}, ("`nats_url`", "nats://nats:422200")),
    ],
)
def test_a_database_or_nats_url_that_cannot_work_stops_start_up(
    tmp_path: Path, text: str, env: dict[str, str], expected: tuple[str, ...]
) -> None:
    """Such a URL used to start a gateway that retried it, warning, for as long as it ran (and
    refused every request with a key while it did); its password is never printed."""
    config = write(tmp_path / "url.toml", OK + text)
    result = serve(["--config", str(config)], env)
    assert_one_line(result, *expected)
    assert "s3cret" not in result.stderr


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("DATABASE_URL", "postgresql://app:s3cret@db:5432/app?sslmode=require"),
        ("DATABASE_URL", "postgres://db/app"),
        ("DATABASE_URL", "host=db dbname=app user=app password=s3cret"),
        ("NATS_URL", "nats://a:4222,nats://b:4222"),
        ("NATS_URL", "tls://user:pw@nats.example.com:4443"),
        ("NATS_URL", "127.0.0.1:4222"),
    ],
)
def test_database_and_nats_urls_in_every_usual_form_are_accepted(key: str, value: str) -> None:
    settings = load_settings(None, {key: value})
    assert (settings.database_url if key == "DATABASE_URL" else settings.nats_url) == value


@pytest.mark.parametrize(
    ("text", "env", "key"),
    [('auth = "required"\n', {}, "`auth`"), ("", {"LLM_PROXY_AUTH": "required"}, "`LLM_PROXY_AUTH`")],
)
def test_keys_required_without_a_database_stop_start_up(
    tmp_path: Path, text: str, env: dict[str, str], key: str
) -> None:
    """It used to start, then refuse every request with a 401 no key could ever pass."""
    config = write(tmp_path / "nodb.toml", OK + text)
    assert_one_line(serve(["--config", str(config)], env), key, '"required"', "database")
    # With a database to keep the keys in, the same setting is accepted.
    assert load_settings(config, {**env, "DATABASE_URL": "postgresql://db/x"}).auth == "required"


def test_a_cache_of_model_listings_may_be_switched_off(tmp_path: Path) -> None:
    config = write(tmp_path / "z.toml", OK + "models_cache_seconds = 0\n")
    assert load_settings(config, {}).models_cache_seconds == 0


def test_llm_base_url_cannot_add_a_second_backend_named_default(tmp_path: Path) -> None:
    """No backend sets `default = true`, so `LLM_BASE_URL` adds one named "default": with a configured
    backend of that name, one of the two used to vanish and its models went to the other."""
    config = write(
        tmp_path / "g.toml",
        f'{OK}[[backends]]\nname = "default"\nkind = "ollama"\nbase_url = "http://127.0.0.1:9"\nprefixes = ["llama"]\n',
    )
    result = serve(["--config", str(config)], {"LLM_BASE_URL": "http://127.0.0.1:9/v1"})
    assert_one_line(result, "`LLM_BASE_URL`", "'default'")


def test_data_dir_option_that_is_a_file(tmp_path: Path) -> None:
    config = write(tmp_path / "ok.toml", OK)
    assert_one_line(serve(["--config", str(config), "--data-dir", str(config)]), "--data-dir")


@pytest.mark.parametrize("command", [["serve"], ["keys", "list"], ["migrate"]])
def test_a_data_dir_that_cannot_be_created_is_named_in_one_line(command: list[str]) -> None:
    # A PermissionError traceback from deep in the embedded servers' start, exit status 1.
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "DATABASE_URL", "NATS_URL"))}
    extra = ["--bind", f"127.0.0.1:{free_port()}"] if command == ["serve"] else []
    result = subprocess.run(
        [sys.executable, "-m", "proxy", *command, *extra, "--data-dir", "/proc/llm-proxy-data"],
        env=base, capture_output=True, text=True, timeout=30,
    )
    assert_one_line(result, "/proc/llm-proxy-data", "--data-dir", "cannot be used")


@pytest.mark.parametrize("port", ["abc", "99999", "0"])
def test_backend_url_with_a_bad_port(tmp_path: Path, port: str) -> None:
    config = write(
        tmp_path / "g.toml",
        f'{OK}[[backends]]\nname = "a"\nbase_url = "http://127.0.0.1:{port}/v1"\n',
    )
    assert_one_line(serve(["--config", str(config)]), "backends[0].base_url", "port")


@pytest.mark.parametrize(
    ("args", "text", "key"),
    [
        (["--bind", "http://127.0.0.1:8080"], "", "`--bind`"),
        (["--bind", "::1"], "", "`--bind`"),
        ([], 'bind = "http://0.0.0.0:8080"\n', "`bind`"),
    ],
)
def test_a_bind_address_that_is_a_url_or_a_bare_ipv6_address_is_named(
    tmp_path: Path, args: list[str], text: str, key: str
) -> None:
    """They were looked up as host names: 'cannot listen on [http://127.0.0.1]:8080: unknown host'."""
    config = write(tmp_path / "g.toml", OK + text)
    assert_one_line(serve(["--config", str(config), *args]), key, "HOST:PORT")
    for good in ("[::1]:8080", "0.0.0.0:8080", ":8080", "localhost:0"):
        assert load_settings(write(tmp_path / "ok.toml", OK + f'bind = "{good}"\n'), {}).port in (8080, 0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[backend]]\nname = "x"\n', "unknown key `backend` (did you mean `backends`?)"),
        ('[[backends]]\nname = "x"\nbase_url = "http://a/v1"\nprefix = ["qwen3-"]\n',
         "unknown key `backends[0].prefix` (did you mean `backends[0].prefixes`?)"),
        ("log-level = \"debug\"\n", "unknown key `log-level` (did you mean `log_level`?)"),
        ("[timeouts]\nfirst_token_seconds = 600\n", "unknown key `timeouts.first_token_seconds` (did you mean `timeouts.first_token`?)"),
        ("colour = 1\n", "unknown key `colour`"),
    ],
)
def test_a_misspelt_key_is_named_with_the_key_it_probably_meant(tmp_path: Path, text: str, message: str) -> None:
    config = write(tmp_path / "typo.toml", OK + text)
    with pytest.raises(ConfigError) as raised:
        load_settings(config, {})
    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # Once suggested `max_body_bytes`: a limit the operator did not mean to change.
        ("file_max_bytes = 1048576\n", "unknown key `file_max_bytes` (it belongs in `[batches]`)"),
        ("propagate = false\n", "unknown key `propagate` (it belongs in `[tracing]`)"),
        ("trace_context = false\n", "unknown key `trace_context` (it belongs in a `[[backends]]` entry)"),
        ("concurrency = 2\n", "unknown key `concurrency` (it belongs in `[workflow]` or in `[batches]`)"),
        ("connect = 5\n", "unknown key `connect` (it belongs in `[timeouts]` or a backend's `timeouts`)"),
        # A top-level setting appended below the last table is TOML's for that table.
        ('[[backends]]\nname = "x"\nbase_url = "http://a/v1"\nmax_audio_bytes = 1024\n',
         "unknown key `backends[0].max_audio_bytes` (it belongs at the top of the file, above the first [table] "
         "header: in TOML, a key below a header belongs to that table)"),
        ("[batches]\nshutdown_grace_seconds = 30\n",
         "unknown key `batches.shutdown_grace_seconds` (it belongs at the top of the file, above the first [table] "
         "header: in TOML, a key below a header belongs to that table)"),
        # TOML's names for what a key holds, not Python's.
        ("tracing = true\n", "`tracing` must be of type table, got True"),
        ('max_audio_bytes = "25MB"\n', "`max_audio_bytes` must be of type integer, got '25MB'"),
        ('shutdown_grace_seconds = "5s"\n', "`shutdown_grace_seconds` must be of type number, got '5s'"),
    ],
)
def test_a_key_in_the_wrong_table_is_named_with_the_table_it_belongs_in(tmp_path: Path, text: str, message: str) -> None:
    config = write(tmp_path / "misplaced.toml", OK + text)
    with pytest.raises(ConfigError) as raised:
        load_settings(config, {})
    assert str(raised.value) == message


def test_a_misspelt_key_stops_start_up_in_one_line(tmp_path: Path) -> None:
    config = write(tmp_path / "typo.toml", OK + "[[backend]]\nname = \"x\"\n")
    assert_one_line(serve(["--config", str(config)]), "unknown key `backend` (did you mean `backends`?)")


def test_bind_host_that_does_not_exist(tmp_path: Path) -> None:
    config = write(tmp_path / "g.toml", f'{OK}bind = "999.999.1.1:{free_port()}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=30,
    )
    assert_one_line(result, "cannot listen on 999.999.1.1:")


@pytest.mark.parametrize("workers", [1, 2])
def test_bind_port_already_in_use(tmp_path: Path, workers: int) -> None:
    config = write(tmp_path / "ok.toml", OK)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve(["--config", str(config), "--bind", f"127.0.0.1:{port}", "--workers", str(workers)])
    assert_one_line(result, f"cannot listen on 127.0.0.1:{port}: address already in use")


@contextlib.contextmanager
def running(command: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def wait_healthy(url: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0]
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never became healthy")


def test_llm_api_key_reaches_the_default_backend_that_llm_base_url_repoints(tmp_path: Path) -> None:
    config = write(
        tmp_path / "g.toml",
        f'{OK}[[backends]]\nname = "main"\nbase_url = "http://127.0.0.1:1/v1"\ndefault = true\n',
    )
    with running([sys.executable, "-m", "tests.fakes", "openai", "--api-key", "sk-backend-secret"]) as fake:
        assert fake.stdout is not None
        ready = fake.stdout.readline().split()
        assert ready[:1] == ["READY"], ready
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "DATABASE_URL", "NATS_URL"))}
        env |= {"LLM_BASE_URL": f"{ready[1]}/v1", "LLM_API_KEY": "sk-backend-secret"}
        command = [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--bind", f"127.0.0.1:{port}"]
        with running(command, env) as gateway:
            wait_healthy(f"http://127.0.0.1:{port}", gateway)
            reply = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}, timeout=10,
            )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize(("settings", "logged"), [
    ('log_level = "warning"\n', 1),
    ('log_level = "error"\naccess_log = true\n', 1),
    ('log_level = "debug"\naccess_log = false\n', 0),
])
def test_access_log_has_its_own_switch_whatever_the_log_level(tmp_path: Path, settings: str, logged: int) -> None:
    config = write(tmp_path / "g.toml", OK + settings)
    with running([sys.executable, "-m", "tests.fakes", "openai"]) as fake:
        assert fake.stdout is not None
        ready = fake.stdout.readline().split()
        assert ready[:1] == ["READY"], ready
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "DATABASE_URL", "NATS_URL"))}
        env["LLM_BASE_URL"] = f"{ready[1]}/v1"
        gateway = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--bind", f"127.0.0.1:{port}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                assert gateway.poll() is None and time.monotonic() < deadline, "the gateway did not start"
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                time.sleep(0.1)
            reply = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}, timeout=10,
            )
            assert reply.status_code == 200, reply.text
        finally:
            gateway.send_signal(signal.SIGTERM)
            try:
                stderr = gateway.communicate(timeout=15)[1]
            except subprocess.TimeoutExpired:
                gateway.kill()
                stderr = gateway.communicate()[1]
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    chats = [line for line in lines if line["logger"] == "llm_proxy.request"]
    assert len(chats) == logged, stderr
    assert all(chat["status"] == 200 and chat["model"] == "m" for chat in chats)
    if "debug" not in settings:  # the level still governs every other message
        assert not [line for line in lines if line["logger"] != "llm_proxy.request" and line["level"] == "info"], stderr


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                # the command may hold spaces and parentheses: the fields after the last ")" are safe
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_workers_exit_when_the_gateway_process_is_killed(tmp_path: Path) -> None:
    config = write(tmp_path / "ok.toml", OK)
    port = free_port()
    command = [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--bind", f"127.0.0.1:{port}",
               "--workers", "2"]
    with running(command) as parent:
        wait_healthy(f"http://127.0.0.1:{port}", parent)
        workers = {pid for pid in children_of(parent.pid)
                   if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()}
        assert len(workers) == 2, workers
        parent.kill()
        parent.wait()
        try:
            deadline = time.monotonic() + 8
            while any(map(alive, workers)) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not any(map(alive, workers)), "workers outlived the gateway process"
        finally:
            for pid in filter(alive, workers):  # leave no orphan behind if they did
                os.kill(pid, signal.SIGKILL)
    # The port is free again: a restart serves.
    with running(command[:-2]) as restarted:
        wait_healthy(f"http://127.0.0.1:{port}", restarted)


async def test_every_default_public_path_is_a_served_route() -> None:
    """A path listed open by default but not served would open silently once a route appears."""
    async with running_gateway() as url, httpx.AsyncClient(base_url=url) as client:
        for path in Settings().auth_public_paths:
            reply = await client.get(path)
            assert reply.status_code != 404, (path, reply.text)


def stream_in_thread(url: str, received: list[str], started: threading.Event) -> threading.Thread:
    def read() -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        with contextlib.suppress(httpx.HTTPError), httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=20) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    received.append(line[6:])
                    started.set()

    thread = threading.Thread(target=read)
    thread.start()
    return thread


@pytest.mark.parametrize("how", ["SIGINT twice", "SIGTERM twice", "parent killed"])
def test_a_second_signal_never_cuts_the_graceful_shutdown_short(tmp_path: Path, how: str) -> None:
    """A stream running when the gateway is told to stop ends whole within the grace, however
    many stop signals follow: Ctrl-C plus the parent's forwarded SIGTERM, or the kernel's
    parent-death SIGTERM, which comes once per thread of the dying parent."""
    with running([sys.executable, "-m", "tests.fakes", "openai", "--tokens", "20", "--pace", "0.1"]) as fake:
        assert fake.stdout is not None
        ready = fake.stdout.readline().split()
        assert ready[:1] == ["READY"], ready
        config = write(tmp_path / "g.toml", OK + f'[[backends]]\nname = "f"\nbase_url = "{ready[1]}/v1"\ndefault = true\n')
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        workers = ["--workers", "2"] if how == "parent killed" else []
        with running([sys.executable, "-m", "proxy", "serve", "--config", str(config), "--bind", f"127.0.0.1:{port}",
                      *workers]) as gateway:
            wait_healthy(url, gateway)
            received: list[str] = []
            started = threading.Event()
            reader = stream_in_thread(url, received, started)
            assert started.wait(10)
            if how == "parent killed":
                gateway.kill()
            else:
                signum = signal.SIGINT if how == "SIGINT twice" else signal.SIGTERM
                gateway.send_signal(signum)
                time.sleep(0.2)
                gateway.send_signal(signum)
            reader.join(15)
    assert received[-1] == "[DONE]", received
    assert "".join(json.loads(r)["choices"][0]["delta"].get("content") or "" for r in received[:-1] if json.loads(r)["choices"])


def spawned_workers(parent: int) -> set[int]:
    found = set()
    for pid in children_of(parent):
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes() and alive(pid):
                found.add(pid)
    return found


def wait_for_workers(parent: subprocess.Popen[str], count: int, not_among: Collection[int] = ()) -> set[int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert parent.poll() is None, parent.communicate()[0]
        workers = spawned_workers(parent.pid)
        if len(workers) == count and workers.isdisjoint(not_among):
            return workers
        time.sleep(0.1)
    raise AssertionError(f"never {count} workers besides {not_among}: {spawned_workers(parent.pid)}")


def test_a_worker_that_dies_is_replaced_and_the_gateway_stops_cleanly_after(tmp_path: Path) -> None:
    """The OOM killer (or a crash) taking one of `--workers N` must not leave the port with
    fewer workers for the rest of the process's life, nor unnoticed."""
    config = write(tmp_path / "ok.toml", OK)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running([sys.executable, "-m", "proxy", "serve", "--config", str(config), "--bind", f"127.0.0.1:{port}",
                  "--workers", "2"]) as parent:
        wait_healthy(url, parent)
        first = wait_for_workers(parent, 2)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        wait_for_workers(parent, 2, not_among={victim})
        wait_healthy(url, parent)
        parent.send_signal(signal.SIGTERM)
        output = parent.communicate(timeout=20)[0]
    assert parent.returncode == 0, output
    deaths = [json.loads(line) for line in output.splitlines() if line.startswith("{") and "SIGKILL" in line]
    assert len(deaths) == 1 and deaths[0]["level"] == "error", output
    assert f"pid {victim}" in deaths[0]["msg"] and "starting another" in deaths[0]["msg"], deaths


def test_workers_that_keep_dying_stop_the_gateway_with_a_failure_status(tmp_path: Path) -> None:
    """Exit status 0 would tell systemd (Restart=on-failure) that the gateway stopped on purpose:
    it would stay down with its port closed."""
    config = write(tmp_path / "ok.toml", OK)
    port = free_port()
    with running([sys.executable, "-m", "proxy", "serve", "--config", str(config), "--bind", f"127.0.0.1:{port}",
                  "--workers", "2"]) as parent:
        deadline = time.monotonic() + 60
        while parent.poll() is None and time.monotonic() < deadline:
            for pid in spawned_workers(parent.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        output = parent.communicate(timeout=20)[0]
    assert parent.returncode == 1, output
    assert "died within" in output and "stopping" in output, output
    with socket.socket() as probe:  # the port is closed: nothing serves there any more
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_workers_refuse_new_connections_at_once_while_they_finish_their_streams(tmp_path: Path) -> None:
    """Once told to stop, `--workers N` must refuse a new connection (a load balancer or client
    then turns to another instance) rather than leave it queued, unanswered, on a port the
    parent still held open until the last stream ended."""
    with running([sys.executable, "-m", "tests.fakes", "openai", "--tokens", "80", "--pace", "0.1"]) as fake:
        assert fake.stdout is not None
        ready = fake.stdout.readline().split()
        config = write(tmp_path / "g.toml", OK + f'[[backends]]\nname = "f"\nbase_url = "{ready[1]}/v1"\ndefault = true\n')
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with running([sys.executable, "-m", "proxy", "serve", "--config", str(config), "--bind", f"127.0.0.1:{port}",
                      "--workers", "2"]) as gateway:
            wait_healthy(url, gateway)
            received: list[str] = []
            started = threading.Event()
            reader = stream_in_thread(url, received, started)
            assert started.wait(10)
            gateway.send_signal(signal.SIGTERM)
            # The 8 s stream holds the gateway for its whole 5 s grace: probing for 4 s still sees
            # it serving, with room for a loaded machine's slow signal delivery.
            deadline = time.monotonic() + 4
            refused = False
            while not refused and time.monotonic() < deadline:
                with socket.socket() as probe:
                    refused = probe.connect_ex(("127.0.0.1", port)) != 0
                time.sleep(0.05)
            assert gateway.poll() is None, "the gateway had already stopped: nothing was in flight"
            assert refused, "a new connection was taken while the gateway was stopping"
            reader.join(15)
            assert gateway.wait(15) == 0
    assert received, received


def test_replica_failovers_add_up_across_workers_and_never_go_down_between_scrapes(tmp_path: Path) -> None:
    """With `--workers N` a scrape reaches one worker; each used to report its own failovers,
    so the counter jumped between workers' counts, and Prometheus read every drop as a reset."""
    with running([sys.executable, "-m", "tests.fakes", "openai", "--tokens", "2"]) as fake:
        assert fake.stdout is not None
        live = fake.stdout.readline().split()[1]
        dead = f"http://127.0.0.1:{refusing_port()}"  # refuses: each worker moves its first request off it
        config = write(tmp_path / "g.toml", OK + f'[[backends]]\nname = "f"\nbase_url = ["{dead}/v1", "{live}/v1"]\n'
                                                 "default = true\n")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with running([sys.executable, "-m", "proxy", "serve", "--config", str(config), "--bind", f"127.0.0.1:{port}",
                      "--workers", "2"]) as gateway:
            wait_healthy(url, gateway)
            moved = 0
            for _ in range(60):  # fresh connections, until both workers have left the dead replica
                reply = httpx.post(f"{url}/v1/chat/completions", timeout=10, headers={"connection": "close"},
                                   json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
                assert reply.status_code == 200, reply.text
                scraped = [_failovers(httpx.get(f"{url}/metrics", headers={"connection": "close"}).text, dead)
                           for _ in range(6)]
                assert scraped == sorted(scraped), scraped  # never down
                moved = scraped[-1]
                if moved >= 2:
                    break
            assert moved >= 2, "one worker answered every request"


def _failovers(metrics: str, replica: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics):
        if family.name == "llm_proxy_backend_replica_failovers":
            return sum(s.value for s in family.samples if s.name.endswith("_total") and s.labels["replica"] == f"{replica}/v1")
    raise AssertionError(metrics)


def test_a_longer_grace_lets_the_streams_in_flight_finish_whole(tmp_path: Path) -> None:
    """5 s cut most answers a deploy's SIGTERM found streaming (an LLM answer takes tens of
    seconds); `shutdown_grace_seconds` gives them the time they need."""
    with running([sys.executable, "-m", "tests.fakes", "openai", "--tokens", "40", "--pace", "0.2"]) as fake:
        assert fake.stdout is not None
        ready = fake.stdout.readline().split()
        config = write(tmp_path / "g.toml", OK + "shutdown_grace_seconds = 30\n"
                       f'[[backends]]\nname = "f"\nbase_url = "{ready[1]}/v1"\ndefault = true\n')
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with running([sys.executable, "-m", "proxy", "serve", "--config", str(config), "--bind", f"127.0.0.1:{port}"]) as gateway:
            wait_healthy(url, gateway)
            received: list[str] = []
            started = threading.Event()
            reader = stream_in_thread(url, received, started)
            assert started.wait(10)
            gateway.send_signal(signal.SIGTERM)
            reader.join(30)
            assert gateway.wait(15) == 0
    assert received[-1] == "[DONE]", received
    text = "".join(json.loads(r)["choices"][0]["delta"].get("content") or "" for r in received[:-1] if json.loads(r)["choices"])
    assert text.split() == [f"w{i}" for i in range(40)], text


def test_a_backend_key_variable_that_is_not_set_is_warned_of_at_start(tmp_path: Path) -> None:
    """A systemd EnvironmentFile left unread, a variable not exported: the backend would refuse
    every call (a 502 for each client) with nothing at start to say why."""
    config = write(tmp_path / "g.toml", OK + '[[backends]]\nname = "vllm"\nbase_url = "http://127.0.0.1:9/v1"\n'
                                             'api_key_env = "LLM_PROXY_TEST_KEY_NOT_SET"\ndefault = true\n'
                                             '[[backends]]\nname = "set"\nbase_url = "http://127.0.0.1:8/v1"\n'
                                             'api_key_env = "LLM_PROXY_TEST_KEY_SET"\nprefixes = ["x"]\n')
    port = free_port()
    env = {**os.environ, "LLM_PROXY_TEST_KEY_SET": "sk-set"}
    env.pop("LLM_PROXY_TEST_KEY_NOT_SET", None)
    with running([sys.executable, "-m", "proxy", "serve", "--config", str(config), "--bind", f"127.0.0.1:{port}"],
                 env=env) as gateway:
        wait_healthy(f"http://127.0.0.1:{port}", gateway)
        gateway.send_signal(signal.SIGTERM)
        output = gateway.communicate(timeout=15)[0]
    warnings = [json.loads(line)["msg"] for line in output.splitlines()
                if line.startswith("{") and json.loads(line)["level"] == "warning" and "api_key_env" in line]
    assert warnings == ["backend vllm: its api_key_env LLM_PROXY_TEST_KEY_NOT_SET is not set (or empty): "
                        "it is called without a key"], output


@pytest.mark.parametrize(("spelt", "level"), [("warn", "warning"), ("WARN", "warning"), (" Error ", "error")])
def test_log_levels_are_read_as_other_tools_spell_them(spelt: str, level: str) -> None:
    assert load_settings(None, {"LLM_PROXY_LOG_LEVEL": spelt}).log_level == level
