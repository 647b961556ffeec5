"""The `llm-proxy` command."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import logging
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import FrameType

from proxy import __version__
from proxy.config import (
    ConfigError,
    Settings,
    check_data_dir,
    check_workers,
    load_settings,
    parse_bind,
)
from proxy.infra.embedded import (
    EmbeddedNats,
    EmbeddedPostgres,
    EmbeddedServerError,
    default_data_dir,
)
from proxy.infra.logging import configure_logging
from proxy.ingest_command import add_parser as add_ingest_parser
from proxy.ingest_command import check_arguments as check_ingest_arguments
from proxy.ingest_command import run as run_ingest
from proxy.keys_command import add_parser as add_keys_parser
from proxy.keys_command import check_arguments as check_keys_arguments
from proxy.keys_command import run as run_keys
from proxy.workflow import command as worker_command

log = logging.getLogger("llm_proxy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-proxy", description="An LLM gateway for self-hosted models.")
    parser.add_argument("--version", action="version", version=f"llm-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(command: argparse.ArgumentParser) -> None:
        command.add_argument("--config", type=Path, help="TOML configuration file")
        command.add_argument("--data-dir", type=Path, help="where the embedded PostgreSQL and NATS keep their data")

    serve = commands.add_parser("serve", help="run the gateway")
    common(serve)
    serve.add_argument("--bind", help="HOST:PORT to listen on (default 0.0.0.0:8080)")
    serve.add_argument("--workers", type=int, help="worker processes (default 1)")

    migrate = commands.add_parser("migrate", help="apply the database migrations and exit")
    common(migrate)

    add_ingest_parser(commands, common)

    add_keys_parser(commands, common)
    worker_command.add_parser(commands, common)
    return parser


def load(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    changes: dict[str, object] = {}
    if getattr(args, "bind", None):
        changes["host"], changes["port"] = parse_bind(args.bind, "--bind")
    if getattr(args, "workers", None) is not None:
        check_workers(args.workers, "--workers")
        changes["workers"] = args.workers
    if getattr(args, "data_dir", None) is not None:
        changes["data_dir"] = check_data_dir(args.data_dir.expanduser(), "--data-dir")
    return replace(settings, **changes) if changes else settings  # type: ignore[arg-type]


@contextlib.contextmanager
def embedded_servers(settings: Settings, *, with_nats: bool = True, stop_adopted: bool = True) -> Iterator[Settings]:
    """Start PostgreSQL and NATS for whichever URL is not configured; stop them on exit.

    They are started once here, in the parent, and shared by every worker. A server left
    running by a killed earlier run on the same data directory is adopted, never doubled.
    `with_nats=False`: PostgreSQL only. `stop_adopted=False` (one-shot commands such as `keys`):
    a server found running, most likely a live gateway's, is left running on exit, and so is
    one it started while a gateway uses the data directory (that gateway's had stopped: the
    gateway takes it over rather than wait for its own restart, and stops it when it stops).
    `stop_adopted=True` (`serve`): the data directory is marked in use while this runs.
    """
    if not settings.embedded or (settings.database_url and (settings.nats_url or not with_nats)):
        yield settings
        return
    data_dir = settings.data_dir or default_data_dir()
    _make_data_dir(data_dir)
    with contextlib.ExitStack() as stack:
        changes: dict[str, object] = {}
        if stop_adopted:
            stack.enter_context(_gateway_mark(data_dir))
        if not settings.database_url:
            postgres = EmbeddedPostgres(data_dir / "pgdata")
            if stop_adopted:
                stack.enter_context(postgres)
                changes["embedded_pgdata"] = postgres.data_dir
            else:
                postgres.start()
                atexit.unregister(postgres.stop)
                if not postgres.reused:
                    stack.callback(_stop_unless_a_gateway_runs, postgres, data_dir)
            assert postgres.url is not None
            changes["database_url"] = postgres.url
            log.info("embedded PostgreSQL %s at %s", "adopted" if postgres.reused else "started", data_dir / "pgdata")
        if with_nats and not settings.nats_url:
            nats = stack.enter_context(EmbeddedNats(data_dir / "nats"))
            assert nats.url is not None
            changes["nats_url"] = nats.url
            if stop_adopted:
                changes["embedded_nats"] = nats.store_dir
            log.info("embedded NATS on %s", nats.url)
        yield replace(settings, **changes)  # type: ignore[arg-type]


def _make_data_dir(data_dir: Path) -> None:
    """The embedded servers' directory, made now: one the process may not create or write to
    (a system path, another user's) stops start-up naming it, not with a traceback."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        writable = os.access(data_dir, os.W_OK | os.X_OK)
    except OSError as error:
        reason = error.strerror or str(error)
    else:
        if writable:
            return
        reason = "not writable by this user"
    raise ConfigError(
        f"the data directory {data_dir} (`data_dir`, --data-dir, LLM_PROXY_DATA_DIR) cannot be used: {reason}"
    )


# A gateway holds a shared flock on this file of its data directory while it runs; one-shot
# commands test it before they stop a PostgreSQL they started there.
_GATEWAY_MARK = "gateway.lock"


@contextlib.contextmanager
def _gateway_mark(data_dir: Path) -> Iterator[None]:
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / _GATEWAY_MARK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _gateway_runs_on(data_dir: Path) -> bool:
    try:
        fd = os.open(data_dir / _GATEWAY_MARK, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _stop_unless_a_gateway_runs(postgres: EmbeddedPostgres, data_dir: Path) -> None:
    """Asked at exit, not at start: a gateway started meanwhile has adopted the server."""
    if _gateway_runs_on(data_dir):
        log.info("embedded PostgreSQL left running for the gateway using %s", data_dir)
        return
    postgres.stop()


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    worker_command.default_config(args)  # every command reads the gateway's one config file
    try:
        settings = load(args)
    except ConfigError as error:
        print(f"llm-proxy: configuration error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    # SIGTERM unwinds like Ctrl-C, so the embedded servers are stopped on the way out.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        if args.command == "worker":  # connects to the gateway's servers, never starts its own
            return worker_command.run(args, settings)
        if args.command == "keys":
            if status := check_keys_arguments(args):  # before a database is started for nothing
                return status
            with embedded_servers(settings, with_nats=False, stop_adopted=False) as settings:
                return run_keys(args, settings.database_url)
        if args.command == "ingest":  # a running gateway's embedded PostgreSQL is left running
            if status := check_ingest_arguments(args):  # before a database is started for nothing
                return status
            with embedded_servers(settings, with_nats=False, stop_adopted=False) as settings:
                return run_ingest(args, settings)
        if args.command == "migrate":  # like keys: a running gateway's PostgreSQL stays up
            with embedded_servers(settings, with_nats=False, stop_adopted=False) as settings:
                return _migrate(settings)
        if args.command == "serve":
            return _serve(settings)
    except KeyboardInterrupt:
        return 130
    except ConfigError as error:
        print(f"llm-proxy: configuration error: {error}", file=sys.stderr)
        return 2
    except EmbeddedServerError as error:
        print(f"llm-proxy: {error}", file=sys.stderr)
        return 1
    return 0


def _serve(settings: Settings) -> int:
    from proxy.serve import ListenError, close_sockets, open_sockets, run

    # The port first: a taken or wrong address must not start (or adopt, then stop) the
    # embedded servers of a gateway that is still running there.
    try:
        sockets = open_sockets(settings)
    except ListenError as error:
        print(f"llm-proxy: {error}", file=sys.stderr)
        return 2
    try:
        # The gateway keeps what it cannot write to the database there, too (usage spool).
        settings = replace(settings, data_dir=settings.data_dir or default_data_dir())
        with embedded_servers(settings) as settings:
            if not settings.backends:
                log.warning("no backends configured: set LLM_BASE_URL or add [[backends]] to the config")
            for backend in settings.backends:
                # An EnvironmentFile not read, a variable not exported: every call would be refused.
                if backend.api_key_env and not os.environ.get(backend.api_key_env):
                    log.warning("backend %s: its api_key_env %s is not set (or empty): it is called without a key",
                                backend.name, backend.api_key_env)
            log.info("serving on %s with %d worker(s)", settings.bind, settings.workers)
            status = run(settings, sockets)
    finally:
        close_sockets(sockets)
    return status


def _migrate(settings: Settings) -> int:
    import trio

    from proxy.infra.aio import asyncio_bridge
    from proxy.infra.migrations import migrate
    from proxy.infra.postgres import DatabaseError, open_database

    if not settings.database_url:
        print("llm-proxy: no database: set DATABASE_URL or enable the embedded one", file=sys.stderr)
        return 2
    url = settings.database_url

    async def run() -> list[str]:
        async with asyncio_bridge(), open_database(url) as db:
            return await migrate(db)

    try:
        applied = trio.run(run)
    except DatabaseError as error:
        print(f"llm-proxy: database error: {error}", file=sys.stderr)
        return 1
    print("applied: " + ", ".join(applied) if applied else "the schema is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
