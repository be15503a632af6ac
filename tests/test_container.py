"""docker/Dockerfile, built and run with podman.

The image is built once per session (podman's layer cache makes a rebuild
after a source change take seconds).  A container runs it with the host's
network, its DNS pointed at the loopback test DNS server, its state in a named
volume and a configuration file mounted over the image's; the milter protocol
client (tests/milterclient.py) sends it a message over TCP, as Postfix would.
docker/compose.yaml is brought up with podman-compose, beside the Postfix
image of docker/postfix/, and a message sent to Postfix by SMTP comes out with
the milter's Authentication-Results.

In CI a host where podman (or podman-compose) cannot build or run the images
fails these tests; on a developer's machine they are skipped with the reason.
"""

from __future__ import annotations

import datetime as dt
import email
import email.message
import gzip
import json
import os
import re
import shutil
import smtplib
import sqlite3
import subprocess
import time
import tomllib
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dmarcmilter import __version__
from tests import podman as podman_tools
from tests.conftest import IN_CI
from tests.daemon import merge, toml
from tests.dnsserver import TestDNSServer
from tests.milterclient import MilterClient
from tests.postfixserver import free_port
from tests.signing import dkim_sign, dkim_zone, make_message

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
IMAGE_CONFIG = ROOT / "docker" / "dmarcmilter.toml"
IMAGE = "localhost/dmarcmilter-test-container:latest"
CONFIG_PATH = "/etc/dmarcmilter/dmarcmilter.toml"
STATE_DIR = "/var/lib/dmarcmilter"
START_TIMEOUT = 60.0
# The daemon's own SHUTDOWN_GRACE; `podman stop -t` gives it this long
# before SIGKILL.
STOP_TIMEOUT = 30

ZONE: dict[str, Any] = {
    "example.com": [("A", "192.0.2.80")],
    "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject")],
    "bounce.example.com": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    **dkim_zone("example.com", "s1"),
}


def podman(*args: str, check: bool = True, timeout: float = 120) -> str:
    """podman's standard output (its warnings go to standard error)."""
    result = podman_tools.podman(*args, check=check, timeout=timeout)
    return result.stdout.decode(errors="replace")


def logs(container: str) -> str:
    """A container's output: its standard output and error, as podman logs
    gives them back on its own two."""
    result = podman_tools.podman("logs", container, check=False)
    return (result.stdout + result.stderr).decode(errors="replace")


@pytest.fixture(scope="session")
def image() -> str:
    podman_tools.require("the container test")
    return podman_tools.build(IMAGE, DOCKERFILE, docker_format=True)


class Container:
    """One ``podman run -d`` of the image, with its own name and state volume."""

    def __init__(self, image: str, directory: Path, dns_port: int) -> None:
        self.image = image
        tag = uuid.uuid4().hex[:10]
        self.name = f"dmarcmilter-test-{tag}"
        self.volume = f"dmarcmilter-test-state-{tag}"
        self.port = free_port("127.0.0.1")
        self.metrics_port = free_port("127.0.0.1")
        # The image's own configuration, with the test's DNS and port.  The
        # client address comes from outside the trusted networks, so the
        # message is evaluated.
        shipped = tomllib.loads(IMAGE_CONFIG.read_text())
        self.config = directory / "dmarcmilter.toml"
        self.config.write_text(
            toml(
                merge(
                    shipped,
                    {
                        "authserv_id": "mx.receiver.example",
                        "dns": {
                            "nameservers": ["127.0.0.1"],
                            "port": dns_port,
                            "timeout": 0.5,
                            "budget": 4.0,
                        },
                        "milter": {"socket": f"inet:{self.port}@127.0.0.1"},
                        "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
                    },
                )
            )
        )
        self.config.chmod(0o644)

    def start(self) -> Container:
        podman("volume", "create", self.volume)
        podman(
            "run",
            "--detach",
            "--name",
            self.name,
            "--network",
            "host",
            "--volume",
            f"{self.volume}:{STATE_DIR}",
            "--volume",
            f"{self.config}:{CONFIG_PATH}:ro",
            self.image,
        )
        self.wait_log("listening on")
        return self

    def logs(self) -> str:
        return logs(self.name)

    def wait_log(self, text: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.logs():
                return
            if self.state("{{.State.Running}}") == "false":
                break
            time.sleep(0.2)
        raise AssertionError(f"{text!r} not logged by {self.name}:\n{self.logs()}")

    def state(self, template: str) -> str:
        return podman("inspect", "--format", template, self.name, check=False).strip()

    def exec(self, *command: str) -> str:
        return podman("exec", self.name, *command)

    def state_path(self) -> Path:
        return Path(podman("volume", "inspect", "--format", "{{.Mountpoint}}", self.volume).strip())

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name, check=False)
        podman("volume", "rm", "--force", self.volume, check=False)


