"""Real installs of exo for the deployment tests: a wheel built from this checkout, a copy of the
checkout, and virtual environments that hold exo's dependencies without downloading them.

A fresh venv gets a `.pth` naming a directory of links to the test venv's packages, all but exo
itself (and pip, setuptools): pip then finds every dependency satisfied and installs only exo, from
a wheel or a source tree, for real and not editable, in seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NOT_DEPENDENCIES = ("exo", "exo-", "__editable__", "_distutils_hack", "distutils-precedence", "pip", "pip-",
                    "setuptools", "setuptools-", "pkg_resources", "_virtualenv")


def source_copy(dest: Path) -> Path:
    """The checkout's files (tracked and new, not ignored) copied to `dest`: building or installing it
    there leaves nothing in the checkout (setuptools writes build/ and exo.egg-info beside the source)."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def build_wheel(source: Path, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", out, source],
                   check=True, capture_output=True, timeout=300)
    [wheel] = out.glob("exo-*.whl")
    return wheel


def dependencies_dir(dest: Path) -> Path:
    """Links to the test venv's installed packages, exo and the packaging tools left out."""
    dest.mkdir(parents=True)
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(NOT_DEPENDENCIES) and entry.name != "__pycache__":
            (dest / entry.name).symlink_to(entry)
    return dest


def venv_with_dependencies(path: Path, dependencies: Path) -> Path:
    """A new venv at `path` (with pip) that sees `dependencies` but has no exo yet."""
    subprocess.run([sys.executable, "-m", "venv", path], check=True, capture_output=True, timeout=120)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (path / "lib" / version / "site-packages" / "_exo_test_dependencies.pth").write_text(f"{dependencies}\n")
    return path


def install_env(**extra: str) -> dict[str, str]:
    """The environment for an installed exo: without PYTHONPATH, which would import the checkout instead."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EXO_API_URL", "SYSTEMCTL")}
    return {**env, **extra}
