"""Configuration loading and model routing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ollama
import openai
import pytest

from proxy import cli
from proxy.config import ConfigError, load_settings
from proxy.domain.errors import GatewayError
from proxy.domain.routing import BackendRoute, Router
from tests.fakes import OllamaBackend, OpenAIBackend
from tests.harness import backend, running_gateway

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


def test_llm_base_url_adds_the_default_when_no_configured_backend_is_one(tmp_path: Path) -> None:
    config = write(tmp_path, "[[backends]]\nname = 'ol'\nkind = 'ollama'\nbase_url = 'http://127.0.0.1:9'\n")
    ol, added = load_settings(config, {"LLM_BASE_URL": "http://127.0.0.1:8000/v1/"}).backends
    assert (ol.name, ol.base_url, ol.default) == ("ol", "http://127.0.0.1:9", False)
    assert (added.name, added.kind, added.base_url, added.default) == ("default", "openai", "http://127.0.0.1:8000/v1", True)


def test_readme_documents_every_command_and_environment_variable() -> None:
    """The README's synopsis and override table are how users find these; they had fallen behind."""
    import argparse
    import re

    import proxy.config
    from proxy.cli import build_parser
    from proxy.workflow.command import CONFIG_ENV

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    synopsis = section.split("```", 2)[1]

    def commands(parser: argparse.ArgumentParser, prefix: str) -> dict[str, argparse.ArgumentParser]:
        found = {prefix: parser}
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found |= commands(sub, f"{prefix} {name}")
        return found

    for name, command in commands(build_parser(), "llm-proxy").items():
        assert name in synopsis, name
        options = {o for a in command._actions for o in a.option_strings if o.startswith("--")}
        assert {o for o in options - {"--help", "--version"} if o not in section} == set(), name
    table = readme.split("Environment overrides:", 1)[1].split("\n## ", 1)[0]
    source = Path(proxy.config.__file__).read_text()
    variables = set(re.findall(r'env\.get\("([A-Z_]+)"\)', source)) | {CONFIG_ENV}
    assert {v for v in variables if f"`{v}`" not in table} == set()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[[backends]]\nname='a'\nbase_url='http://x'\nprefixs=['a']\n", "backends[0].prefixs"),
        ("[[backends]]\nname='a'\nbase_url='ftp://x'\n", "backends[0].base_url"),
        ("[[backends]]\nname='a'\nkind='grpc'\nbase_url='http://x'\n", "backends[0].kind"),
        ("[timeouts]\nidle=-1\n", "timeouts.idle"),
        ("workers = 'many'\n", "workers"),
        ("workers = 0\n", "workers"),
        ("workers = 10000\n", "workers"),
        ("[embeddings]\nthreads = 0\n", "embeddings.threads"),
        ("[embeddings]\nthreads = 10000\n", "embeddings.threads"),
        ("bind = 'nope'\n", "bind"),
        ("colour = 'blue'\n", "colour"),
        ("[models]\nx = 3\n", "models.x"),
        (
            "[[backends]]\nname='a'\nbase_url='http://x'\nprefixes=['q-']\n"
            "[[backends]]\nname='b'\nbase_url='http://y'\nprefixes=['q-']\n",
            "backends[1].prefixes",
        ),
        (
            "[[backends]]\nname='a'\nbase_url='http://x'\nmodels=['m']\n"
            "[[backends]]\nname='b'\nbase_url='http://y'\nmodels=['m:latest']\n",
            "backends[1].models",
        ),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_settings(write(tmp_path, text), {})


def test_a_count_out_of_bounds_says_the_bounds(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"`workers` must be from 1 to 256 .*got 10000"):
        load_settings(write(tmp_path, "workers = 10000\n"), {})
    with pytest.raises(ConfigError, match=r"`LLM_PROXY_WORKERS` must be from 1 to 256"):
        load_settings(None, {"LLM_PROXY_WORKERS": "5000"})


def test_ingest_refuses_threads_past_the_bound_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["ingest", "team", str(tmp_path), "--threads", "10000"]) == 2
    assert "--threads must be from 1 to 256, got 10000" in capsys.readouterr().err


def test_serve_reads_its_config_from_llm_proxy_config_when_not_given_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The file's mistake is what is said; ignored, `serve` would have gone on to the (bad)
    # data dir, or served with no backends at all.
    monkeypatch.setenv("LLM_PROXY_CONFIG", str(write(tmp_path, "[[backends]]\nname='a'\nbase_url='http://x'\nprefixs=['a']\n")))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    assert cli.main(["serve", "--data-dir", str(not_a_dir)]) == 2
    assert "backends[0].prefixs" in capsys.readouterr().err


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


