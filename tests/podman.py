"""Build and run container images with podman, for the container and Sendmail tests.

No image registry is reachable from the test machines, so the base image the
Dockerfiles start from (``BASE_IMAGE``) is built locally from a Debian 12
minbase root made with debootstrap, and tagged with the name the Dockerfiles
use.  It carries the host's CA certificates and pip configuration, so that a
build behind an intercepting proxy verifies its downloads as the host does.

Debian 12's podman works here with two settings: the ``runc`` runtime with the
cgroupfs manager (crun cannot set RLIMIT_NOFILE here), and a containers.conf
with ``default_ulimits = []``.  :data:`PODMAN` and :func:`environment` carry
both.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parent.parent
# The FROM of docker/Dockerfile and of the test images.
BASE_IMAGE = "docker.io/library/debian:bookworm-slim"
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
CACHE = Path(os.environ.get("DMARCMILTER_TEST_CACHE", "/var/tmp/dmarcmilter-test-cache"))
CONTAINERS_CONF = "[containers]\ndefault_ulimits = []\n"


def unavailable() -> str | None:
    """Why containers cannot be built here, or None when they can."""
    if os.geteuid() != 0:
        return "building container images needs root"
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not root_is_mount_point():
        # podman unpacks image layers in a private mount namespace, which
        # needs / to be a mount point: a plain chroot is not enough.
        return "podman cannot unpack images here: / is not a mount point (a plain chroot?)"
    return None


def root_is_mount_point() -> bool:
    """Whether / is a mount point.  (os.path.ismount("/") is always true:
    in a chroot, /.. is / too.  The mount table lists only mounts under
    the process's root, so a plain chroot has no entry for /.)"""
    try:
        with open("/proc/self/mountinfo") as fh:
            return any(line.split()[4] == "/" for line in fh if len(line.split()) > 4)
    except OSError:
        return True


def require(what: str) -> None:
    """Fail ``what`` in CI when containers cannot run (a CI machine must run
    them), skip it elsewhere.  A plain chroot skips even in CI: podman
    cannot unpack images there at all, and a chroot is how the bare-machine
    check (../shared/tools/fresh-root.sh) runs the suite, not a CI machine."""
    reason = unavailable()
    if reason is None:
        return
    if IN_CI and root_is_mount_point():
        pytest.fail(f"{what} needs podman in CI: {reason}")
    pytest.skip(f"containers cannot run here: {reason}")


def environment() -> dict[str, str]:
    CACHE.mkdir(parents=True, exist_ok=True)
    conf = CACHE / "containers.conf"
    if not conf.exists() or conf.read_text() != CONTAINERS_CONF:
        conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(
    *args: str, check: bool = True, timeout: float = 600, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(
        [*PODMAN, *args],
        env=environment(),
        capture_output=True,
        timeout=timeout,
        input=input,
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"podman {' '.join(args[:3])} failed ({result.returncode}):\n"
            + result.stdout.decode(errors="replace")[-3000:]
            + result.stderr.decode(errors="replace")[-3000:]
        )
    return result


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def _debian_mirror() -> str:
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        match = re.search(r"^URIs:\s*(\S+)", path.read_text(), re.MULTILINE)
        if match:
            return match.group(1)
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        match = re.search(r"^deb\s+(\S+)", legacy.read_text(), re.MULTILINE)
        if match:
            return match.group(1)
    return "http://deb.debian.org/debian"


def ensure_base_image() -> str:
    """Build BASE_IMAGE from a debootstrap root unless it exists; return its name.

    A lock file keeps two test processes from building it at once.
    """
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "base-image.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if image_exists(BASE_IMAGE):
            return BASE_IMAGE
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            root = Path(tmp) / "root"
            subprocess.run(
                ["debootstrap", "--variant=minbase", "bookworm", str(root), _debian_mirror()],
                check=True,
                capture_output=True,
                timeout=1800,
            )
            # The host's trust store and pip set-up, as on the host itself.
            local_cas = Path("/usr/local/share/ca-certificates")
            if local_cas.is_dir():
                shutil.copytree(local_cas, root / local_cas.relative_to("/"), dirs_exist_ok=True)
            bundle = Path("/etc/ssl/certs/ca-certificates.crt")
            if bundle.exists():
                (root / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
                shutil.copy(bundle, root / "etc/ssl/certs/ca-certificates.crt")
            if Path("/etc/pip.conf").exists():
                shutil.copy("/etc/pip.conf", root / "etc/pip.conf")
            shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
            (root / "var/cache/apt/archives/partial").mkdir(parents=True)
            tar = subprocess.run(
                ["tar", "-C", str(root), "-c", "."], check=True, capture_output=True
            )
            podman("import", "-", BASE_IMAGE, input=tar.stdout, timeout=600)
        return BASE_IMAGE


def build(
    tag: str,
    dockerfile: Path,
    context: Path = ROOT,
    build_args: Sequence[str] = (),
    docker_format: bool = False,
) -> str:
    """Build an image (the base image first, when missing) and return its tag.
    ``docker_format``: keep HEALTHCHECK, which the OCI image format (podman's
    default) has no field for and drops."""
    ensure_base_image()
    args = ["build", "--network", "host", "-f", str(dockerfile), "-t", tag]
    if docker_format:
        args += ["--format", "docker"]
    for arg in build_args:
        args += ["--build-arg", arg]
    podman(*args, str(context), timeout=1800)
    return tag
