"""install.sh, deploy.sh, rollback.sh and validate-deployment.sh, run for real in a temporary root.

The stand-in for systemd is `systemctl` (fake_systemctl.py: no systemd runs this machine), and it
starts the installed unit's ExecStart for real: validation talks to a real exo node on loopback. The
releases deployed are venvs copied into place with `--from-dir` (pip-installing exo would take minutes):
the test venv's interpreter and packages behind symlinks, with a RELEASE file naming them. The default
path, pip, is tested on a tiny wheel.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from nodes import free_ports

DEPLOYMENT = Path(__file__).resolve().parents[2] / "deployment"
Run = subprocess.CompletedProcess[str]
FAKE_SYSTEMCTL = Path(__file__).with_name("fake_systemctl.py")


def make_release(path: Path, name: str, *, broken: bool = False, doctor: bool = True) -> Path:
    """A venv for /opt/exo/venv that runs this checkout's exo; `broken`: one whose exo dies at
    start with a traceback, as a release with a bad import would; not `doctor`: one whose exo has no
    `doctor` command, as releases before it."""
    venv = Path(sys.prefix)
    (path / "bin").mkdir(parents=True)
    (path / "pyvenv.cfg").write_text((venv / "pyvenv.cfg").read_text())
    (path / "lib").symlink_to(venv / "lib")
    (path / "bin" / "python").symlink_to(Path(sys.executable).resolve())  # pyvenv.cfg beside bin/ makes it a venv
    exo = ('echo "Traceback (most recent call last):" >&2; echo "ImportError: broken release" >&2; exit 1'
           if broken else 'exec "$(dirname "$0")/python" -m exo.main "$@"')
    if not doctor:
        exo = f'if [ "$1" = doctor ]; then echo "exo: invalid choice: doctor" >&2; exit 2; fi\n{exo}'
    (path / "bin" / "exo").write_text(f"#!/bin/sh\n{exo}\n")
    (path / "bin" / "exo").chmod(0o755)
    (path / "RELEASE").write_text(name)
    return path


def make_wheel(directory: Path, version: str) -> Path:
    """A wheel of a tiny distribution whose console script `exo` prints its version: what install.sh's
    default path (pip) needs, without building exo and its dependencies."""
    info = f"exo_standin-{version}.dist-info"
    files = {"exo_standin.py": f'def main():\n    print("exo stand-in {version}")\n',
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: exo-standin\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
             f"{info}/entry_points.txt": "[console_scripts]\nexo = exo_standin:main\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for path, text in files.items()]
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    wheel = directory / f"exo_standin-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def test_install_by_default_creates_a_venv_and_pip_installs_into_it(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outputs = []
    for version in ("0.0.1", "0.0.2"):  # the second run upgrades in place
        result = subprocess.run([DEPLOYMENT / "install.sh", "--root", root, "--no-systemctl",
                                 make_wheel(tmp_path, version)], env={**os.environ, "PYTHON": sys.executable},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        assert result.returncode == 0, result.stdout
        assert f"installed exo stand-in {version}" in result.stdout
        outputs.append(result.stdout)
    assert "creating the virtual environment" in outputs[0]
    assert "creating the virtual environment" not in outputs[1]
    assert (root / "opt/exo/venv/pyvenv.cfg").is_file()


@dataclass
class Host:
    """A temporary root with exo installed, a fake systemctl on PATH and the node's settings."""

    root: Path
    env: dict[str, str]
    systemd: Path
    port: int

    def run(self, script: str, *args: str | Path, env: dict[str, str] | None = None) -> Run:
        """The script's exit status, with its stdout and stderr together (as a person would read them)."""
        return subprocess.run([DEPLOYMENT / script, *args], env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=120)

    def systemctl(self, *args: str) -> Run:
        return subprocess.run(["systemctl", *args], env=self.env, capture_output=True, text=True, timeout=90)

    @property
    def release(self) -> str:
        return (self.root / "opt/exo/venv/RELEASE").read_text()

    @property
    def settings(self) -> Path:
        return self.root / "etc/exo/exo.env"

    @property
    def log(self) -> Path:
        return self.systemd / "exo.log"

    def calls(self) -> list[str]:
        return (self.systemd / "calls").read_text().splitlines()

    def backups(self) -> list[Path]:
        return sorted((self.root / "var/backups/exo").glob("[0-9]*"))

    def node(self) -> psutil.Process | None:
        try:
            return psutil.Process(int((self.systemd / "exo.pid").read_text()))
        except (FileNotFoundError, psutil.Error):
            return None


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    bin_dir, systemd = tmp_path / "bin", tmp_path / "systemd"
    bin_dir.mkdir()
    systemd.mkdir()
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_SYSTEMCTL}" "$@"\n')
    (bin_dir / "systemctl").chmod(0o755)
    root = tmp_path / "root"
    env = {k: v for k, v in os.environ.items() if k not in ("SYSTEMCTL", "EXO_API_URL", "EXO_LOG_COMMAND")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", EXO_ROOT=str(root), EXO_LOG_FILE=str(systemd / "exo.log"),
               FAKE_SYSTEMCTL_DIR=str(systemd), FAKE_SYSTEMCTL_UNITS=str(root / "etc/systemd/system"),
               EXO_VALIDATE_WAIT="30")
    [port] = free_ports(1)
    host = Host(root, env, systemd, port)
    installed = host.run("install.sh", "--from-dir", make_release(tmp_path / "v1", "v1"))
    assert installed.returncode == 0, installed.stdout
    with host.settings.open("a") as settings:
        settings.write(f"EXO_API_HOST=127.0.0.1\nEXO_API_PORT={port}\nEXO_ARGS=--no-preload --no-discovery\n")
    try:
        yield host
    finally:
        node = host.node()
        host.systemctl("stop", "exo")
        assert node is None or not node.is_running() or node.status() == psutil.STATUS_ZOMBIE