@pytest.fixture
def run_container(
    image: str, tmp_path: Path, dns_server: TestDNSServer
) -> Iterator[Callable[[], Container]]:
    dns_server.set_zone(ZONE)
    containers: list[Container] = []

    def start() -> Container:
        directory = tmp_path / f"c{len(containers)}"
        directory.mkdir()
        container = Container(image, directory, dns_server.port)
        containers.append(container)
        return container.start()

    yield start
    for container in containers:
        container.remove()


def send_signed(container: Container, queue_id: str) -> str:
    """One DKIM-signed message from example.com, from an SPF-authorised
    address; the value of the Authentication-Results field added."""
    message = dkim_sign(make_message(from_="alice@example.com"), "example.com", "s1")
    client = MilterClient(("127.0.0.1", container.port))
    try:
        client.negotiate()
        client.connect("mx.sender.example", "192.0.2.1")
        client.helo("mx.sender.example")
        eom = client.send_message(
            message,
            sender="b@bounce.example.com",
            recipients=["user@receiver.example"],
            macros_mail={"i": queue_id},
            macros_eom={"i": queue_id},
        )
        client.quit()
    finally:
        client.close()
    assert eom.reply.kind == "continue"
    (added,) = [
        m for m in eom.modifications if m.kind == "insheader" and m.name == "Authentication-Results"
    ]
    assert added.value is not None
    return added.value


def history_rows(state: Path, timeout: float = 15.0) -> list[tuple[Any, ...]]:
    """The rows of the container's history, once there are any."""
    deadline = time.monotonic() + timeout
    path = state / "history.sqlite3"
    while time.monotonic() < deadline:
        if path.exists():
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
                rows = conn.execute(
                    "SELECT queue_id, header_from_domain, dmarc_result FROM messages"
                ).fetchall()
            if rows:
                return rows
        time.sleep(0.2)
    raise AssertionError(f"no history rows in {path}")


def test_the_container_answers_a_milter_session(run_container: Callable[[], Container]) -> None:
    container = run_container()
    value = send_signed(container, "CTR0001")
    assert value.startswith(" mx.receiver.example;")
    assert "dkim=pass header.d=example.com header.s=s1" in value
    assert "spf=pass smtp.mailfrom=bounce.example.com" in value
    assert value.rstrip().endswith("dmarc=pass policy.dmarc=reject header.from=example.com")
    # The history went to the state volume, written by the service user.
    state = container.state_path()
    assert history_rows(state) == [("CTR0001", "example.com", "pass")]
    assert (state / "history.sqlite3").stat().st_uid != 0


def test_the_container_runs_as_the_dmarcmilter_user(
    run_container: Callable[[], Container],
) -> None:
    container = run_container()
    status = container.exec("cat", "/proc/1/status")
    (uids,) = re.findall(r"^Uid:\s+(.*)$", status, re.MULTILINE)
    real, effective, saved, filesystem = uids.split()
    assert real == effective == saved == filesystem != "0"
    assert container.exec("getent", "passwd", real).split(":")[0] == "dmarcmilter"
    cmdline = container.exec("cat", "/proc/1/cmdline").split("\0")
    assert cmdline[-4:-1] == ["run", "--config", CONFIG_PATH]


