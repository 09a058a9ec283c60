"""AOT compile of the Triton kernel for sm_80 / sm_89 / sm_90, on a machine without a GPU."""

import hashlib
import importlib.util
import os
import re
import subprocess
import tempfile

import pytest

from hybridstitch.errors import HybridStitchError
from hybridstitch.plugins import aot
from hybridstitch.plugins.aot import (
    PTX_VERSION,
    SHARED_MEM_LIMIT,
    max_ptx_version,
    ptx_isa_version,
    ptx_param_count,
    ptx_target,
    strip_runtime_params,
    why_ptx_cannot_load,
)
from hybridstitch.plugins.triton_kernel import CONSTEXPR_ARGS, INPUT_POINTERS, INT_ARGS, OUTPUT_POINTERS

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install triton)"
)
EXPECTED_PTX_TARGET = {"sm_80": "sm_80", "sm_89": "sm_89", "sm_90": "sm_90a"}  # Hopper wgmma needs sm_90a


@pytest.fixture(scope="module", params=sorted(EXPECTED_PTX_TARGET))
def compiled(request):
    from hybridstitch.plugins.aot import compile_for_target

    return compile_for_target(request.param, dtype="fp16", head_dim=64)


@needs_triton
def test_ptx_names_the_target(compiled):
    assert ptx_target(compiled.ptx) == EXPECTED_PTX_TARGET[compiled.target]
    assert f".entry {compiled.kernel_name}(" in compiled.ptx


@needs_triton
def test_entry_has_exactly_the_tensorrt_launch_arguments(compiled):
    # TensorRT passes input pointers, the int32 extra arguments, output pointers -- nothing else
    assert compiled.arg_names == INPUT_POINTERS + INT_ARGS + OUTPUT_POINTERS
    assert ptx_param_count(compiled.ptx, compiled.kernel_name) == len(compiled.arg_names)


@needs_triton
def test_ptxas_accepts_the_stripped_ptx(compiled):
    assert compiled.cubin is not None and compiled.cubin[:4] == b"\x7fELF"


@needs_triton
def test_launch_fits_a_plugin(compiled):
    assert compiled.shared_mem <= SHARED_MEM_LIMIT
    assert compiled.threads_per_block == 128
    # the alignment hints took effect: 16-byte loads / async copies, not scalar 2-byte loads
    assert re.search(r"cp\.async|ld\.global\.v4", compiled.ptx)


@needs_triton
def test_write_kernel(compiled, tmp_path):
    from hybridstitch.plugins.aot import read_kernel, write_kernel

    paths = write_kernel(compiled, tmp_path)
    assert sorted(p.suffix for p in paths) == [".cubin", ".json", ".ptx"]
    assert paths[0].read_text() == compiled.ptx
    # what a launcher reads back is the kernel that was compiled, field for field
    assert read_kernel(paths[1]) == compiled


