"""``hybridstitch serve`` and ``hybridstitch client`` as users run them: start-up errors in one line
with exit status 2 and nothing left running, SIGTERM stops the server and its model instances."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from .conftest import GUIDANCE, METHOD, STEPS, alive, descendants, direct_call

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def hybridstitch(*argv, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybridstitch.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hybridstitch: error: "), proc.stderr
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FREE_PORTS = ("--http-port", "0", "--grpc-port", "0", "--metrics-port", "0")


def test_missing_engines_is_one_line():
    line = one_error_line(hybridstitch("serve", "--engines", "/no/such/engines", *FREE_PORTS))
    assert "--engines '/no/such/engines' is not a folder; export engines with hybridstitch-export" in line


def test_a_port_in_use_is_one_line(testbed_engines):
    pytest.importorskip("pytriton", reason="serving needs the serve extra (nvidia-pytriton)")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_error_line(hybridstitch("serve", "--engines", testbed_engines, "--http-port", str(port),
                                           "--grpc-port", "0", "--metrics-port", "0"))
    assert f"port {port} on 127.0.0.1 is in use (http); stop what listens there or pick another with --http-port" in line


def test_engines_that_fail_to_load_are_one_line_and_leave_nothing(testbed_engines, tmp_path):
    pytest.importorskip("pytriton", reason="serving needs the serve extra (nvidia-pytriton)")
    broken = str(tmp_path / "engines")
    shutil.copytree(testbed_engines, broken)
    graph = next(os.path.join(broken, f) for f in sorted(os.listdir(broken)) if f.endswith(".onnx"))
    with open(graph, "r+b") as f:
        f.truncate(os.path.getsize(graph) // 2)
    before = descendants(os.getpid())
    line = one_error_line(hybridstitch("serve", "--engines", broken, *FREE_PORTS, "--threads", "1",
                                       "--method", METHOD, "--guidance-scale", str(GUIDANCE)))
    assert "the hybridstitch model failed to load:" in line and os.path.basename(graph) in line, line
    assert alive(descendants(os.getpid()) - before) == set()


def test_client_errors_are_one_line():
    line = one_error_line(hybridstitch("client", "--url", f"http://127.0.0.1:{free_port()}", "--prompt", "3", timeout=60))
    assert "no hybridstitch server answers at http://127.0.0.1:" in line and "start one with hybridstitch serve" in line


class ServeProcess:
    """``hybridstitch serve`` in a subprocess; its stdout read on a thread until the ready line."""

    def __init__(self, argv, log_path):
        self._log = open(log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen([sys.executable, "-m", "hybridstitch.cli", "serve", *argv], stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, env=ENV)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if "ready on HTTP" in line:
                self.ready.set()

    @property
    def url(self) -> str:
        line = next(line for line in self.lines if "ready on HTTP" in line)
        return line.split("ready on HTTP ", 1)[1].split(",", 1)[0]

    def close(self):
        """Whatever state the test left it in: no process remains."""
        under = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in alive(under):
            os.kill(pid, signal.SIGKILL)
        self._log.close()


def test_sigterm_stops_the_server_and_its_instances(testbed_engines, direct_pipe, tmp_path):
    pytest.importorskip("pytriton", reason="serving needs the serve extra (nvidia-pytriton)")
    pytest.importorskip("tritonclient.http", reason="serving needs the serve extra (tritonclient[http])")
    serve = ServeProcess(["--engines", testbed_engines, *FREE_PORTS, "--threads", "1", "--method", METHOD,
                          "--steps", str(STEPS), "--guidance-scale", str(GUIDANCE)], tmp_path / "serve.log")
    try:
        assert serve.ready.wait(180), (serve.lines, (tmp_path / "serve.log").read_text()[-3000:])
        workers = descendants(serve.proc.pid)
        assert len(workers) >= 2  # tritonserver and its model instance (the Python backend stub)

        out, trace = tmp_path / "image.png", tmp_path / "trace.json"
        done = hybridstitch("client", "--url", serve.url, "--prompt", "a handwritten 9", "--seed", "4",
                            "--out", str(out), "--trace", str(trace))
        assert done.returncode == 0, done.stderr
        from PIL import Image

        np.testing.assert_array_equal(np.asarray(Image.open(out))[:, :, None],
                                      direct_call(direct_pipe, "a handwritten 9", 4)[0])
        assert '"name": "testbed-30"' in trace.read_text()
        refused = one_error_line(hybridstitch("client", "--url", serve.url, "--prompt", "3", "--method", "nope"))
        assert "refused the request: unknown preset 'nope'" in refused

        t0 = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(timeout=60) == 0
        assert alive(workers) == set(), "processes left after SIGTERM"
        assert any("hybridstitch serve: stopped" in line for line in serve.lines)
        assert time.monotonic() - t0 < 60
    finally:
        serve.close()


@pytest.mark.parametrize("argv,expected", [
    (["-m", "hybridstitch.cli", "serve", "--help"], "--max-queue-delay-ms"),
    (["-m", "hybridstitch.cli", "client", "--help"], "--guidance-scale"),
    ([os.path.join("benchmarks", "serving.py"), "--help"], "--concurrency"),
])
def test_entry_points_run_without_docstrings(argv, expected):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-OO", *argv], cwd=root, capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expected in proc.stdout
