"""deployment/exo.service as systemd reads it, and shellcheck over every deployment script.

The unit is verified as install.sh installs it under a temporary root (its ExecStart must exist for
`systemd-analyze verify`), and systemd's own parser judges it: verify prints a line for every setting
it ignores, so a clean verify is empty output, not only exit status 0.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOYMENT = Path(__file__).resolve().parents[2] / "deployment"
SHUTDOWN_TIMEOUTS = ("EXO_SHUTDOWN_TIMEOUT", "EXO_CHANNEL_DRAIN_TIMEOUT", "EXO_RESOURCE_CLEANUP_TIMEOUT")

needs_systemd_analyze = pytest.mark.skipif(not shutil.which("systemd-analyze"),
                                           reason="systemd-analyze is not installed (package systemd)")


def settings(unit: Path) -> dict[str, list[str]]:
    """Each key of the unit with its values in order (sections merged: no key here is in two)."""
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


@pytest.fixture
def installed_unit(tmp_path: Path) -> Path:
    """The unit as `install.sh --root` installs it, over a stand-in release (verify needs only an
    executable ExecStart)."""
    release = tmp_path / "release"
    (release / "bin").mkdir(parents=True)
    (release / "bin" / "exo").write_text("#!/bin/sh\necho exo stand-in\n")
    (release / "bin" / "exo").chmod(0o755)
    root = tmp_path / "root"
    result = subprocess.run([DEPLOYMENT / "install.sh", "--root", root, "--no-systemctl", "--from-dir", release],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return root / "etc/systemd/system/exo.service"


def verify(unit: Path) -> str:
    result = subprocess.run(["systemd-analyze", "verify", unit], capture_output=True, text=True, timeout=60)
    # only lines about this unit: a host's other units may have warnings of their own
    about = "\n".join(line for line in (result.stdout + result.stderr).splitlines() if "exo" in line)
    return f"exit {result.returncode}\n{about}".strip()


@needs_systemd_analyze
def test_installed_unit_passes_systemd_analyze_verify(installed_unit: Path) -> None:
    assert verify(installed_unit) == "exit 0"


@needs_systemd_analyze
def test_verify_reports_a_misspelt_setting(installed_unit: Path) -> None:
    """The check above has teeth: a setting systemd would ignore shows in verify's output."""
    installed_unit.write_text(installed_unit.read_text().replace("KillMode=mixed", "KillMode=mixd"))
    assert "kill mode" in verify(installed_unit)


@needs_systemd_analyze
def test_unit_is_hardened(installed_unit: Path) -> None:
    """systemd's own exposure score (0 is locked down, 10 is not at all); 4 or less is 'OK'."""
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=40", installed_unit],
                            capture_output=True, text=True, timeout=60)
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze cannot score a unit file offline (systemd < 250)")
    score = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert result.returncode == 0 and score, result.stdout[-2000:] + result.stderr
    assert float(score[1]) <= 4.0


def test_installed_unit_names_the_paths_under_its_root(installed_unit: Path) -> None:
    root = installed_unit.parents[3]
    unit = settings(installed_unit)
    assert unit["ExecStart"][0].startswith(f"{root}/opt/exo/venv/bin/exo ")
    assert unit["EnvironmentFile"] == [f"-{root}/etc/exo/exo.env"]
    assert f"EXO_HOME={root}/var/lib/exo" in unit["Environment"]
    assert unit["ReadWritePaths"] == [f"{root}/var/lib/exo"]


def test_unit_runs_unprivileged_restarts_and_outwaits_the_shutdown() -> None:
    unit = settings(DEPLOYMENT / "exo.service")
    env = dict(value.split("=", 1) for value in unit["Environment"])
    assert unit["User"] == ["exo"] and unit["Group"] == ["exo"]
    assert unit["Restart"] == ["always"]
    assert unit["KillMode"] == ["mixed"]  # SIGTERM to the node; SIGKILL for the runners only at the end
    shutdown = sum(float(env[name]) for name in SHUTDOWN_TIMEOUTS)
    assert float(unit["TimeoutStopSec"][0]) > shutdown == 45
    assert unit["ExecStart"] == ["/opt/exo/venv/bin/exo --host ${EXO_API_HOST} --api-port ${EXO_API_PORT} $EXO_ARGS"]
    assert env["EXO_HOME"] == "/var/lib/exo" and unit["ReadWritePaths"] == ["/var/lib/exo"]
    assert {"LimitNOFILE", "LimitNPROC", "TasksMax"} <= unit.keys()
    for setting in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert unit[setting] == ["yes"], setting
    assert unit["ProtectSystem"] == ["strict"]
    assert "AF_NETLINK" in unit["RestrictAddressFamilies"][0]  # mDNS finds interfaces through netlink


def test_env_template_names_only_commented_defaults_that_match_the_unit() -> None:
    """The settings file ships with every line commented, so the unit's defaults hold until changed."""
    unit_env = dict(value.split("=", 1) for value in settings(DEPLOYMENT / "exo.service")["Environment"])
    template = (DEPLOYMENT / "exo.env").read_text().splitlines()
    assert not [line for line in template if line and not line.startswith("#")]
    for name in SHUTDOWN_TIMEOUTS + ("EXO_API_HOST", "EXO_API_PORT"):
        assert f"#{name}={unit_env[name]}" in template, name


def test_deployment_scripts_are_shellcheck_clean() -> None:
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (deployment/setup.sh --dev installs it with apt)")
    scripts = sorted(DEPLOYMENT.glob("*.sh"))
    assert {"lib.sh", "install.sh", "deploy.sh", "rollback.sh", "validate-deployment.sh"} <= {s.name for s in scripts}
    result = subprocess.run(["shellcheck", "--external-sources", *scripts], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout
