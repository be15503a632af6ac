"""docker/compose.yaml: dmarcmilter beside Postfix, with the report job.

The static tests read the compose file, both Dockerfiles, the image's
configuration and Postfix's settings, and check that they agree with each
other: the port the milter listens on is the one Postfix asks and the image
exposes, the volume holds the configured state directory, the report job uses
the same image, configuration and volume.  (tests/test_container.py brings
the file up with podman-compose and sends mail through it.)
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from dmarcmilter.config import load_config, parse_socket
from dmarcmilter.daemon import SHUTDOWN_GRACE
from dmarcmilter.metrics import parse_listen
from tests.podman import BASE_IMAGE

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each stage as (INSTRUCTION, arguments), with
    continuation lines joined and comments dropped."""
    stages: list[list[tuple[str, str]]] = []
    logical = ""
    for line in path.read_text().splitlines():
        if not logical and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        instruction, _, arguments = logical.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), arguments.strip()))
        logical = ""
    return stages


def instruction(stage: list[tuple[str, str]], name: str) -> str:
    (value,) = [arguments for instr, arguments in stage if instr == name]
    return value


def runtime_stage() -> list[tuple[str, str]]:
    return dockerfile_stages(DOCKER / "Dockerfile")[-1]


def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict)
    return document


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Container path -> (source, options) of a service's short-syntax volumes."""
    out = {}
    for entry in service.get("volumes", []):
        source, target, *options = entry.split(":")
        out[target] = (source, ",".join(options))
    return out


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return float(match.group(1))


def postfix_settings() -> dict[str, str]:
    settings = {}
    for line in (DOCKER / "postfix" / "main.cf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def image_command() -> list[str]:
    stage = runtime_stage()
    entrypoint = json.loads(instruction(stage, "ENTRYPOINT"))
    cmd = json.loads(instruction(stage, "CMD"))
    assert isinstance(entrypoint, list) and isinstance(cmd, list)
    return [*entrypoint, *cmd]


def config_path() -> str:
    command = image_command()
    return command[command.index("--config") + 1]


def test_compose_names_the_sidecar_postfix_and_report_services() -> None:
    document = compose()
    assert set(document["services"]) == {"dmarcmilter", "postfix", "report"}
    assert set(document["volumes"]) == {"dmarcmilter-state"}


def test_the_images_are_built_from_the_local_debian_base() -> None:
    services = compose()["services"]
    milter_build = services["dmarcmilter"]["build"]
    assert (DOCKER / milter_build["context"]).resolve() == ROOT
    assert (ROOT / milter_build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    postfix_context = (DOCKER / services["postfix"]["build"]["context"]).resolve()
    assert (postfix_context / "Dockerfile").is_file()
    for dockerfile in (DOCKER / "Dockerfile", postfix_context / "Dockerfile"):
        named: list[str] = []
        for stage in dockerfile_stages(dockerfile):
            base, *alias = instruction(stage, "FROM").split()
            assert base == BASE_IMAGE or base in named, base
            named += alias[1:]
    # The report job runs the image the dmarcmilter service builds.
    assert services["report"]["image"] == services["dmarcmilter"]["image"]
    assert "build" not in services["report"]


def test_the_runtime_installs_only_built_wheels_and_runs_unprivileged() -> None:
    builder, runtime, install, stage = dockerfile_stages(DOCKER / "Dockerfile")
    assert instruction(builder, "FROM").endswith(" AS builder")
    assert instruction(runtime, "FROM").endswith(" AS runtime")
    assert instruction(install, "FROM") == "runtime AS install"
    assert instruction(stage, "FROM") == "runtime"

    def runs(stage: list[tuple[str, str]]) -> str:
        return " ".join(arguments for instr, arguments in stage if instr == "RUN")

    # Nothing that compiles reaches the runtime; the venv comes from the
    # builder's wheels alone.
    for later in (runtime, install, stage):
        assert not re.search(r"\b(gcc|cc|[a-z0-9.+-]+-dev)\b", runs(later))
    assert "pip wheel" in runs(builder)
    assert "--no-index --find-links /wheels" in runs(install)
    assert ["--from=builder", "/wheels", "/wheels"] in [
        a.split() for i, a in install if i == "COPY"
    ]
    assert ["--from=install", "/opt/dmarcmilter", "/opt/dmarcmilter"] in [
        a.split() for i, a in stage if i == "COPY"
    ]
    user = instruction(stage, "USER")
    assert user not in ("root", "0")
    # The user the image creates, as a system account.
    useradd = runs(stage).split("useradd ")[1].split("&&")[0].split()
    assert "--system" in useradd and useradd[-1] == user
    assert instruction(stage, "STOPSIGNAL") == "SIGTERM"
    # The HEALTHCHECK asks /health, with the image's own Python (no curl),
    # on the port of the configuration file the daemon runs with.
    check = instruction(stage, "HEALTHCHECK")
    assert check.split("CMD", 1)[1].split() == [
        '["/opt/dmarcmilter/bin/python",',
        '"-m",',
        '"dmarcmilter.healthcheck",',
        '"/etc/dmarcmilter/dmarcmilter.toml"]',
    ]


def test_the_sidecar_listens_where_postfix_asks_and_the_image_exposes() -> None:
    services = compose()["services"]
    stage = runtime_stage()
    config = load_config(DOCKER / "dmarcmilter.toml")
    spec = parse_socket(config.milter.socket)
    assert spec.family == "inet"
    port = spec.port
    # Every address of the container: the MTA is another container.
    assert spec.address == "0.0.0.0"
    metrics_port = parse_listen(config.metrics.listen)[1]
    assert instruction(stage, "EXPOSE").split() == [str(port), str(metrics_port)]
    assert services["dmarcmilter"]["expose"] == [str(port)]
    # Not published on the host: only the compose network reaches it.
    assert "ports" not in services["dmarcmilter"]
    assert postfix_settings()["smtpd_milters"] == f"inet:dmarcmilter:{port}"
    assert services["postfix"]["depends_on"] == ["dmarcmilter"]
    published = services["postfix"]["ports"]
    assert [p.rsplit(":", 1)[1] for p in published] == ["25"]
    assert instruction(dockerfile_stages(DOCKER / "postfix" / "Dockerfile")[-1], "EXPOSE") == "25"


def test_postfix_uses_the_readme_milter_settings() -> None:
    settings = postfix_settings()
    readme = (ROOT / "README.md").read_text()
    for key in ("milter_protocol", "milter_mail_macros", "milter_default_action"):
        assert f"\n{key} = {settings[key]}\n" in readme, key
    assert settings["non_smtpd_milters"] == "$smtpd_milters"


def test_the_state_volume_and_configuration_are_those_of_the_image() -> None:
    document = compose()
    stage = runtime_stage()
    (volume,) = shlex.split(instruction(stage, "VOLUME"))
    config = load_config(DOCKER / "dmarcmilter.toml")
    assert str(config.effective_state_dir()) == volume
    expected = {
        volume: ("dmarcmilter-state", ""),
        config_path(): ("./dmarcmilter.toml", "ro"),
    }
    for name in ("dmarcmilter", "report"):
        service = document["services"][name]
        assert mounts(service) == expected, name
    assert (DOCKER / "dmarcmilter.toml").is_file()
    # The image carries the same file at the same place.
    copies = [a.split() for i, a in stage if i == "COPY"]
    assert ["docker/dmarcmilter.toml", config_path()] in copies


def test_the_report_job_runs_on_demand_with_the_image_configuration() -> None:
    service = compose()["services"]["report"]
    # A profile: `up` leaves it alone; `compose run --rm report` runs it.
    assert service["profiles"] == ["report"]
    assert service["restart"] == "no"
    assert service["command"][:3] == ["report", "--config", config_path()]
    assert image_command()[-3:] == ["run", "--config", config_path()]


def test_a_stop_gives_the_milter_its_shutdown_grace() -> None:
    service = compose()["services"]["dmarcmilter"]
    assert service["stop_signal"] == instruction(runtime_stage(), "STOPSIGNAL")
    assert seconds(service["stop_grace_period"]) > SHUTDOWN_GRACE


@pytest.mark.parametrize("ignored", [".git", ".venv", "**/__pycache__", "*.egg-info", "state"])
def test_the_build_context_leaves_out_local_state(ignored: str) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignored in patterns
    # Nothing the image needs is left out.
    for needed in ("pyproject.toml", "README.md", "dmarcmilter", "docker"):
        assert needed not in patterns
