"""The systemd units, the cron file and the README's production install agree,
and systemd accepts the units as written.

The README's "Installing for production" section is the reference: the paths,
the user and the Postfix socket are read from its commands, so that the units
and the documentation cannot drift apart.  ``systemd-analyze verify`` checks
each unit file unmodified (see ``verify_root`` for how).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dmarcmilter.config import load_config

from .conftest import IN_CI

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
UNITS_DIR = ROOT / "systemd"
UNIT_FILES = sorted(p.name for p in UNITS_DIR.iterdir() if p.suffix in (".service", ".timer"))
CRON_FILE = ROOT / "etc" / "dmarcmilter-report.cron"
EXAMPLE_CONFIG = ROOT / "etc" / "dmarcmilter.toml"
# Where Debian's Postfix chroots smtpd; main.cf names the socket relative to it.
POSTFIX_CHROOT = "/var/spool/postfix"
VERIFY_TIMEOUT = 60


def readme_section(title: str) -> str:
    """The text of a README section, with its subsections, up to the next
    heading of its level or above (a "#" line inside a code block is not a
    heading)."""
    lines = README.read_text(encoding="utf-8").splitlines(keepends=True)
    level = len(title.split(" ", 1)[0])
    start = lines.index(f"{title}\n")
    fenced = False
    for end in range(start + 1, len(lines)):
        line = lines[end]
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(rf"#{{1,{level}}} ", line):
            return "".join(lines[start:end])
    return "".join(lines[start:])


def shell_commands(section: str) -> list[str]:
    """The commands of the section's ``sh`` code blocks, one per line (a
    line ending in a backslash goes on on the next, as in the shell)."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands.extend(line.strip() for line in joined.splitlines() if line.strip())
    return commands


@dataclass(frozen=True)
class Install:
    """What the README's production steps install, read from its commands."""

    venv: str
    user: str
    home: str
    config: str
    state_dir_mkdir: str
    config_edits: tuple[tuple[str, str], ...]  # (pattern, replacement) of each sed -i
    socket_dir_mkdir: list[str]
    units_copied: tuple[str, ...]
    units_target: str

    @property
    def binary(self) -> str:
        return f"{self.venv}/bin/dmarcmilter"


def one(commands: list[str], prefix: str) -> list[str]:
    found = [shlex.split(c) for c in commands if c.startswith(prefix)]
    assert len(found) == 1, f"expected one README command starting {prefix!r}, got {found}"
    return found[0]


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def production_install() -> Install:
    # The numbered steps: the text before the first paragraph in bold (the
    # alternatives for other hosts) and before the subsections.
    section = readme_section("## Installing for production")
    commands = shell_commands(re.split(r"\n\*\*|\n### ", section, maxsplit=1)[0])
    venv = one(commands, "python3 -m venv")
    useradd = one(commands, "useradd ")
    config = one(commands, "install -o root")
    edits = []
    for command in commands:
        if command.startswith("sed -i "):
            argv = shlex.split(command)
            assert argv[3] == config[-1], command
            _, pattern, replacement, _ = argv[2].split("|")
            edits.append((pattern, replacement))
    mkdirs = [shlex.split(c) for c in commands if c.startswith("install -d -o")]
    state_dirs = [m for m in mkdirs if m[-1] == option(useradd, "--home-dir")]
    socket_dirs = [m for m in mkdirs if m[-1].startswith(POSTFIX_CHROOT + "/")]
    assert len(state_dirs) == 1 and len(socket_dirs) == 1, mkdirs
    copy = one(commands, "cp systemd/")
    return Install(
        venv=venv[-1],
        user=useradd[-1],
        home=option(useradd, "--home-dir"),
        config=config[-1],
        state_dir_mkdir=state_dirs[0][-1],
        config_edits=tuple(edits),
        socket_dir_mkdir=socket_dirs[0],
        units_copied=tuple(Path(p).name for p in copy[1:-1]),
        units_target=copy[-1],
    )


