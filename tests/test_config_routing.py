"""Configuration loading and model routing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import ConfigError, load_settings
from proxy.domain.errors import GatewayError
from proxy.domain.routing import BackendRoute, Router

CONFIG = """
bind = "127.0.0.1:9000"
[timeouts]
idle = 30
[models]
"gpt-4o" = "qwen3-32b"
[[backends]]
name = "vllm"
base_url = "http://127.0.0.1:8000/v1/"
prefixes = ["qwen3-", "llama-"]
default = true
[[backends]]
name = "coder"
base_url = "http://127.0.0.1:8001/v1"
prefixes = ["qwen3-coder"]
models = ["special"]
timeouts = { first_token = 5 }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "llm-proxy.toml"
    path.write_text(text)
    return path


def test_config_file_with_env_overrides(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, CONFIG), {"LLM_PROXY_BIND": "127.0.0.1:9100"})
    assert (settings.host, settings.port) == ("127.0.0.1", 9100)
    vllm, coder = settings.backends
    assert vllm.base_url == "http://127.0.0.1:8000/v1" and vllm.timeouts.idle == 30
    assert coder.timeouts.first_token == 5 and coder.timeouts.idle == 30
    assert settings.aliases == {"gpt-4o": "qwen3-32b"}


def test_llm_base_url_alone_gives_a_default_backend() -> None:
    settings = load_settings(None, {"LLM_BASE_URL": "http://127.0.0.1:8000/v1"})
    (only,) = settings.backends
    assert only.default and only.kind == "openai" and only.base_url == "http://127.0.0.1:8000/v1"
    assert (settings.host, settings.port) == ("0.0.0.0", 8080)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[[backends]]\nname='a'\nbase_url='http://x'\nprefixs=['a']\n", "backends[0].prefixs"),
        ("[[backends]]\nname='a'\nbase_url='ftp://x'\n", "backends[0].base_url"),
        ("[[backends]]\nname='a'\nkind='grpc'\nbase_url='http://x'\n", "backends[0].kind"),
        ("[timeouts]\nidle=-1\n", "timeouts.idle"),
        ("workers = 'many'\n", "workers"),
        ("bind = 'nope'\n", "bind"),
        ("colour = 'blue'\n", "colour"),
        ("[models]\nx = 3\n", "models.x"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_settings(write(tmp_path, text), {})


def test_cli_reports_config_errors_without_a_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "[[backends]]\nname='a'\nbase_url='http://x'\nprefixs=['a']\n")
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "backends[0].prefixs" in result.stderr
    assert "Traceback" not in result.stderr


def test_longest_prefix_wins_then_exact_then_default() -> None:
    router = Router(
        [
            BackendRoute("vllm", prefixes=("qwen3-",), default=True),
            BackendRoute("coder", prefixes=("qwen3-coder",), models=("special",)),
        ],
        {"gpt-4o": "qwen3-coder-30b"},
    )
    assert router.resolve("qwen3-32b").backend == "vllm"
    assert router.resolve("qwen3-coder-30b").backend == "coder"
    assert router.resolve("special").backend == "coder"
    assert router.resolve("mistral").backend == "vllm"
    alias = router.resolve("gpt-4o")
    assert (alias.backend, alias.upstream_model) == ("coder", "qwen3-coder-30b")


def test_unroutable_model_is_not_found() -> None:
    router = Router([BackendRoute("vllm", prefixes=("qwen3-",))])
    with pytest.raises(GatewayError) as info:
        router.resolve("llama-3")
    assert info.value.status == 404 and info.value.param == "model"
