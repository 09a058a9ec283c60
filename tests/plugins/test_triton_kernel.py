"""The Triton kernel against the torch reference, on CPU under Triton's interpreter.

The interpreter runs in a subprocess with ``TRITON_INTERPRET=1``: the flag is read when the
kernel is first built and would otherwise leak into every other test of this process (an
interpreted kernel cannot be AOT-compiled, for one). One subprocess runs all cases and
reports per-case results as JSON; the tests below check them.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridstitch.errors import HybridStitchError
from hybridstitch.plugins.triton_kernel import KernelConfig, block_d, cached_kv_attention_triton

REPO = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install triton)"
)

# (B, H, N, k, T, D, dtype, block_m, block_n, splits, layout). Tiles of 16 keep the interpreter
# fast and make every size below cross a tile edge somewhere.
CASES = {
    "fp32": (2, 2, 40, 7, 5, 16, "float32", 16, 16, None, "contiguous"),
    "fp32-T0": (2, 2, 40, 7, 0, 16, "float32", 16, 16, None, "contiguous"),  # image-only attn2
    "fp32-k0": (2, 2, 20, 0, 9, 16, "float32", 16, 16, None, "contiguous"),  # nothing masked
    "fp32-all-masked": (1, 2, 16, 16, 3, 16, "float32", 16, 16, None, "contiguous"),  # k = N
    "fp32-many-blocks": (2, 1, 70, 20, 13, 32, "float32", 16, 32, 2, "contiguous"),  # 3 query blocks, 2 splits
    "fp32-one-block-per-program": (2, 1, 70, 20, 13, 32, "float32", 16, 16, 3, "contiguous"),
    "fp32-diffusers-layout": (2, 3, 33, 6, 7, 16, "float32", 16, 16, None, "transposed"),  # [B,S,H,D].transpose(1,2)
    "fp16-odd": (1, 3, 37, 11, 19, 24, "float16", 16, 16, 2, "contiguous"),  # head dim 24 padded to 32
    "fp16": (2, 2, 45, 5, 13, 16, "float16", 16, 16, None, "contiguous"),
    "bf16": (2, 2, 45, 5, 13, 16, "bfloat16", 16, 16, None, "contiguous"),
}
BF16_REASON = "Triton's interpreter computes bf16 tl.dot wrong (seen with 3.9; numpy has no bf16); bf16 parity is in benchmarks/gpu_suite.py"

_RUNNER = r"""
import json, sys
import torch
torch.set_num_threads(1)
from hybridstitch.plugins.cached_kv import cached_kv_attention_reference
from hybridstitch.plugins.triton_kernel import KernelConfig, cached_kv_attention_triton, interpreter_problem

if interpreter_problem():  # this Triton + NumPy cannot interpret the kernel: say why, run nothing
    print("SKIP " + interpreter_problem())
    sys.exit(0)
results = {}
for name, (b, h, n, k, t, d, dtype, bm, bn, splits, layout) in json.loads(sys.argv[1]).items():
    g = torch.Generator().manual_seed(len(results))
    dtype = getattr(torch, dtype)
    def qkv():
        if layout == "transposed":  # diffusers: [B, S, H, D] viewed as [B, H, S, D]
            return torch.randn(b, k + t, h, d, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(b, h, k + t, d, generator=g).to(dtype)
    q, key, v = qkv(), qkv(), qkv()
    cache_k, cache_v = (torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(2))
    # a different permutation per batch row: different masked positions per sample
    index = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b)])
    ref_out, ref_k, ref_v = cached_kv_attention_reference(
        q.float(), key.float(), v.float(), cache_k.float(), cache_v.float(), index)
    inputs_before = [x.clone() for x in (q, key, v, index)]
    ck, cv = cache_k.clone(), cache_v.clone()
    out, ck_out, cv_out = cached_kv_attention_triton(
        q, key, v, ck, cv, index, config=KernelConfig(block_m=bm, block_n=bn, num_warps=1, num_stages=1), splits=splits)
    results[name] = {
        "out_err": (out.float() - ref_out).abs().max().item() if out.numel() else 0.0,
        "out_shape": list(out.shape),
        "out_dtype": str(out.dtype),
        "caches_equal": bool(torch.equal(ck_out.float(), ref_k) and torch.equal(cv_out.float(), ref_v)),
        "caches_in_place": ck_out is ck and cv_out is cv,
        "inputs_untouched": all(torch.equal(a, b) for a, b in zip(inputs_before, (q, key, v, index))),
    }
