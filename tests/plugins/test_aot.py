"""AOT compile of the Triton kernel for sm_80 / sm_89 / sm_90, on a machine without a GPU."""

import importlib.util
import re

import pytest

from hybridstitch.errors import HybridStitchError
from hybridstitch.plugins.aot import SHARED_MEM_LIMIT, ptx_param_count, ptx_target, strip_runtime_params
from hybridstitch.plugins.triton_kernel import INPUT_POINTERS, INT_ARGS, OUTPUT_POINTERS

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
    from hybridstitch.plugins.aot import write_kernel

    paths = write_kernel(compiled, tmp_path)
    assert sorted(p.suffix for p in paths) == [".cubin", ".json", ".ptx"]
    assert paths[0].read_text() == compiled.ptx


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