def test_sigterm_stops_the_container_cleanly(run_container: Callable[[], Container]) -> None:
    container = run_container()
    send_signed(container, "CTR0002")
    started = time.monotonic()
    podman("stop", "--time", str(STOP_TIMEOUT), container.name, timeout=STOP_TIMEOUT + 30)
    elapsed = time.monotonic() - started
    assert container.state("{{.State.ExitCode}}") == "0"
    # Well inside the timeout, so not a SIGKILL; the row was flushed first.
    assert elapsed < STOP_TIMEOUT - 5
    logs = container.logs()
    assert 'msg="stopping: waiting for messages in progress"' in logs
    assert re.search(
        r"msg=stopped rows_written=1 rows_replayed=0 rows_unjournaled=0 rows_lost=0 ", logs
    ), logs


def test_the_image_starts_with_its_own_configuration(image: str) -> None:
    """The default command and docker/dmarcmilter.toml, unchanged: the
    milter listens on all of the container's addresses (port 8893 inside a
    network namespace of its own)."""
    name = f"dmarcmilter-test-{uuid.uuid4().hex[:10]}"
    try:
        podman("run", "--detach", "--name", name, "--network", "none", image)
        deadline = time.monotonic() + START_TIMEOUT
        while "listening on" not in (output := logs(name)):
            assert time.monotonic() < deadline, output
            time.sleep(0.2)
        assert f"dmarcmilter {__version__} listening on inet:8893@0.0.0.0" in output
        # The image's HEALTHCHECK, as the shipped configuration sets it up.
        assert healthcheck(name) == 0
    finally:
        # Its anonymous state volume goes with it.
        podman("rm", "--force", "--volumes", "--time", "0", name, check=False)


def healthcheck(container: str) -> int:
    """``podman healthcheck run``: 0 healthy, 1 unhealthy."""
    return podman_tools.podman("healthcheck", "run", container, check=False).returncode


def test_the_healthcheck_follows_the_milter(run_container: Callable[[], Container]) -> None:
    """HEALTHCHECK asks /health on the port the mounted configuration sets;
    /metrics counts the message."""
    container = run_container()
    assert healthcheck(container.name) == 0
    send_signed(container, "CTR0003")
    base = f"http://127.0.0.1:{container.metrics_port}"
    with urllib.request.urlopen(f"{base}/health", timeout=10) as answer:
        health = json.loads(answer.read())
    assert (health["status"], health["milter_socket_served"]) == ("ok", True)
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    assert "\ndmarcmilter_messages_evaluated_total 1.0\n" in text
    assert '\ndmarcmilter_dmarc_results_total{result="pass"} 1.0\n' in text


def test_the_runtime_image_has_no_compiler(image: str) -> None:
    packages = podman(
        "run", "--rm", "--entrypoint", "dpkg-query", image, "--show", "--showformat=${Package}\\n"
    ).split()
    assert "libmilter1.0.1" in packages
    assert [p for p in packages if p.endswith("-dev")] == []
    assert [p for p in packages if re.fullmatch(r"(gcc|g\+\+|cpp|clang)(-[0-9.]+)?", p)] == []
    found = podman(
        "run",
        "--rm",
        "--entrypoint",
        "/bin/sh",
        image,
        "-c",
        "command -v gcc cc c99 cpp clang; true",
    )
    assert found.strip() == ""
    assert podman("run", "--rm", image, "--version").strip() == f"dmarcmilter {__version__}"


# -- docker/compose.yaml, brought up with podman-compose ---------------------------

COMPOSE = ROOT / "docker" / "compose.yaml"
POSTFIX_IMAGE = "localhost/dmarcmilter-test-postfix:latest"
# podman-compose runs plain `podman`: the runtime settings go in its
# containers.conf.
COMPOSE_CONTAINERS_CONF = (
    podman_tools.CONTAINERS_CONF + '\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n'
)