def test_a_name_and_its_latest_tag_are_one_model_spelled_as_configured() -> None:
    router = Router(
        [BackendRoute("ollama", models=("llama3.2", "mistral:latest")), BackendRoute("vllm", prefixes=("qwen",))],
        {"chat": "llama3.2:latest"},
    )
    for asked, upstream in [("llama3.2", "llama3.2"), ("llama3.2:latest", "llama3.2"), ("mistral", "mistral:latest"),
                            ("chat", "llama3.2")]:
        route = router.resolve(asked)
        assert (route.backend, route.upstream_model) == ("ollama", upstream)
    with pytest.raises(GatewayError):
        router.resolve("llama3.2:3b")  # another tag is another model


def test_listed_names_route_after_configuration_and_before_the_default() -> None:
    router = Router([
        BackendRoute("vllm", prefixes=("qwen",), default=True),
        BackendRoute("ollama", models=("llama3.2",)),
    ])
    assert router.resolve("mistral").backend == "vllm"  # cached as the default's ...
    router.learn({"mistral:latest": "ollama", "qwen2.5:7b": "ollama", "llama3.2:latest": "vllm"})
    route = router.resolve("mistral")  # ... until a listing says otherwise
    assert (route.backend, route.upstream_model) == ("ollama", "mistral:latest")
    assert router.resolve("qwen2.5:7b").backend == "vllm"  # a configured prefix wins
    assert router.resolve("llama3.2").backend == "ollama"  # so does a configured name
    assert router.backend_of("mistral") == "ollama"
    router.learn({})
    assert router.resolve("mistral").backend == "vllm"


async def test_a_listed_embedding_model_can_be_used_before_anyone_listed_models() -> None:
    ollama_fake = OllamaBackend(models=["nomic-embed-text:latest"])
    openai_fake = OpenAIBackend()
    async with ollama_fake.serve() as ol, openai_fake.serve() as oa, running_gateway(
        backend("oa", oa.url, prefixes=("qwen",)), backend("ol", ol.url, kind="ollama", models=("llama3.2",))
    ) as url:
        async with ollama.AsyncClient(host=url) as client:
            embedded = await client.embed(model="nomic-embed-text", input="hi")
            assert len(embedded.embeddings) == 1 and embedded.embeddings[0]
            with pytest.raises(ollama.ResponseError) as info:
                await client.embed(model="nothing-lists-this", input="hi")
            assert info.value.status_code == 404
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused") as oc:
            reply = await oc.embeddings.create(model="nomic-embed-text:latest", input="hi")
            assert reply.data[0].embedding
    assert [r.model for r in ollama_fake.requests if r.path == "/api/embed"] == ["nomic-embed-text:latest"] * 2


async def test_every_listed_model_can_be_used_even_before_anyone_listed_them() -> None:
    ollama_fake = OllamaBackend(models=["mistral:latest", "llama3.2"])
    openai_fake = OpenAIBackend()
    async with ollama_fake.serve() as ol, openai_fake.serve() as oa, running_gateway(
        backend("oa", oa.url, prefixes=("qwen",)), backend("ol", ol.url, kind="ollama", models=("llama3.2",))
    ) as url:
        async with ollama.AsyncClient(host=url) as client:
            # Nobody has listed models yet: the unknown name makes the gateway look.
            answer = await client.chat(model="mistral", messages=[{"role": "user", "content": "hi"}])
            assert answer.message.content
            answer = await client.chat(model="llama3.2:latest", messages=[{"role": "user", "content": "hi"}])
            assert answer.message.content
            with pytest.raises(ollama.ResponseError) as info:
                await client.chat(model="nothing-lists-this", messages=[{"role": "user", "content": "hi"}])
            assert info.value.status_code == 404
        chats = [r.model for r in ollama_fake.requests if r.path == "/api/chat"]
        assert chats == ["mistral:latest", "llama3.2"]
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused") as oc:
            listed = [m.id async for m in oc.models.list() if m.id.startswith(("mistral", "llama"))]
            assert sorted(listed) == ["llama3.2:latest", "mistral:latest"]  # `llama3.2` as its backend lists it
            for model in listed:
                reply = await oc.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
                assert reply.choices[0].message.content
