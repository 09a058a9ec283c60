"""The Triton Inference Server that ``nvidia-pytriton`` bundles, and the environment it needs.

We run the bundled ``tritonserver`` binary on a model repository of our own, not PyTriton's
Python API (see docs/serving.md for why); the package is only where the binaries live, so it is
located with ``importlib.util.find_spec`` and never imported.

Two facts found by running it: the Python backend stub links ``libpython3.X.so``, and with a
non-system interpreter (pyenv, a venv on one) it picked up the system's libpython and crashed,
so the running interpreter's own library folder goes first on ``LD_LIBRARY_PATH``; and the
bundled binaries find their libraries in ``nvidia_pytriton.libs`` only through that path too.
The stub embeds Python without a program name, so Python looks ``python3`` up on ``PATH``: the
running interpreter's ``bin/`` goes first there, which makes the stub use this environment
(this venv's packages, hybridstitch included) without touching ``sys.path``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from dataclasses import dataclass

from ..errors import HybridStitchError

INSTALL_HINT = "install the serving extra: pip install -e '.[serve]' (nvidia-pytriton bundles the server)"


@dataclass(frozen=True)
class TritonBundle:
    root: str  # .../site-packages/pytriton/tritonserver
    libs: str  # .../site-packages/nvidia_pytriton.libs

    @classmethod
    def find(cls) -> "TritonBundle":
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise HybridStitchError(f"serving needs Triton Inference Server: {INSTALL_HINT}")
        package = list(spec.submodule_search_locations)[0]
        bundle = cls(root=os.path.join(package, "tritonserver"), libs=os.path.join(os.path.dirname(package), "nvidia_pytriton.libs"))
        for path in (bundle.server, bundle.backend_library, bundle.stub):
            if not os.path.isfile(path):
                raise HybridStitchError(
                    f"{path} is missing from the nvidia-pytriton package: "
                    + ("it ships Python backend stubs for Python 3.8-3.13 only; serve with one of those"
                       if path == bundle.stub else f"reinstall it ({INSTALL_HINT})")
                )
        return bundle

    @property
    def server(self) -> str:
        return os.path.join(self.root, "bin", "tritonserver")

    @property
    def backend_library(self) -> str:
        return os.path.join(self.root, "backends", "python", "libtriton_python.so")

    @property
    def stub(self) -> str:
        """The Python backend stub built for the running interpreter's version."""
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        return os.path.join(self.root, "python_backend_stubs", version, "triton_python_backend_stub")

    def make_backend_directory(self, workspace: str) -> str:
        """A backend directory whose ``python/`` holds the bundled backend and this Python's stub
        (Triton looks for the stub next to the backend library), as links into the package."""
        folder = os.path.join(workspace, "backends")
        python = os.path.join(folder, "python")
        os.makedirs(python, exist_ok=True)
        source = os.path.dirname(self.backend_library)
        for name in sorted(os.listdir(source)):
            if name != "__pycache__":
                os.symlink(os.path.join(source, name), os.path.join(python, name))
        os.symlink(self.stub, os.path.join(python, "triton_python_backend_stub"))
        return folder

    def environment(self) -> dict[str, str]:
        """The server's environment: this interpreter's libpython and the bundled libraries on the
        library path, this interpreter's ``bin/`` first on ``PATH`` (see the module docstring)."""
        env = dict(os.environ)
        libpython = python_library_dir()
        paths = [libpython, self.libs] + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        return env


def python_library_dir() -> str:
    """The folder holding the running interpreter's shared libpython, which the stub must load."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    name = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY") or ""
    if not name.endswith((".so", ".so.1.0")) or not os.path.isfile(os.path.join(libdir, name)):
        raise HybridStitchError(
            f"this Python ({sys.executable}) has no shared libpython ({name or 'none'} in {libdir or 'no LIBDIR'}), "
            "which Triton's Python backend stub loads: serve with a Python built with --enable-shared "
            "(pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared; Debian: the python3-dev/libpython3.X packages)"
        )
    return libdir