print("RESULTS" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(CASES)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    if proc.stdout.startswith("SKIP "):
        pytest.skip(proc.stdout.strip().removeprefix("SKIP "))
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULTS"))
    return json.loads(line.removeprefix("RESULTS"))


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_output_matches_reference(interpreted, case):
    b, h, n, k, t, d, dtype, *_ = CASES[case]
    if dtype == "bfloat16":
        pytest.skip(BF16_REASON)
    result = interpreted[case]
    assert result["out_shape"] == [b, h, k + t, d]
    assert result["out_dtype"] == f"torch.{dtype}"
    # fp32: fp32 FMA dot products vs torch's; fp16: the kernel rounds softmax weights to fp16
    tolerance = {"float32": 1e-5, "float16": 2e-3}[dtype]
    assert result["out_err"] <= tolerance


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_cache_updated_in_place_exactly(interpreted, case):
    result = interpreted[case]
    assert result["caches_equal"], "the scatter is a copy: the updated caches must equal the reference's bit for bit"
    assert result["caches_in_place"], "the launcher returns the caller's cache tensors, updated in place"
    assert result["inputs_untouched"], "query/key/value/index must not be written"


def _inputs(b=1, h=2, n=8, k=3, t=2, d=16, dtype=torch.float32):
    q, key, v = (torch.randn(b, h, k + t, d, dtype=dtype) for _ in range(3))
    cache_k, cache_v = (torch.randn(b, h, n, d, dtype=dtype) for _ in range(2))
    return [q, key, v, cache_k, cache_v, torch.arange(k).repeat(b, 1)]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.__setitem__(1, a[1][:, :, :-1]), "must share one shape"),
        (lambda a: a.__setitem__(3, a[3][:, :1]), "cache_k/cache_v must be"),
        (lambda a: a.__setitem__(5, a[5].int()), "index must be int64"),
        (lambda a: a.__setitem__(5, torch.zeros(1, 9, dtype=torch.int64)), "k <= 5"),
        (lambda a: [a.__setitem__(i, a[i].double()) for i in range(5)], "float16, bfloat16, float32"),
        (lambda a: [a.__setitem__(i, a[i][:, :, :0]) for i in (3, 4)], "run a full large step"),
        (lambda a: a.__setitem__(4, a[4].transpose(2, 3).contiguous().transpose(2, 3)), "equal strides"),
    ],
)
def test_bad_inputs_say_what_to_fix(mutate, message):
    args = _inputs()
    mutate(args)
    with pytest.raises(HybridStitchError, match=message):
        cached_kv_attention_triton(*args)


@needs_triton
def test_cpu_tensors_without_interpreter_are_refused():
    code = (
        "import torch\n"
        "from hybridstitch.errors import HybridStitchError\n"
        "from hybridstitch.plugins.triton_kernel import cached_kv_attention_triton\n"
        "a = [torch.randn(1, 1, 4, 16) for _ in range(3)] + [torch.randn(1, 1, 8, 16) for _ in range(2)]\n"
        "try:\n"
        "    cached_kv_attention_triton(*a, torch.zeros(1, 2, dtype=torch.int64))\n"
        "except HybridStitchError as e:\n"
        "    print('REFUSED', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert "REFUSED" in proc.stdout and "TRITON_INTERPRET=1" in proc.stdout, proc.stderr[-2000:]


@needs_triton
def test_interpreter_problem_is_reported_by_the_launcher():
    # On a Triton/NumPy pair whose interpreter cannot run the kernel (Triton 3.6 with NumPy 2.4+)
    # the CPU launch refuses with the reason instead of an InterpreterError from inside Triton;
    # where the pair works, the launch runs. Either way the reason and the launcher agree.
    code = (
        "import torch\n"
        "from hybridstitch.errors import HybridStitchError\n"
        "from hybridstitch.plugins.triton_kernel import KernelConfig, cached_kv_attention_triton, interpreter_problem\n"
        "a = [torch.randn(1, 1, 4, 16) for _ in range(3)] + [torch.randn(1, 1, 8, 16) for _ in range(2)]\n"
        "try:\n"
        "    cached_kv_attention_triton(*a, torch.zeros(1, 2, dtype=torch.int64), config=KernelConfig(16, 16, 1, 1))\n"
        "    print('RAN', interpreter_problem())\n"
        "except HybridStitchError as e:\n"
        "    print('REFUSED', str(e) == interpreter_problem())\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.stdout.strip() in ("RAN None", "REFUSED True"), proc.stdout + proc.stderr[-2000:]


def test_kernel_config_and_head_dim_padding():
    with pytest.raises(HybridStitchError, match="power of two"):
        KernelConfig(block_m=48)
    with pytest.raises(HybridStitchError, match=">= 16"):
        KernelConfig(block_n=8)
    assert [block_d(d) for d in (8, 16, 24, 64, 80, 128)] == [16, 16, 32, 64, 128, 128]


def test_plugin_modules_import_without_triton_or_tensorrt():
    # each module imports its GPU-only dependency inside functions
    code = (
        "import sys\n"
        "import hybridstitch.plugins, hybridstitch.plugins.triton_kernel, hybridstitch.plugins.aot\n"
        "import hybridstitch.plugins.torch_op, hybridstitch.plugins.tensorrt_plugin\n"
        "import hybridstitch.plugins.onnx_for_tensorrt, hybridstitch.plugins.ort_providers\n"
        "print(sorted(m for m in ('triton', 'tensorrt', 'onnxruntime') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