@pytest.fixture(scope="session")
def postfix_image(image: str) -> str:
    """The Postfix image of the compose file, once podman-compose is known
    to be there."""
    if shutil.which("podman-compose") is None:
        if IN_CI:
            pytest.fail("the compose test needs podman-compose in CI")
        pytest.skip("podman-compose is not installed")
    return podman_tools.build(
        POSTFIX_IMAGE,
        ROOT / "docker" / "postfix" / "Dockerfile",
        context=ROOT / "docker" / "postfix",
    )


class ComposeProject:
    """docker/compose.yaml under a project name of its own, with the test
    images, Postfix published on a free loopback port, and the configuration
    the test writes beside it (the compose file mounts ./dmarcmilter.toml)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.name = f"dmtest{uuid.uuid4().hex[:10]}"
        self.network = f"{self.name}_default"
        self.smtp_port = free_port("127.0.0.1")
        document = yaml.safe_load(COMPOSE.read_text())
        services = document["services"]
        for name in ("dmarcmilter", "report"):
            services[name].pop("build", None)
            services[name]["image"] = IMAGE
        services["postfix"].pop("build")
        services["postfix"]["image"] = POSTFIX_IMAGE
        services["postfix"]["ports"] = [f"127.0.0.1:{self.smtp_port}:25"]
        self.file = directory / "compose.yaml"
        self.file.write_text(yaml.safe_dump(document))
        conf = podman_tools.CACHE / "containers-compose.conf"
        if not conf.exists() or conf.read_text() != COMPOSE_CONTAINERS_CONF:
            conf.write_text(COMPOSE_CONTAINERS_CONF)
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def create_network(self) -> str:
        """The project's network, made before compose would make it, so that
        its gateway (the host, as the containers see it) is known first."""
        podman("network", "create", self.network)
        return podman(
            "network", "inspect", "--format", "{{range .Subnets}}{{.Gateway}}{{end}}", self.network
        ).strip()

    def compose(self, *args: str, timeout: float = 300) -> str:
        result = subprocess.run(
            ["podman-compose", "-p", self.name, "-f", str(self.file), *args],
            env=self.env,
            capture_output=True,
            timeout=timeout,
        )
        output = (result.stdout + result.stderr).decode(errors="replace")
        assert result.returncode == 0, output[-4000:]
        return output

    def container(self, service: str) -> str:
        names = podman(
            "ps",
            "--all",
            "--format",
            "{{.Names}}",
            "--filter",
            f"label=com.docker.compose.project={self.name}",
            "--filter",
            f"label=com.docker.compose.service={service}",
        ).split()
        assert len(names) == 1, names
        return names[0]

    def volume_path(self) -> Path:
        (volume,) = podman(
            "volume",
            "ls",
            "--format",
            "{{.Name}}",
            "--filter",
            f"label=com.docker.compose.project={self.name}",
        ).split()
        return Path(podman("volume", "inspect", "--format", "{{.Mountpoint}}", volume).strip())

    def remove(self) -> None:
        subprocess.run(
            ["podman-compose", "-p", self.name, "-f", str(self.file), "down", "-v"],
            env=self.env,
            capture_output=True,
            timeout=120,
            check=False,
        )
        label = f"label=com.docker.compose.project={self.name}"
        containers = podman("ps", "--all", "--quiet", "--filter", label, check=False).split()
        if containers:
            podman("rm", "--force", "--time", "0", *containers, check=False)
        volumes = podman("volume", "ls", "--quiet", "--filter", label, check=False).split()
        if volumes:
            podman("volume", "rm", "--force", *volumes, check=False)
        podman("network", "rm", "--force", self.network, check=False)


@pytest.fixture
def compose_project(postfix_image: str, tmp_path: Path) -> Iterator[ComposeProject]:
    project = ComposeProject(tmp_path)
    yield project
    project.remove()


def test_postfix_in_compose_passes_mail_through_the_milter(
    compose_project: ComposeProject,
) -> None:
    """`compose up` of the sidecar: an SMTP message to Postfix comes out with
    dmarcmilter's Authentication-Results, and the report job reads the
    milter's history from the shared volume."""
    project = compose_project
    gateway = project.create_network()
    # The containers reach the host at their network's gateway; the bridge
    # that carries that address exists only once a container runs, so the
    # server listens on every address.
    dns = TestDNSServer(host="0.0.0.0").start()
    try:
        dns.set_zone(
            {
                **ZONE,
                "_dmarc.example.com": [
                    ("TXT", "v=DMARC1; p=reject; rua=mailto:dmarc-reports@example.com")
                ],
                # Postfix sees the test's SMTP client at the gateway.
                "bounce.example.com": [("TXT", f"v=spf1 ip4:{gateway} -all")],
            }
        )
        shipped = tomllib.loads(IMAGE_CONFIG.read_text())
        config = merge(
            shipped,
            {
                "authserv_id": "mx.example.test",
                "dns": {"nameservers": [gateway], "port": dns.port, "timeout": 0.5, "budget": 4.0},
                "report": {"org_name": "Example Receiver", "from_address": "dmarc@example.test"},
            },
        )
        (project.directory / "dmarcmilter.toml").write_text(toml(config))
        (project.directory / "dmarcmilter.toml").chmod(0o644)

        project.compose("up", "-d", "dmarcmilter", "postfix")
        wait_for_log(project.container("dmarcmilter"), "listening on")
        wait_for_log(project.container("postfix"), "daemon started")

        message = dkim_sign(make_message(from_="alice@example.com"), "example.com", "s1")
        forged = b"Authentication-Results: mx.example.test; dmarc=pass header.from=example.com\r\n"
        with smtplib.SMTP("127.0.0.1", project.smtp_port, timeout=60) as smtp:
            smtp.ehlo("mx.sender.example")
            smtp.sendmail("b@bounce.example.com", ["root@mx.example.test"], forged + message)

        delivered = read_mailbox(project.container("postfix"))
        results = [str(v) for v in delivered.get_all("Authentication-Results", [])]
        # Ours, in place of the forged one.
        (value,) = results
        value = " ".join(value.split())
        assert value.startswith("mx.example.test;")
        assert "dkim=pass header.d=example.com header.s=s1" in value
        assert "spf=pass smtp.mailfrom=bounce.example.com" in value
        assert value.endswith("dmarc=pass policy.dmarc=reject header.from=example.com")

        # The report job: the same image, configuration and volume.
        # A finished period that holds the message.
        time.sleep(1.1)
        now = dt.datetime.now(dt.UTC).replace(microsecond=0, tzinfo=None)
        output = project.compose(
            "run", "--rm", "--no-deps", "report",
            "report", "--config", CONFIG_PATH,
            "--since", (now - dt.timedelta(hours=1)).isoformat(),
            "--until", now.isoformat(),
            "--dry-run", f"{STATE_DIR}/dry-run", "--verbose",
        )  # fmt: skip
        reports = list((project.volume_path() / "dry-run").glob("*.xml.gz"))
        assert len(reports) == 1, output
        (report,) = reports
        xml = gzip.decompress(report.read_bytes()).decode()
        assert "<domain>example.com</domain>" in xml, output
        assert f"<source_ip>{gateway}</source_ip>" in xml
    finally:
        dns.stop()


def wait_for_log(container: str, text: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while text not in (output := logs(container)):
        assert time.monotonic() < deadline, output
        time.sleep(0.2)


def read_mailbox(container: str, timeout: float = 60.0) -> email.message.Message:
    """The one message delivered to root in the Postfix container."""
    deadline = time.monotonic() + timeout
    while True:
        mbox = podman_tools.podman("exec", container, "cat", "/var/mail/root", check=False)
        if mbox.returncode == 0 and mbox.stdout:
            break
        assert time.monotonic() < deadline, logs(container)
        time.sleep(0.3)
    # An mbox of one message: the "From " line, then the message.
    _, _, message = mbox.stdout.partition(b"\n")
    return email.message_from_bytes(message)
