"""The deployment runbook's script paths, run as it runs them, from a checkout in a temporary root.

`deployment/deploy-race-condition-fix.sh`, `deployment/rollback-race-condition-fix.sh BACKUP_DIR` and
`deployment/monitoring/validate-deployment.sh` are thin wrappers of deploy.sh, rollback.sh and
validate-deployment.sh that keep the runbook's layout beside them: logs in deployment/logs/deploy_*.log,
backups in deployment/backups/TIMESTAMP/. The checkout is a copy of deployment/, so nothing is written
into the real one; the service is the fake systemctl of test_deploy_scripts.py, running a real node.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from nodes import free_ports
from test_deploy_scripts import FAKE_SYSTEMCTL, make_release

DEPLOYMENT = Path(__file__).resolve().parents[2] / "deployment"
RUNBOOK_SCRIPTS = {"deployment/deploy-race-condition-fix.sh": "deploy.sh",  # each, and the script it runs
                   "deployment/rollback-race-condition-fix.sh": "rollback.sh",
                   "deployment/monitoring/validate-deployment.sh": "validate-deployment.sh"}


@dataclass
class Checkout:
    """A copy of deployment/ to run the runbook's paths from, and the temporary root it installs into."""

    path: Path
    root: Path
    env: dict[str, str]
    systemd: Path
    port: int

    def run(self, script: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([f"./{script}", *map(str, args)], cwd=self.path, env=self.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=120)

    @property
    def release(self) -> str:
        return (self.root / "opt/exo/venv/RELEASE").read_text()

    def node(self) -> psutil.Process | None:
        try:
            return psutil.Process(int((self.systemd / "exo.pid").read_text()))
        except (FileNotFoundError, psutil.Error):
            return None


@pytest.fixture
def checkout(tmp_path: Path) -> Iterator[Checkout]:
    bin_dir, systemd, path = tmp_path / "bin", tmp_path / "systemd", tmp_path / "checkout"
    bin_dir.mkdir()
    systemd.mkdir()
    shutil.copytree(DEPLOYMENT, path / "deployment", ignore=shutil.ignore_patterns("logs", "backups"))
    for name, as_env in (("systemctl", ""), ("journalctl", "FAKE_SYSTEMCTL_AS=journalctl ")):
        (bin_dir / name).write_text(f'#!/bin/sh\n{as_env}exec "{sys.executable}" "{FAKE_SYSTEMCTL}" "$@"\n')
        (bin_dir / name).chmod(0o755)
    root = tmp_path / "root"
    env = {k: v for k, v in os.environ.items()
           if k not in ("SYSTEMCTL", "EXO_API_URL", "EXO_LOG_COMMAND", "EXO_BACKUP_DIR", "EXO_DEPLOY_LOG_DIR")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", EXO_ROOT=str(root),
               FAKE_SYSTEMCTL_DIR=str(systemd), FAKE_SYSTEMCTL_UNITS=str(root / "etc/systemd/system"),
               EXO_VALIDATE_WAIT="30")
    [port] = free_ports(1)
    checkout = Checkout(path, root, env, systemd, port)
    installed = checkout.run("deployment/install.sh", "--from-dir", make_release(tmp_path / "v1", "v1"))
    assert installed.returncode == 0, installed.stdout
    with (root / "etc/exo/exo.env").open("a") as settings:
        settings.write(f"EXO_API_HOST=127.0.0.1\nEXO_API_PORT={port}\nEXO_ARGS=--no-preload --no-discovery\n"
                       f"PYTHONPATH={DEPLOYMENT.parent}\n")  # the node runs this checkout's exo, as the tests do
    try:
        yield checkout
    finally:
        node = checkout.node()
        subprocess.run(["systemctl", "stop", "exo"], env=env, capture_output=True, timeout=90, check=False)
        assert node is None or not node.is_running() or node.status() == psutil.STATUS_ZOMBIE


def test_the_runbooks_deploy_logs_and_backs_up_in_the_checkout_and_its_rollback_restores_the_backup(
        checkout: Checkout, tmp_path: Path) -> None:
    down = checkout.run("deployment/monitoring/validate-deployment.sh")
    assert down.returncode == 1 and "FAIL" in down.stdout, down.stdout
    started = subprocess.run(["systemctl", "start", "exo"], env=checkout.env, capture_output=True, timeout=90)
    assert started.returncode == 0, started.stderr
    up = checkout.run("deployment/monitoring/validate-deployment.sh", "--wait", "30")
    assert up.returncode == 0, up.stdout
    assert httpx.get(f"http://127.0.0.1:{checkout.port}/state").json()["masterId"]  # validated in upstream's shape

    release = make_release(tmp_path / "v2", "v2")
    deployed = checkout.run("deployment/deploy-race-condition-fix.sh", "--from-dir", release)

    assert deployed.returncode == 0, deployed.stdout
    assert checkout.release == "v2"
    [log] = (checkout.path / "deployment/logs").glob("deploy_*.log")
    assert re.fullmatch(r"deploy_\d{8}-\d{6}\.log", log.name), log.name
    assert log.read_text() == deployed.stdout and "deploy: deployed" in log.read_text()
    [backup] = (checkout.path / "deployment/backups").glob("[0-9]*")
    assert re.fullmatch(r"\d{8}-\d{6}", backup.name) and (backup / "opt-exo/venv/RELEASE").read_text() == "v1"
    assert (checkout.path / "deployment/backups").stat().st_mode & 0o777 == 0o700
    assert not list((checkout.root / "var/backups/exo").glob("[0-9]*"))  # none in the documented place
    assert backup.name in checkout.run("deployment/rollback-race-condition-fix.sh", "--list").stdout

    rolled_back = checkout.run("deployment/rollback-race-condition-fix.sh", f"deployment/backups/{backup.name}")

    assert rolled_back.returncode == 0, rolled_back.stdout
    assert checkout.release == "v1" and "deployment is healthy" in rolled_back.stdout
    missing = checkout.run("deployment/rollback-race-condition-fix.sh", "deployment/backups/19990101-000000")
    assert missing.returncode == 2, missing.stdout


@pytest.mark.parametrize("script", RUNBOOK_SCRIPTS)
def test_each_runbook_script_explains_itself_and_the_script_it_runs_on_help(tmp_path: Path, script: str) -> None:
    path = tmp_path / "checkout"
    shutil.copytree(DEPLOYMENT, path / "deployment", ignore=shutil.ignore_patterns("logs", "backups"))
    env = {**os.environ, "EXO_ROOT": str(tmp_path / "root"), "SYSTEMCTL": "false"}

    answer = subprocess.run([f"./{script}", "--help"], cwd=path, env=env, capture_output=True, text=True, timeout=30)

    assert (answer.returncode, answer.stderr) == (0, ""), answer.stderr
    own, real = answer.stdout.split(f"\n{RUNBOOK_SCRIPTS[script]} --help:\n")
    assert "runbook" in own and Path(script).name in own, answer.stdout
    assert "Exit status" in real and f"{RUNBOOK_SCRIPTS[script]} [" in real, answer.stdout
    assert not (tmp_path / "root").exists() and not (path / "deployment/logs").exists()
    assert not (path / "deployment/backups").exists()