def unit_entries(name: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of every assignment, in order, duplicates kept
    (systemd allows a key several times, and SystemCallFilter= uses that)."""
    section = ""
    entries = []
    for raw in (UNITS_DIR / name).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_values(name: str, key: str) -> list[str]:
    return [v for _, k, v in unit_entries(name) if k == key]


def services() -> list[str]:
    return [n for n in UNIT_FILES if n.endswith(".service")]


def postfix_socket() -> str:
    """The socket path the README's Postfix section tells dmarcmilter to use."""
    section = readme_section("### With Postfix")
    found = set(re.findall(r'milter\.socket = "unix:([^"]+)"', section))
    assert len(found) == 1, found
    return found.pop()


# -- the units, the cron file and the README agree ---------------------------


def test_units_start_the_installed_binary_with_the_installed_config() -> None:
    install = production_install()
    for name in services():
        (exec_start,) = unit_values(name, "ExecStart")
        argv = shlex.split(exec_start)
        assert argv[0] == install.binary, name
        assert argv[1] in ("run", "report"), name
        assert option(argv, "--config") == install.config, name
    assert {shlex.split(v)[1] for n in services() for v in unit_values(n, "ExecStart")} == {
        "run",
        "report",
    }


def test_units_run_as_the_installed_user_with_its_state_directory() -> None:
    install = production_install()
    assert install.home == install.state_dir_mkdir
    for name in services():
        assert unit_values(name, "User") == [install.user], name
        assert unit_values(name, "Group") == [install.user], name
        (state,) = unit_values(name, "StateDirectory")
        assert f"/var/lib/{state}" == install.home, name


def test_cron_file_runs_the_report_as_the_installed_user() -> None:
    install = production_install()
    jobs = [
        line.split(None, 6)
        for line in CRON_FILE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # The hourly run (both kinds), and the 5-minute failure-report run.
    assert len(jobs) == 2, jobs
    kinds = []
    for *_schedule, user, command in jobs:
        argv = shlex.split(command)
        assert user == install.user
        assert argv[:2] == [install.binary, "report"]
        assert option(argv, "--config") == install.config
        kinds.append(option(argv, "--kind") if "--kind" in argv else "both")
    assert kinds == ["both", "failure"]


def test_readme_copies_every_unit() -> None:
    install = production_install()
    assert sorted(install.units_copied) == UNIT_FILES
    assert install.units_target == "/etc/systemd/system/"
    upgrade = shell_commands(readme_section("### Upgrading"))
    assert one(upgrade, "cp systemd/")[1:-1] == [f"systemd/{n}" for n in install.units_copied]
    # Every unit the README enables, starts or stops is one of ours.
    section = readme_section("## Installing for production")
    named = {
        word
        for command in shell_commands(section)
        if command.startswith("systemctl ")
        for word in shlex.split(command)[2:]
        if not word.startswith("-")
    }
    assert {"dmarcmilter", "dmarcmilter-report.timer"} <= named
    assert {n if "." in n else f"{n}.service" for n in named} <= set(UNIT_FILES)
    assert f"`{CRON_FILE.relative_to(ROOT)}`" in section
    # The documentation the units name is installed.
    docs = {v for n in UNIT_FILES for v in unit_values(n, "Documentation")}
    installed = {
        f"file://{a[-1]}"
        for a in map(shlex.split, shell_commands(section))
        if a[:2] == ["install", "-D"]
    }
    assert docs <= installed


def test_readme_config_edits_give_the_postfix_socket_and_state_dir(tmp_path: Path) -> None:
    """The README's sed lines match the shipped example (each changes exactly
    one line), and the result loads with the socket of the Postfix section."""
    install = production_install()
    text = EXAMPLE_CONFIG.read_text(encoding="utf-8")
    for pattern, replacement in install.config_edits:
        text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        assert count == 1, (pattern, count)
    path = tmp_path / "dmarcmilter.toml"
    path.write_text(text, encoding="utf-8")
    config = load_config(str(path))
    assert config.milter.socket == f"unix:{postfix_socket()}"
    assert config.milter.socket_mode == "0660"
    assert config.paths.state_dir == install.home


def test_postfix_socket_directory_is_writable_by_the_service() -> None:
    """The directory of the README's Postfix socket is the one the install
    creates, owned by the service's user, entered by Postfix through the
    group; the unit lets the service write there despite ProtectSystem=strict;
    main.cf names the same socket from inside Postfix's chroot."""
    install = production_install()
    socket_dir = str(Path(postfix_socket()).parent)
    mkdir = install.socket_dir_mkdir
    assert mkdir[-1] == socket_dir
    assert option(mkdir, "-o") == install.user
    assert option(mkdir, "-g") == install.user
    # The group may enter, not write; others nothing.
    assert int(option(mkdir, "-m"), 8) & 0o7037 == 0o0010
    commands = shell_commands(readme_section("## Installing for production"))
    assert f"usermod -aG {install.user} postfix" in commands
    assert unit_values("dmarcmilter.service", "ProtectSystem") == ["strict"]
    writable = [p for v in unit_values("dmarcmilter.service", "ReadWritePaths") for p in v.split()]
    assert socket_dir in [p.removeprefix("-") for p in writable]
    relative = Path(postfix_socket()).relative_to(POSTFIX_CHROOT)
    assert f"smtpd_milters = unix:{relative}" in readme_section("### With Postfix")


# -- systemd-analyze verify ---------------------------------------------------


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        message = "systemd-analyze not found (Debian package systemd)"
        if IN_CI:
            pytest.fail(f"{message}: CI must verify the units")
        pytest.skip(message)
    return path


def host_unit_dir() -> Path:
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (candidate / "multi-user.target").exists():
            return candidate
    pytest.fail("systemd-analyze is installed but systemd's own units are not")


@pytest.fixture(scope="module")
def verify_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A file system root for ``systemd-analyze verify --root``.

    verify checks that every Exec*= program exists, and this machine has no
    /opt/dmarcmilter.  Rather than edit the units (a copy with another path
    would no longer be the file we ship), they are verified unmodified in a
    root that looks like an installed host: systemd's own units, the units
    copied where the README copies them, an executable where the README
    installs the binary, and the host's copy of each other program the units
    run (/bin/kill).  A program missing on the host stays missing, and
    verify fails on it.
    """
    root = tmp_path_factory.mktemp("verify-root")
    shutil.copytree(host_unit_dir(), root / "usr/lib/systemd/system", symlinks=True)
    install = production_install()
    target = root / install.units_target.strip("/")
    target.mkdir(parents=True)
    for name in UNIT_FILES:
        shutil.copyfile(UNITS_DIR / name, target / name)
    binary = root / install.binary.lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    for name in services():
        for key in ("ExecStart", "ExecReload", "ExecStop", "ExecStartPre", "ExecStartPost"):
            for value in unit_values(name, key):
                program = shlex.split(value.lstrip("-@:+!"))[0]
                if program != install.binary and Path(program).exists():
                    copy = root / program.lstrip("/")
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(program, copy)
    yield root


def verify(root: Path, unit_path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze(), "verify", "--man=no", f"--root={root}", unit_path],
        capture_output=True,
        text=True,
        timeout=VERIFY_TIMEOUT,
        check=False,
    )


@pytest.mark.parametrize("name", UNIT_FILES)
def test_systemd_analyze_verify(verify_root: Path, name: str) -> None:
    """No error and no warning: verify exits 0 even on an unknown key or a
    value it ignores, and prints a line for it, so the output must be empty."""
    install = production_install()
    unit = f"{install.units_target}{name}"
    assert (verify_root / unit.lstrip("/")).read_bytes() == (UNITS_DIR / name).read_bytes()
    result = verify(verify_root, unit)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


@pytest.mark.parametrize(
    ("edit", "complaint"),
    [
        (("Restart=on-failure", "Restart=sometimes"), "Failed to parse service restart"),
        (("TimeoutStopSec=45", "TimeoutStopSecs=45"), "Unknown key"),
        (("/opt/dmarcmilter/bin/dmarcmilter run", "/opt/nowhere/dmarcmilter run"), "executable"),
    ],
)
def test_systemd_analyze_verify_catches_a_broken_unit(
    verify_root: Path, edit: tuple[str, str], complaint: str
) -> None:
    """The root above hides nothing: a bad value, an unknown key and a
    missing program are each reported."""
    text = (UNITS_DIR / "dmarcmilter.service").read_text(encoding="utf-8")
    assert edit[0] in text
    broken = verify_root / "etc/systemd/system/dmarcmilter-broken.service"
    broken.write_text(text.replace(edit[0], edit[1]), encoding="utf-8")
    try:
        result = verify(verify_root, "/etc/systemd/system/dmarcmilter-broken.service")
    finally:
        broken.unlink()
    assert complaint in result.stdout + result.stderr
