"""Build the optional native twin (proxyd._native) when a C compiler is present.

Everything else is in pyproject.toml. Without a compiler (or Python headers) the build of the
extension fails, that failure is reported and swallowed, and proxyd installs and runs on its
pure-Python path, which is the reference implementation anyway. ``PROXYD_PURE_BUILD=1`` skips
the extension on purpose; ``PROXYD_NATIVE_CFLAGS`` adds compiler flags (CI's sanitizer build).
"""

from __future__ import annotations

import glob
import os
import shlex
import sys
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that never fails the install: no compiler means the pure-Python path."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # distutils raises several unrelated types (no compiler, ...)
            self._skip(exc)

    def build_extension(self, ext: Any) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._skip(exc)

    @staticmethod
    def _skip(exc: Exception) -> None:
        print(
            f"proxyd: not building the native extension ({type(exc).__name__}: {exc}); "
            "proxyd will run on its pure-Python path",
            file=sys.stderr,
        )


extra = shlex.split(os.environ.get("PROXYD_NATIVE_CFLAGS", ""))
ext_modules = []
if os.environ.get("PROXYD_PURE_BUILD") != "1":
    ext_modules.append(
        Extension(
            "proxyd._native",
            sources=sorted(glob.glob("proxyd/_native_src/*.c")),
            depends=["proxyd/_native_src/native.h"],
            extra_compile_args=["-O2", "-Wall", "-Wno-missing-field-initializers", *extra],
            extra_link_args=[f for f in extra if f.startswith("-fsanitize")],
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
