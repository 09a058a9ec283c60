"""The bundled ``tritonserver`` process: start it on a generated repository, wait until it is
ready, stop it with everything it started.

    with TritonServer(ModelSettings(engines="engines"), ServerSettings(http_port=0)) as server:
        print(server.endpoints.http_url)

Start-up failures (the package missing, a port in use, engines that do not load) raise one
:class:`HybridStitchError` with the reason; no process is left behind.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from ..errors import HybridStitchError
from .bundle import TritonBundle
from .protocol import MODEL_NAME
from .repository import LOAD_ERROR_FILE, instance_groups, write_repository
from .settings import ModelSettings, ServerSettings

EXIT_TIMEOUT_S = 30  # Triton's own wait for in-flight requests on shutdown
LOG_LINES = 2000  # the tail kept in memory when no log file is asked for


@dataclass(frozen=True)
class Endpoints:
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def http_url(self) -> str:
        return f"http://{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"


def resolve_ports(settings: ServerSettings) -> Endpoints:
    """The ports to bind: each 0 becomes a free port, a given one must be free now."""
    chosen = {}
    for name in ("http_port", "grpc_port", "metrics_port"):
        port = getattr(settings, name)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # As Triton binds: a port in TIME_WAIT is usable, one a server listens on is not.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((settings.host, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise HybridStitchError(
                        f"port {port} on {settings.host} is in use ({name.replace('_port', '')}); stop what listens there or "
                        f"pick another with --{name.replace('_', '-')} (0 picks a free one)"
                    ) from None
                raise HybridStitchError(f"cannot bind {settings.host}:{port} ({e.strerror}); check --host") from None
            chosen[name] = s.getsockname()[1]
    # A free port chosen here could be taken by another process before Triton binds it; Triton
    # then exits at start-up and the error says so.
    return Endpoints(settings.host, **chosen)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class _ParentDeathSignal:
    """``prctl(PR_SET_PDEATHSIG, SIGTERM)`` in the child: Triton stops when this process dies
    without stopping it (SIGKILL, a crash). libc is loaded before the fork; the child only calls."""

    PR_SET_PDEATHSIG = 1

    def __init__(self):
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

    def __call__(self):
        self._libc.prctl(self.PR_SET_PDEATHSIG, signal.SIGTERM)


class _LogReader(threading.Thread):
    """Reads the server's output: keeps the tail, appends to a file, echoes when asked."""

    def __init__(self, stream, path: str | None, echo):
        super().__init__(name="tritonserver-log", daemon=True)
        self._stream, self._path, self.echo = stream, path, echo
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_LINES)

    def run(self):
        sink = open(self._path, "a", encoding="utf-8") if self._path else None
        try:
            for raw in iter(self._stream.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                self.tail.append(line.rstrip("\n"))
                if sink is not None:
                    sink.write(line)
                    sink.flush()
                if self.echo is not None:
                    self.echo(line)
        finally:
            if sink is not None:
                sink.close()


class TritonServer:
    """One ``tritonserver`` serving the ``hybridstitch`` model; a context manager."""

    def __init__(self, model: ModelSettings, server: ServerSettings | None = None, echo_log=None):
        self.model = model
        self.settings = server or ServerSettings()
        self._echo_log = echo_log  # called with each log line once the server is ready (e.g. sys.stderr.write)
        self._process: subprocess.Popen | None = None
        self._log: _LogReader | None = None
        self._workspace: str | None = None
        self.endpoints: Endpoints | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, cancel: threading.Event | None = None) -> Endpoints:
        """Start and wait until the model is ready (or ``cancel`` is set: then stop and return)."""
        bundle = TritonBundle.find()
        env = bundle.environment()
        groups = instance_groups(self.model, self.settings.instances, _gpu_count())
        self.endpoints = resolve_ports(self.settings)
        self._workspace = tempfile.mkdtemp(prefix="hybridstitch-serve-")
        try:
            repository = write_repository(self._workspace, self.model, self.settings, groups)
            backends = bundle.make_backend_directory(self._workspace)
            e = self.endpoints
            command = [
                bundle.server, f"--model-repository={repository}", f"--backend-directory={backends}",
                f"--http-address={e.host}", f"--http-port={e.http_port}",
                f"--grpc-address={e.host}", f"--grpc-port={e.grpc_port}",
                f"--metrics-address={e.host}", f"--metrics-port={e.metrics_port}",
                "--model-control-mode=none", "--strict-readiness=true", "--exit-on-error=true",
                "--disable-auto-complete-config", f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            ]
            # Its own session: a Ctrl-C in the terminal reaches only us, and we stop Triton in
            # order (requests in flight finish, then the model instances, then the server).
            self._process = subprocess.Popen(command, env=env, cwd=self._workspace, stdin=subprocess.DEVNULL,
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             start_new_session=True, preexec_fn=_ParentDeathSignal())
            self._log = _LogReader(self._process.stdout, self.settings.log_file, None)
            self._log.start()
            self._wait_ready(cancel)
            self._log.echo = self._echo_log
        except BaseException:
            self.stop()
            raise
        return self.endpoints

    def _wait_ready(self, cancel: threading.Event | None) -> None:
        url = f"{self.endpoints.http_url}/v2/models/{MODEL_NAME}/ready"
        deadline = time.monotonic() + self.settings.startup_timeout_s
        while True:
            if self._process.poll() is not None:
                raise self._start_failure()
            if cancel is not None and cancel.is_set():
                return
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or the model still loading (400)
            if time.monotonic() > deadline:
                raise HybridStitchError(
                    f"Triton was not ready after {self.settings.startup_timeout_s:g} s (model still loading?): "
                    f"{self._last_log_line()}; allow longer or check the engines"
                )
            time.sleep(0.2)

    def _start_failure(self) -> HybridStitchError:
        self._process.wait()
        self._log.join(timeout=5)
        path = os.path.join(self._workspace, "models", MODEL_NAME, LOAD_ERROR_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return HybridStitchError(f"the {MODEL_NAME} model failed to load: {f.read().strip()}")
        return HybridStitchError(
            f"Triton Inference Server exited during start-up (exit code {self._process.returncode}): {self._last_log_line()}"
        )

    def _last_log_line(self) -> str:
        """The most telling line of the log: the last error, else the last line."""
        lines = [line.strip() for line in (self._log.tail if self._log else ()) if line.strip()]
        for line in reversed(lines):
            if line.startswith("E") or "error" in line.lower():
                return line
        return lines[-1] if lines else "no output"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def log_tail(self, lines: int = 50) -> str:
        return "\n".join(list(self._log.tail)[-lines:]) if self._log else ""

    def stop(self) -> None:
        """SIGINT (Triton finishes the requests in flight and unloads the model), then, past the
        exit timeout, SIGKILL to the whole process group (the server and its model instances)."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=EXIT_TIMEOUT_S + 15)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            _kill_group_leftovers(process.pid)
        if self._log is not None:
            self._log.join(timeout=5)
        if self._workspace is not None:
            shutil.rmtree(self._workspace, ignore_errors=True)
            self._workspace = None

    def __enter__(self) -> "TritonServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _kill_group_leftovers(pgid: int) -> None:
    """The model instances (Python backend stubs) share the server's process group; any still
    there after the server exited are ended, so nothing outlives a stop."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # the group is empty: the normal case
        pass