@needs_triton
def test_ptx_carries_the_chosen_isa_version(compiled):
    # Triton's default is the newest its ptxas knows (3.9: 9.4 on sm_90), which a CUDA 13.0 driver
    # (580.x, PTX <= 9.0) refuses to JIT; the AOT build stamps PTX_VERSION on every target
    want = (PTX_VERSION // 10, PTX_VERSION % 10)
    assert ptx_isa_version(compiled.ptx) == want
    assert compiled.ptx_version == f"{want[0]}.{want[1]}"
    assert ptx_isa_version(compiled.ptx) <= max_ptx_version((13, 0)), "the H200 test machine's driver must load it"
    assert why_ptx_cannot_load(compiled.ptx_version, (12, 0)) is None, "every CUDA 12+ driver loads it"


def _cuobjdump() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else None


def _sass_digest(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return hashlib.sha256("\n".join(line for line in text.splitlines() if "/*" in line).encode()).hexdigest()


@needs_triton
@pytest.mark.skipif(_cuobjdump() is None, reason="the triton wheel here carries no cuobjdump to disassemble with")
def test_older_ptx_isa_gives_the_same_machine_code(compiled):
    # the reason PTX_VERSION costs nothing: ptxas makes the same SASS from it as from Triton's default
    from hybridstitch.plugins.aot import compile_for_target

    default = compile_for_target(compiled.target, dtype="fp16", head_dim=64, ptx_version=None)
    assert _sass_digest(compiled.cubin) == _sass_digest(default.cubin)


@needs_triton
def test_a_ptx_version_too_old_for_the_target_is_refused_not_aborted():
    from hybridstitch.plugins.aot import compile_for_target

    # LLVM would abort the whole process here ("PTX version 7.8 does not support target 'sm_90a'")
    with pytest.raises(HybridStitchError, match="8.0 or newer"):
        compile_for_target("sm_90", ptx_version=78)


@needs_triton
def test_constexprs_are_the_kernels(compiled):
    consts = compiled.constexprs()
    assert tuple(consts) == CONSTEXPR_ARGS
    assert consts["HEAD_DIM"] == 64 and consts["BLOCK_M"] == compiled.block_m and consts["BLOCK_N"] == compiled.block_n
    assert consts["DOT_PRECISION"] == "tf32" and consts["SM_SCALE"] == 64**-0.5


@pytest.mark.parametrize(
    "driver, newest",
    [((12, 0), (8, 0)), ((12, 4), (8, 4)), ((12, 6), (8, 5)), ((12, 8), (8, 7)), ((12, 9), (8, 8)),
     ((13, 0), (9, 0)), ((13, 2), (9, 2)), (13000, (9, 0)), (12080, (8, 7)), ("12.9", (8, 8)), ((11, 8), (7, 8))],
)  # fmt: skip
def test_newest_ptx_a_driver_loads(driver, newest):
    assert max_ptx_version(driver) == newest


def test_why_ptx_cannot_load():
    # the case of pytorch/TensorRT#4147: Triton 3.9's default sm_90 PTX on a CUDA 13.0 driver
    reason = why_ptx_cannot_load("9.4", (13, 0))
    assert reason is not None and "9.4" in reason and "13.0" in reason and "update the driver" in reason
    assert why_ptx_cannot_load("9.0", 13000) is None
    assert why_ptx_cannot_load((8, 8), (12, 8)) is not None
    assert why_ptx_cannot_load("8.0", "12.0") is None
    with pytest.raises(HybridStitchError, match="version"):
        why_ptx_cannot_load("eight", (13, 0))


def test_driver_cuda_version_reads_libcuda(monkeypatch):
    import ctypes

    class FakeLibcuda:
        def cuDriverGetVersion(self, out):  # noqa: N802 -- the CUDA driver API's name
            ctypes.cast(out, ctypes.POINTER(ctypes.c_int)).contents.value = 13000
            return 0

    monkeypatch.setattr(aot.ctypes, "CDLL", lambda name: FakeLibcuda())
    assert aot.driver_cuda_version() == (13, 0)

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(aot.ctypes, "CDLL", missing)
    assert aot.driver_cuda_version() is None


@needs_triton
def test_unknown_target_and_dtype_are_refused():
    from hybridstitch.plugins.aot import compile_for_target

    with pytest.raises(HybridStitchError, match="sm_80"):
        compile_for_target("sm_75")
    with pytest.raises(HybridStitchError, match="fp16"):
        compile_for_target("sm_80", dtype="int8")


PTX = """
.visible .entry kern(
\t.param .u64 .ptr .global .align 1 kern_param_0,
\t.param .u32 kern_param_1,
\t.param .u64 .ptr .global .align 1 kern_param_2,
\t.param .u64 .ptr .global .align 1 kern_param_3
)
.reqntid 128
{
\tld.param.b64 %rd1, [kern_param_0];
\tld.param.b32 %r1, [kern_param_1];
\tBODY
}
"""


def test_strip_runtime_params_drops_only_unread_trailing_params():
    stripped = strip_runtime_params(PTX.replace("BODY", ""), "kern", 2)
    assert ptx_param_count(stripped, "kern") == 2
    assert "kern_param_1\n)" in stripped and "kern_param_2" not in stripped
    assert stripped.endswith(PTX.replace("BODY", "")[PTX.index(")\n.reqntid") :])


def test_strip_runtime_params_refuses_a_read_scratch_param():
    with pytest.raises(HybridStitchError, match="kern_param_3"):
        strip_runtime_params(PTX.replace("BODY", "ld.param.b64 %rd2, [kern_param_3];"), "kern", 2)
    with pytest.raises(HybridStitchError, match="no .entry"):
        strip_runtime_params(PTX, "other", 2)
