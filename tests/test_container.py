"""docker/Dockerfile, built and run with podman.

The image is built once per session (podman's layer cache makes a rebuild
after a source change take seconds).  A container runs it with the host's
network, its DNS pointed at the loopback test DNS server, its state in a named
volume and a configuration file mounted over the image's; the milter protocol
client (tests/milterclient.py) sends it a message over TCP, as Postfix would.

In CI a host where podman cannot build or run the image fails these tests; on
a developer's machine they are skipped with the reason.
"""

from __future__ import annotations

import re
import sqlite3
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

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
    result = podman_tools.podman(*args, check=check, timeout=timeout)
    return (result.stdout + result.stderr).decode(errors="replace")


@pytest.fixture(scope="session")
def image() -> str:
    reason = podman_tools.unavailable()
    if reason is not None:
        if IN_CI:
            pytest.fail(f"the container test needs podman in CI: {reason}")
        pytest.skip(f"cannot build container images here: {reason}")
    try:
        return podman_tools.build(IMAGE, DOCKERFILE)
    except Exception as exc:
        if IN_CI:
            raise
        pytest.skip(f"podman cannot build the image here: {exc}")


class Container:
    """One ``podman run -d`` of the image, with its own name and state volume."""

    def __init__(self, image: str, directory: Path, dns_port: int) -> None:
        self.image = image
        tag = uuid.uuid4().hex[:10]
        self.name = f"dmarcmilter-test-{tag}"
        self.volume = f"dmarcmilter-test-state-{tag}"
        self.port = free_port("127.0.0.1")
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
        return podman("logs", self.name, check=False)

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
    assert re.search(r"msg=stopped rows_written=1 rows_spooled=0 ", logs), logs


def test_the_image_starts_with_its_own_configuration(image: str) -> None:
    """The default command and docker/dmarcmilter.toml, unchanged: the
    milter listens on all of the container's addresses (port 8893 inside a
    network namespace of its own)."""
    name = f"dmarcmilter-test-{uuid.uuid4().hex[:10]}"
    try:
        podman("run", "--detach", "--name", name, "--network", "none", image)
        deadline = time.monotonic() + START_TIMEOUT
        while "listening on" not in (logs := podman("logs", name, check=False)):
            assert time.monotonic() < deadline, logs
            time.sleep(0.2)
        assert f"dmarcmilter {__version__} listening on inet:8893@0.0.0.0" in logs
    finally:
        # Its anonymous state volume goes with it.
        podman("rm", "--force", "--volumes", "--time", "0", name, check=False)


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
