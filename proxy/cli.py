"""The `llm-proxy` command."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from proxy import __version__
from proxy.config import ConfigError, Settings, load_settings, parse_bind
from proxy.infra.logging import configure_logging

log = logging.getLogger("llm_proxy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-proxy", description="An LLM gateway for self-hosted models.")
    parser.add_argument("--version", action="version", version=f"llm-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", type=Path, help="TOML configuration file")
    serve.add_argument("--bind", help="HOST:PORT to listen on (default 0.0.0.0:8080)")
    serve.add_argument("--workers", type=int, help="worker processes (default 1)")
    return parser


def load(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    changes: dict[str, object] = {}
    if getattr(args, "bind", None):
        changes["host"], changes["port"] = parse_bind(args.bind, "--bind")
    if getattr(args, "workers", None) is not None:
        if args.workers < 1:
            raise ConfigError("`--workers` must be at least 1")
        changes["workers"] = args.workers
    return replace(settings, **changes) if changes else settings  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load(args)
    except ConfigError as error:
        print(f"llm-proxy: configuration error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if args.command == "serve":
        from proxy.serve import run

        if not settings.backends:
            log.warning("no backends configured: set LLM_BASE_URL or add [[backends]] to the config")
        log.info("serving on %s with %d worker(s)", settings.bind, settings.workers)
        run(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
