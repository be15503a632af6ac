"""The package as it is installed: what the sdist and the wheel hold, the
version it reports, and the one-line error for a missing optional driver."""

from __future__ import annotations

import email
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import dmarcmilter

ROOT = Path(__file__).resolve().parent.parent
# Files of the package that are not Python modules, without which an installed
# dmarcmilter cannot run: the schema migrations (`db upgrade`, and the daemon's
# first start on an empty database) and the type marker.
NEEDED = [
    "dmarcmilter/py.typed",
    "dmarcmilter/history/migrations/env.py",
    "dmarcmilter/history/migrations/script.py.mako",
    "dmarcmilter/history/migrations/versions/0001_initial.py",
    "dmarcmilter/history/migrations/versions/0002_reports.py",
    "dmarcmilter/history/migrations/versions/0003_suppressions.py",
    "dmarcmilter/history/migrations/versions/0004_failure_reports.py",
    "dmarcmilter/history/migrations/versions/0005_mailing_list.py",
]
# An interpreter in which the drivers cannot be imported, as on an install
# without the extras: the import system reports them missing, exactly as it
# does for a module that is not on the path.
BLOCKER = """\
import sys

class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {modules!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _Absent())
"""


def copy_tree(destination: Path) -> Path:
    """The source tree without build products or local state (a clean
    checkout, as the build sees it)."""
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "*.egg-info", "build", "dist", "__pycache__", ".*_cache", "state"
    )
    shutil.copytree(ROOT, destination, ignore=ignore)
    return destination


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """The sdist and the wheel, built offline from a copy of the tree."""
    work = tmp_path_factory.mktemp("build")
    source = copy_tree(work / "src")
    out = work / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel, result.stdout + result.stderr


def test_the_build_prints_no_deprecation_warning(built: tuple[Path, Path, str]) -> None:
    output = built[2]
    assert "Deprecat" not in output and "deprecat" not in output, output


def test_the_wheel_holds_the_migrations_and_declares_the_license(
    built: tuple[Path, Path, str],
) -> None:
    with zipfile.ZipFile(built[1]) as wheel:
        names = set(wheel.namelist())
        for needed in NEEDED:
            assert needed in names, needed
        dist_info = f"dmarcmilter-{dmarcmilter.__version__}.dist-info"
        assert f"{dist_info}/licenses/LICENSE" in names
        metadata = email.message_from_bytes(wheel.read(f"{dist_info}/METADATA"))
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
    assert metadata["Version"] == dmarcmilter.__version__
    assert metadata["License-Expression"] == "MIT"
    assert metadata["License"] is None  # the deprecated free-text field
    assert "dmarcmilter = dmarcmilter.cli:main" in entry_points
    # Test data and development files stay out of what is installed.
    assert not any(name.startswith(("tests/", "bench/")) for name in names)


def test_the_sdist_can_rebuild_the_wheel(built: tuple[Path, Path, str]) -> None:
    with tarfile.open(built[0]) as sdist:
        prefix = f"dmarcmilter-{dmarcmilter.__version__}/"
        names = {name.removeprefix(prefix) for name in sdist.getnames()}
    for needed in [*NEEDED, "pyproject.toml", "README.md", "LICENSE"]:
        assert needed in names, needed


def test_version_is_the_installed_package_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dmarcmilter", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"dmarcmilter {importlib.metadata.version('dmarcmilter')}"
    assert importlib.metadata.version("dmarcmilter") == dmarcmilter.__version__


@pytest.mark.parametrize(
    ("scheme", "module", "extra"),
    [("postgresql", "psycopg", "postgresql"), ("mysql", "pymysql", "mysql")],
)
@pytest.mark.parametrize("command", [["db", "status"], ["db", "upgrade"], ["run"]])
def test_a_missing_driver_is_one_line_naming_the_extra(
    tmp_path: Path, scheme: str, module: str, extra: str, command: list[str]
) -> None:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER.format(modules=(module,)))
    config = tmp_path / "dmarcmilter.toml"
    config.write_text(
        f'[database]\nurl = "{scheme}://dmarc@127.0.0.1:1/dmarc"\n'
        f'[paths]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[milter]\nsocket = "unix:{tmp_path / "milter.sock"}"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "dmarcmilter", *command, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr == (
        f"dmarcmilter {' '.join(command)}: error: database.url needs the database driver "
        f"{module!r}, which is not installed: pip install 'dmarcmilter[{extra}]'\n"
    )


def test_ci_runs_the_readme_test_command() -> None:
    """CI runs exactly what a new user types: the Quick start's test command,
    word for word, as the last command of .ci/run."""
    readme = (ROOT / "README.md").read_text()
    quick_start = readme[readme.index("## Quick start") :].split("\n## ", 1)[0]
    block = quick_start.split("```sh\n", 1)[1].split("```", 1)[0]
    (test_command,) = [
        line.split("#", 1)[0].strip()
        for line in block.splitlines()
        if "test suite" in line.split("#", 1)[-1]
    ]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line.strip() for line in ci if line.strip() and not line.startswith("#")]
    assert commands[-1] == test_command == "./dev.sh test"
    assert os.access(ROOT / ".ci" / "run", os.X_OK) and os.access(ROOT / "dev.sh", os.X_OK)