def test_install_creates_dirs_settings_and_unit_then_enables_it(host: Host) -> None:
    root = host.root
    for path in ("opt/exo/venv/bin/exo", "etc/exo/exo.env", "etc/systemd/system/exo.service"):
        assert (root / path).is_file(), path
    assert (root / "var/lib/exo").is_dir() and (root / "var/backups/exo").is_dir()
    assert host.calls() == ["daemon-reload", "enable exo"]
    assert f"EXO_HOME={root}/var/lib/exo" in (root / "etc/systemd/system/exo.service").read_text()
    assert (root / "etc/exo/exo.env").stat().st_mode & 0o777 == 0o640

    # again: an upgrade in place that keeps the settings a person wrote
    again = host.run("install.sh", "--from-dir", make_release(root.parent / "v1b", "v1b"))
    assert again.returncode == 0, again.stdout
    assert "keeping the settings" in again.stdout and f"EXO_API_PORT={host.port}" in host.settings.read_text()
    assert host.release == "v1b"


def test_deploy_backs_up_installs_and_validates_and_rollback_restores_the_backup(host: Host, tmp_path: Path) -> None:
    assert host.systemctl("start", "exo").returncode == 0
    assert host.run("validate-deployment.sh", "--wait", "30").returncode == 0
    old_settings, old_node = host.settings.read_text(), host.node()
    new_settings = tmp_path / "new.env"
    new_settings.write_text(old_settings + "EXO_CLUSTER=blue\n")

    deployed = host.run("deploy.sh", "--from-dir", make_release(tmp_path / "v2", "v2"), "--env", new_settings)

    assert deployed.returncode == 0, deployed.stdout
    assert host.release == "v2" and "EXO_CLUSTER=blue" in host.settings.read_text()
    assert "restart exo" in host.calls() and host.node() and host.node() != old_node
    [backup] = host.backups()
    assert re.fullmatch(r"\d{8}-\d{6}", backup.name), backup.name
    assert (backup / "opt-exo/venv/RELEASE").read_text() == "v1"
    assert (backup / "etc-exo/exo.env").read_text() == old_settings
    assert (backup / "exo.service").read_text() == (host.root / "etc/systemd/system/exo.service").read_text()
    assert "version=exo 0.1.0" in (backup / "manifest").read_text()
    assert backup.name in host.run("rollback.sh", "--list").stdout

    rolled_back = host.run("rollback.sh", backup.name)

    assert rolled_back.returncode == 0, rolled_back.stdout
    assert host.release == "v1" and host.settings.read_text() == old_settings
    assert "deployment is healthy" in rolled_back.stdout
    assert host.run("rollback.sh", "19990101-000000").returncode == 2


