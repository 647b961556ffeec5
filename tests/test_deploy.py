"""The systemd units in deploy/ start commands the CLI accepts (they drift silently otherwise)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from proxy.cli import build_parser
from proxy.config import WorkflowSettings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def exec_start(unit: Path) -> list[str]:
    [line] = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    argv = shlex.split(line.removeprefix("ExecStart="))
    return argv[argv.index("llm-proxy") + 1 :]


@pytest.mark.parametrize("unit", sorted(DEPLOY.glob("*.service")), ids=lambda path: path.name)
def test_the_unit_runs_a_command_the_cli_accepts(unit: Path) -> None:
    argv = [arg.replace("%i", "0123abcd") for arg in exec_start(unit)]
    args = build_parser().parse_args(argv)
    assert args.command in ("serve", "worker")


def test_the_gateway_unit_keeps_its_embedded_servers_in_its_state_directory() -> None:
    text = (DEPLOY / "llm-proxy.service").read_text()
    assert "StateDirectory=llm-proxy" in text and "LLM_PROXY_DATA_DIR=/var/lib/llm-proxy" in text
    assert "KillMode=mixed" in text  # SIGTERM to the gateway alone: it stops the servers in order


def test_the_job_unit_may_start_once_more_than_a_job_may_run() -> None:
    # The start after the last run allowed fails the run; were systemd to refuse that start,
    # the client of a job that kills its worker would wait out the silence deadline for a 504.
    [line] = [line for line in (DEPLOY / "llm-proxy-job@.service").read_text().splitlines()
              if line.startswith("StartLimitBurst=")]
    assert int(line.removeprefix("StartLimitBurst=")) == WorkflowSettings().max_deliver + 1


@pytest.mark.parametrize("unit", sorted(DEPLOY.glob("*.service")), ids=lambda path: path.name)
def test_every_unit_can_run_llm_proxy_from_a_virtualenv_under_home(unit: Path) -> None:
    # deploy/README.md says to point ExecStart at a virtualenv's bin/llm-proxy; `ProtectHome=yes`
    # (or `tmpfs`) hides /home from the unit, and a job unit so made failed with 203/EXEC.
    settings = dict(line.split("=", 1) for line in unit.read_text().splitlines() if "=" in line and not line.startswith("#"))
    assert settings.get("ProtectHome", "no") in ("no", "read-only")


def test_the_documented_keys_command_reads_the_database_the_gateway_unit_uses() -> None:
    # It named the data directory alone: with DATABASE_URL in the unit's environment file (or
    # `database_url` in its config), `keys create` started an embedded PostgreSQL of its own and
    # printed a key the gateway never saw.
    unit = (DEPLOY / "llm-proxy.service").read_text().splitlines()
    [environment] = [line.removeprefix("EnvironmentFile=").lstrip("-") for line in unit if line.startswith("EnvironmentFile=")]
    serve = exec_start(DEPLOY / "llm-proxy.service")
    config = serve[serve.index("--config") + 1]
    [data_dir] = [line.rsplit("=", 1)[1] for line in unit if line.startswith("Environment=LLM_PROXY_DATA_DIR=")]
    readme = (DEPLOY / "README.md").read_text()
    command = readme[readme.index("- Keys:"):].split("```sh", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    argv = shlex.split(shlex.split(command)[-1])  # the shell's script: `set -a; . FILE; exec llm-proxy keys ...`
    assert f". {environment};" in " ".join(argv)
    keys = argv[argv.index("llm-proxy") + 1:]
    args = build_parser().parse_args(keys)
    assert (args.command, args.keys_command) == ("keys", "create")
    assert str(args.config) == config and str(args.data_dir) == data_dir


def test_the_gateway_unit_listens_where_its_environment_file_says() -> None:
    # `--bind 127.0.0.1:8080` in ExecStart won over LLM_PROXY_BIND in gateway.env (which the unit
    # invites LLM_PROXY_* settings into) and over the config's `bind`: both silently ignored.
    unit = (DEPLOY / "llm-proxy.service").read_text().splitlines()
    assert build_parser().parse_args(exec_start(DEPLOY / "llm-proxy.service")).bind is None
    # systemd: what an EnvironmentFile= sets overrides Environment=, so this is only a default.
    assert "Environment=LLM_PROXY_BIND=127.0.0.1:8080" in unit
    assert any(line.startswith("EnvironmentFile=") for line in unit)


def test_the_install_steps_let_both_units_read_the_config_directory() -> None:
    # The job section made /etc/llm-proxy again for group `llm-proxy` (mode 0750): the gateway's
    # user, of `llm-proxy-gw`, could no longer read its config.toml, and the job's user could not
    # read it either (0640, group llm-proxy-gw).
    readme = (DEPLOY / "README.md").read_text()
    steps = [shlex.split(line, comments=True) for block in readme.split("```sh")[1:]
             for line in block.split("```")[0].splitlines() if line.startswith(("install ", "useradd "))]
    groups = {step[step.index("-g") + 1] for step in steps if step[:2] == ["install", "-d"] and step[-1] == "/etc/llm-proxy"}
    config = [step for step in steps if step[0] == "install" and step[-1] == "/etc/llm-proxy/config.toml"]
    assert len(groups) == 1 and len(config) == 1 and config[0][config[0].index("-g") + 1] in groups
    [group] = groups
    for unit in ("llm-proxy.service", "llm-proxy-job@.service"):
        [user] = [line.removeprefix("User=") for line in (DEPLOY / unit).read_text().splitlines() if line.startswith("User=")]
        [made] = [step for step in steps if step[0] == "useradd" and step[-1] == user]
        assert user == group or ("--groups" in made and group in made[made.index("--groups") + 1].split(","))
