"""Builds exo's native CPU kernels (exo/kernels/CMakeLists.txt) when exo is installed.

The build is optional: without a C++ compiler, CMake or MLX's headers the install still succeeds
and exo runs stock MLX ops, saying why in `exo.kernels.info()`.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeKernels(build_ext):
    def build_extensions(self) -> None:
        super().build_extensions()
        # a kernel build that failed leaves no library, and an install must not then try to copy one
        self.extensions = [ext for ext in self.extensions if Path(self.get_ext_fullpath(ext.name)).is_file()]

    def build_extension(self, ext: Extension) -> None:
        out = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build = Path(self.build_temp).resolve() / "kernels"
        try:
            cmake = shutil.which("cmake")
            if cmake is None:
                import cmake as cmake_pkg  # the PyPI package, when the build requirements installed it

                cmake = str(Path(cmake_pkg.CMAKE_BIN_DIR) / "cmake")
            # --fresh: an earlier configure may name a build environment pip has since deleted
            subprocess.run([cmake, "--fresh", "-S", str(ROOT / "exo" / "kernels"), "-B", str(build),
                            f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release",
                            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}"], check=True)
            subprocess.run([cmake, "--build", str(build), "-j", str(os.cpu_count() or 1)], check=True)
        except (OSError, ImportError, subprocess.CalledProcessError) as e:
            print(f"exo: native kernels not built ({e}); exo will use stock MLX ops", file=sys.stderr)


setup(ext_modules=[Extension("exo.kernels._native", sources=[])], cmdclass={"build_ext": CMakeKernels})