def test_deploy_of_a_release_that_fails_validation_rolls_back_by_itself(host: Host, tmp_path: Path) -> None:
    assert host.systemctl("start", "exo").returncode == 0

    deployed = host.run("deploy.sh", "--from-dir", make_release(tmp_path / "bad", "bad", broken=True))

    assert deployed.returncode == 3, deployed.stdout
    assert "FAIL" in deployed.stdout and "Traceback" in deployed.stdout  # why, in the deploy's own output
    assert "rolling back" in deployed.stdout and "previous version is back and healthy" in deployed.stdout
    assert host.release == "v1"
    assert host.systemctl("is-active", "exo").stdout.strip() == "active"
    [backup] = host.backups()  # kept: it is the way back should the restored version fail later
    assert (backup / "opt-exo/venv/RELEASE").read_text() == "v1"


def test_validate_passes_on_a_clean_log_and_fails_on_each_bad_line(host: Host, tmp_path: Path) -> None:
    assert host.systemctl("start", "exo").returncode == 0
    clean = host.run("validate-deployment.sh", "--wait", "30")
    assert clean.returncode == 0, clean.stdout
    assert "/health says ok" in clean.stdout and "/state answers, with a master" in clean.stdout
    assert "no tracebacks or race-condition errors" in clean.stdout

    for line in ["Traceback (most recent call last):", "anyio.ClosedResourceError", "RuntimeError: Queue is closed"]:
        log = tmp_path / "node.log"
        log.write_text(f"{host.log.read_text()}{line}\n")
        dirty = host.run("validate-deployment.sh", env={"EXO_LOG_FILE": str(log)})
        assert dirty.returncode == 1, dirty.stdout
        assert "1 check(s) failed" in dirty.stdout and line in dirty.stdout


def test_validate_fails_when_the_service_is_down(host: Host) -> None:
    result = host.run("validate-deployment.sh")
    assert result.returncode == 1
    assert "service exo is inactive" in result.stdout and "/health: " in result.stdout


@pytest.mark.parametrize("doctor", [True, False], ids=["exo doctor", "no exo doctor"])
def test_validate_finds_a_runner_whose_node_is_gone(host: Host, tmp_path: Path, doctor: bool) -> None:
    """A process that looks like a runner of this install (`VENV/bin/python -m exo.worker.runner
    SPEC NODE_PID`) whose node pid does not exist: a module of that name that only sleeps. Found by
    `exo doctor`, or without it (older releases) by validate's own look through /proc."""
    if not doctor:
        assert host.run("install.sh", "--from-dir", make_release(tmp_path / "old", "old", doctor=False)).returncode == 0
    assert host.systemctl("start", "exo").returncode == 0
    fake = tmp_path / "fake_runner"
    (fake / "exo/worker").mkdir(parents=True)
    (fake / "exo/__init__.py").write_text("")
    (fake / "exo/worker/__init__.py").write_text("")
    (fake / "exo/worker/runner.py").write_text("import time\ntime.sleep(60)\n")
    venv_python = host.root / "opt/exo/venv/bin/python"
    orphan = subprocess.Popen([venv_python, "-m", "exo.worker.runner", "{}", "99999999"], cwd=fake)
    try:
        result = host.run("validate-deployment.sh", "--wait", "30")
    finally:
        orphan.kill()
        orphan.wait()
    assert result.returncode == 1, result.stdout
    assert "1 check(s) failed" in result.stdout
    assert ("exo doctor finds issues" in result.stdout) == doctor
    assert (f"orphaned runners found: pids {orphan.pid}" in result.stdout) != doctor
    assert "orphaned runners" in result.stdout and str(orphan.pid) in result.stdout
