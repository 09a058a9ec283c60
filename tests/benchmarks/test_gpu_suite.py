"""``benchmarks/gpu_suite.py``: every part's whole path on CPU (``--dry-run``), run as the GPU machine runs it.

The script is started by absolute path from a folder outside the repository, so it works only
through the installed package (the ``hybridstitch.*`` subpackages exist only through the
install's folder mapping), as on a lent GPU machine after ``pip install -e .``.
"""

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_suite.py"
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install triton)"
)


def run_suite(cwd, *args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)  # fmt: skip


def load(out: Path, part: str) -> dict:
    return json.loads((out / f"{part}.json").read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of every part, from a folder that is not the repository."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    results_before = sorted(os.listdir(REPO / "benchmarks" / "results"))
    proc = run_suite(cwd, "--dry-run", "--out", "suite")
    assert sorted(os.listdir(REPO / "benchmarks" / "results")) == results_before, "the suite wrote into the repository"
    return proc, cwd / "suite"


@needs_triton
@pytest.mark.slow
def test_dry_run_writes_every_part(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and list(summary["parts"]) == ["kernel", "aot", "masked", "e2e", "memory", "batching"]
    for part in summary["parts"]:
        data = load(out, part)
        assert data["dry_run"] and data["env"]["device"] == "CPU (dry run)"
        md = (out / f"{part}.md").read_text()
        assert md.startswith(f"# {part}: ") and "DRY RUN" in md and f"**Status: {data['status']}**" in md
        assert (out / f"{part}.log").is_file()
    assert {p: s["status"] for p, s in summary["parts"].items()} == {
        "kernel": "passed", "aot": "passed", "masked": "passed", "e2e": "passed", "memory": "passed", "batching": "passed",
    }  # fmt: skip
    table = (out / "summary.md").read_text()
    assert "| part | status | seconds | limit | result | files |" in table and "| memory | passed |" in table


@needs_triton
@pytest.mark.slow
def test_kernel_part(dry_run):
    _, out = dry_run
    data = load(out, "kernel")
    assert {row["dtype"] for row in data["rows"]} == {"float16", "float32"}
    assert all(var["caches_exact"] and var["passed"] for row in data["rows"] for var in row["variants"])
    assert all(row["baseline_ms"] > 0 and row["sdpa_only_ms"] > 0 for row in data["rows"])
    assert "| dtype | N | r | k | call | ms | vs baseline |" in (out / "kernel.md").read_text()


@needs_triton
@pytest.mark.slow
def test_aot_part_launches_in_tensorrt_order(dry_run):
    _, out = dry_run
    data = load(out, "aot")
    assert data["ptx_version_wanted"] == "8.0"
    rows = data["rows"]
    assert {(r["target"], r["dtype"]) for r in rows} == {("sm_80", "fp16"), ("sm_80", "fp32")}
    for r in rows:
        assert r["passed"] and r["cache_rows_exact"] and r["inputs_untouched"], r
        assert r["grid"] == [2 * 2, 4, 1] and r["block"] == [128, 1, 1]  # B*H x AOT splits, four warps
    assert all("PTX ISA 8.0" in note for note in data["notes"])
    # the kernels launched are files, as an engine embeds them
    assert sorted(p.suffix for p in (out / "aot_kernels").iterdir()) == [".json", ".json", ".ptx", ".ptx"]


@needs_triton
@pytest.mark.slow
def test_masked_part(dry_run):
    _, out = dry_run
    data = load(out, "masked")
    assert [(r["dtype"], r["size"], r["mode"]) for r in data["rows"]] == [
        ("float32", 64, "eager"), ("float32", 128, "eager"), ("bfloat16", 64, "eager"), ("bfloat16", 128, "eager")]
    for row in data["rows"]:
        assert set(row["calls"]) == {"full", "masked 0.1", "masked 0.2", "masked 0.3", "masked 0.4", "small"}
        for b in row["buckets"]:
            assert b["ideal"] == pytest.approx((b["k"] + row["T"]) / (row["N"] + row["T"]))
            assert b["t_l_r_over_t_l"] > 0 and 0 < b["flop_ratio"] <= 1
    assert any("CUDA graphs: not on the CPU" in n for n in data["notes"])
    assert "| dtype | size | mode | r | k | t_l ms | t_l(r) ms |" in (out / "masked.md").read_text()


@needs_triton
@pytest.mark.slow
def test_e2e_part(dry_run):
    _, out = dry_run
    data = load(out, "e2e")
    assert set(data["per_call"]) == {"large", "large+kv", "small", "large_masked"}
    assert list(data["per_call"]["large_masked"]) == ["0.1", "0.2", "0.3", "0.4"]
    m = {row["method"]: row for row in data["rows"]}
    assert list(m) == ["large", "small", "t-stitch", "srdiffusion", "hybridstitch-10", "hybridstitch-20",
                       "hybridstitch-30", "hybridstitch-40"]  # fmt: skip
    assert m["large"]["speedup"] == 1.0
    assert m["hybridstitch-30"]["switch_steps"] == [2, 6]
    assert m["hybridstitch-30"]["stage_counts"] == {"large": 2, "masked": 4, "small": 2}
    assert m["t-stitch"]["stage_counts"] == {"small": 3, "large": 5}
    assert all(e["model"]["total_seconds"] > 0 for e in m.values())
    assert "| hybridstitch-30 | 2, 6 | 2/4/2 |" in (out / "e2e.md").read_text()


@pytest.mark.slow
def test_a_part_out_of_time_keeps_what_it_has(tmp_path):
    # one second for the end-to-end part: its runs are dropped, and it says so, instead of overrunning
    proc = run_suite(tmp_path, "--dry-run", "--out", "o", "--parts", "e2e", "--budget-s", "1", "--grace-s", "300")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = load(tmp_path / "o", "e2e")
    assert data["status"] == "partial" and data["dropped_methods"] and data["reps"] == 1
    assert "per_call" in data, "what was measured before the limit is kept"


def test_a_part_that_overruns_is_stopped(tmp_path):
    proc = run_suite(tmp_path, "--dry-run", "--out", "o", "--parts", "masked", "--budget-s", "1", "--grace-s", "0")
    assert proc.returncode == 1
    data = load(tmp_path / "o", "masked")
    assert data["status"] == "timed out" and "limit" in data["reason"]
    assert "**Status: timed out**" in (tmp_path / "o" / "masked.md").read_text()
    assert "| masked | timed out |" in (tmp_path / "o" / "summary.md").read_text()


def test_usage_errors(tmp_path):
    proc = run_suite(tmp_path, "--dry-run")
    assert proc.returncode == 2 and "--out" in proc.stderr
    proc = run_suite(tmp_path, "--dry-run", "--out", "o", "--parts", "kernel,warp")
    assert proc.returncode == 2 and "unknown part(s) warp" in proc.stderr
    if not torch.cuda.is_available():
        proc = run_suite(tmp_path, "--out", "o")
        assert proc.returncode == 2 and "--dry-run" in proc.stderr


def test_without_the_installed_package_it_says_how_to_install(tmp_path):
    # -S: no site-packages, so no installed hybridstitch (nor anything else)
    proc = subprocess.run([sys.executable, "-S", str(SCRIPT), "--out", "o"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 1 and "pip install --no-deps --no-build-isolation -e ." in proc.stderr


# -- the hooks: the parts that wait for code elsewhere run once it exists --------------------------------------


@pytest.fixture
def suite(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--dry-run", "--out", str(tmp_path), "--parts", "memory,batching"])
    ctx = module.Context(args, deadline=float("inf"))
    return module, ctx, tmp_path


def test_memory_hook(suite):
    module, ctx, out = suite
    report = module.PartReport("memory", str(out), True, 10.0)
    module.part_memory(ctx, report, export_module=types.SimpleNamespace())
    assert report["status"] == "skipped" and report["reason"] == module.NO_MEMORY_PLAN

    asked = {}

    def memory_plan(large_config, small_config, **kwargs):
        asked.update(kwargs, large_layers=large_config["num_layers"])
        return {"weights_large": 10_000, "kv_cache": 1_000, "workspace": 5}

    report = module.PartReport("memory", str(out), True, 10.0)
    module.part_memory(ctx, report, export_module=types.SimpleNamespace(memory_plan=memory_plan))
    assert report["status"] == "passed"
    assert asked == {"height": 128, "width": 128, "batch": 2, "text_tokens": 8, "precision": "fp32",
                     "buckets": module.BUCKETS, "large_layers": module.TINY_LARGE["num_layers"]}  # fmt: skip
    rows = {r["item"]: r for r in report["rows"]}
    assert set(rows) == {"weights_large", "weights_small", "kv_cache", "workspace"}
    large = module.build_transformer(module.TINY_LARGE, "cpu", torch.float32, 0)
    assert rows["weights_large"]["measured_bytes"] == sum(p.numel() * 4 for p in large.parameters())
    assert rows["weights_large"]["measured_over_planned"] == rows["weights_large"]["measured_bytes"] / 10_000
    # one request's cache: K and V of every layer, [2, heads, 64 image tokens (128^2 pixels / 8 / patch 2), head dim], fp32
    heads, dim, layers = (module.TINY_LARGE[k] for k in ("num_attention_heads", "attention_head_dim", "num_layers"))
    assert rows["kv_cache"]["measured_bytes"] == layers * 2 * (2 * heads * 64 * dim * 4)
    assert rows["workspace"]["measured_bytes"] is None
    assert "| weights_large |" in (out / "memory.md").read_text()


def test_batching_hook(suite):
    module, ctx, out = suite
    report = module.PartReport("batching", str(out), True, 10.0)
    module.part_batching(ctx, report, scheduler_module=types.SimpleNamespace())
    assert report["status"] == "skipped" and report["reason"] == module.NO_SCHEDULER

    seen = []

    def run_requests(large, small, flow, requests, guidance_scale):
        seen.append([(r["latents"].shape, r["cond"].prompt_embeds.shape[0], r["config"].name) for r in requests])
        return [None] * len(requests)

    report = module.PartReport("batching", str(out), True, 10.0)
    module.part_batching(ctx, report, scheduler_module=types.SimpleNamespace(run_requests=run_requests))
    assert report["status"] == "passed"
    assert [len(batch) for batch in seen] == [1, 2, 4, 8]
    assert seen[0][0] == (torch.Size([1, 16, 16, 16]), 2, "hybridstitch-30")  # one latent, CFG-batched text
    assert [r["requests"] for r in report["rows"]] == [1, 2, 4, 8] and report["rows"][0]["gain_over_one"] == 1.0


# -- the driver launch, with the driver faked: what reaches cuLaunchKernel -------------------------------------


def _abi_args(module):
    """A kernel and its TensorRT-order arguments, from the plugin's own launch computation."""
    from hybridstitch.plugins.aot import AotKernel
    from hybridstitch.plugins.tensorrt_plugin import aot_launch, tensorrt_kernel_arguments
    from hybridstitch.plugins.triton_kernel import INPUT_POINTERS, INT_ARGS, OUTPUT_POINTERS

    kernel = AotKernel(target="sm_90", dtype="fp16", head_dim=64, kernel_name="kern", ptx=".version 8.0", cubin=None,
                       num_warps=4, num_stages=2, shared_mem=49152, block_m=128, block_n=64,
                       arg_names=INPUT_POINTERS + INT_ARGS + OUTPUT_POINTERS)  # fmt: skip
    tensors = [torch.zeros(4) for _ in range(7)]  # q, k, v, ck, cv, idx, out
    launch = aot_launch(kernel, 2, 38, 1025, 64, 2304, 692)
    args = tensorrt_kernel_arguments(tensors[:6], launch, [tensors[6], tensors[3], tensors[4]])
    return kernel, launch, args, tensors


def test_driver_launch_through_cupy(suite, monkeypatch, tmp_path):
    import numpy as np

    module, _, _ = suite
    calls = {}

    class Function:
        def __call__(self, grid, block, args, *, shared_mem=0):
            calls.update(grid=grid, block=block, args=args, shared_mem=shared_mem)

    class RawModule:
        def __init__(self, *, path):
            calls["path"] = path

        def get_function(self, name):
            calls["name"] = name
            return Function()

    class ExternalStream:
        def __init__(self, handle):
            calls["stream"] = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fake = types.SimpleNamespace(__version__="14.2.0", RawModule=RawModule, cuda=types.SimpleNamespace(ExternalStream=ExternalStream))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: types.SimpleNamespace(cuda_stream=1234))
    kernel, launch, args, tensors = _abi_args(module)
    launcher = module.DriverLauncher(kernel, str(tmp_path / "k.ptx"))
    launcher(launch, args)
    assert calls["path"] == str(tmp_path / "k.ptx") and calls["name"] == "kern" and calls["stream"] == 1234
    assert calls["grid"] == (76, 4, 1) and calls["block"] == (128, 1, 1) and calls["shared_mem"] == 49152
    values = calls["args"]
    assert len(values) == 29
    # pointers as 64-bit values, the extra arguments as int32, in TensorRT's order; the cache outputs
    # (positions 27, 28) are the cache inputs' buffers (3, 4)
    assert [type(v) for v in values] == [np.uint64] * 6 + [np.int32] * 20 + [np.uint64] * 3
    assert [int(v) for v in values[:6]] == [t.data_ptr() for t in tensors[:6]]
    assert [int(v) for v in values[6:26]] == list(launch.int_args)
    assert [int(v) for v in values[26:]] == [tensors[6].data_ptr(), tensors[3].data_ptr(), tensors[4].data_ptr()]


def test_driver_launch_through_cuda_bindings(suite, monkeypatch, tmp_path):
    import ctypes

    module, _, _ = suite
    calls = {}

    class Err(int):
        pass

    def launch_kernel(fn, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        calls.update(fn=fn, grid=(gx, gy, gz), block=(bx, by, bz), shared=shared, stream=stream, params=params)
        return (Err(0),)

    driver = types.SimpleNamespace(
        cuModuleLoadData=lambda image: (calls.setdefault("image", image), Err(0))[::-1],
        cuModuleGetFunction=lambda mod, name: (Err(0), ("fn", name)),
        cuLaunchKernel=launch_kernel,
        CUstream=lambda handle: ("stream", handle),
    )
    monkeypatch.setitem(sys.modules, "cupy", None)  # no CuPy: the driver API
    monkeypatch.setitem(sys.modules, "cuda", types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "cuda.bindings", types.SimpleNamespace(driver=driver))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: types.SimpleNamespace(cuda_stream=99))
    (tmp_path / "k.ptx").write_text(".version 8.0\n")
    kernel, launch, args, tensors = _abi_args(module)
    launcher = module.DriverLauncher(kernel, str(tmp_path / "k.ptx"))
    assert "cuda-bindings" in launcher.api and "CuPy" in launcher.api
    launcher(launch, args)
    assert calls["fn"] == ("fn", b"kern") and calls["stream"] == ("stream", 99)
    assert calls["grid"] == (76, 4, 1) and calls["block"] == (128, 1, 1) and calls["shared"] == 49152
    values, kinds = calls["params"]
    assert kinds == (ctypes.c_void_p,) * 6 + (ctypes.c_int32,) * 20 + (ctypes.c_void_p,) * 3
    assert values[26:] == (tensors[6].data_ptr(), tensors[3].data_ptr(), tensors[4].data_ptr())
