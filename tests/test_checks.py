"""The argument checks (hybridstitch/checks.py) and the loop's non-finite guard, alone."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridstitch import HybridStitchError
from hybridstitch import checks


def test_integers_take_numpy_and_refuse_bools_floats_and_strings():
    assert checks.integer("n", 4) == 4 and type(checks.integer("n", np.int64(4))) is int
    assert checks.integer("n", torch.tensor(3)) == 3
    for bad, fragment in ((True, "the bool True"), (4.0, "got 4.0 (float)"), ("4", "got '4' (str)"),
                          (np.float64(4), "float64"), (None, "NoneType")):
        with pytest.raises(HybridStitchError, match="n must be an integer") as e:
            checks.integer("n", bad)
        assert fragment in str(e.value)
    with pytest.raises(HybridStitchError, match=">= 1, got 0"):
        checks.integer("n", 0, minimum=1)
    with pytest.raises(HybridStitchError, match=r"in \[0, 9\], got 10"):
        checks.integer("n", 10, minimum=0, maximum=9)


def test_reals_must_be_finite_numbers():
    assert checks.real("g", 7) == 7.0 and checks.real("g", np.float32(1.5)) == 1.5
    for bad in (float("inf"), -float("inf"), float("nan"), np.float64("nan")):
        with pytest.raises(HybridStitchError, match="g must be a finite number"):
            checks.real("g", bad)
    for bad in ("7", True, torch.tensor(7.0), None):
        with pytest.raises(HybridStitchError, match="g must be a real number"):
            checks.real("g", bad)


def test_tensors_are_torch_floating_and_finite():
    x = torch.zeros(2, 3)
    assert checks.tensor("x", x, ndim=2) is x
    with pytest.raises(HybridStitchError, match=r"NumPy array; pass a torch tensor \(torch.from_numpy\(x\)\)"):
        checks.tensor("x", np.zeros((2, 3), np.float32))
    with pytest.raises(HybridStitchError, match="floating-point tensor, got dtype torch.int64"):
        checks.tensor("x", torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(HybridStitchError, match="3 dimensions, got shape \\[2, 3\\]"):
        checks.tensor("x", x, ndim=3)
    y = x.clone()
    y[1, 2] = float("nan")
    y[0, 0] = float("inf")
    with pytest.raises(HybridStitchError, match="x holds 2 NaN or infinite value\\(s\\) of 6"):
        checks.tensor("x", y)


def test_prompts_and_generators():
    assert checks.prompts("prompt", "a cat") == ["a cat"] and checks.prompts("prompt", ("a", "")) == ["a", ""]
    for bad, fragment in ((3, "string or a list of strings, got int"), ([], "empty list"),
                          (["a", 3], r"prompt\[1\] must be a string")):
        with pytest.raises(HybridStitchError, match=fragment):
            checks.prompts("prompt", bad)
    g = torch.Generator()
    assert checks.generators(None, 2) is None and checks.generators(g, 2) is g
    assert checks.generators((g, g), 2) == [g, g]
    with pytest.raises(HybridStitchError, match="got 1 generators for 2 image"):
        checks.generators([g], 2)
    with pytest.raises(HybridStitchError, match=r"generator\[1\] must be a torch.Generator"):
        checks.generators([g, 0], 2)
    with pytest.raises(HybridStitchError, match="torch.Generator\\(\\).manual_seed\\(42\\)"):
        checks.generators(42, 1)


def test_check_finite_names_the_step_the_stage_and_the_samples():
    checks.check_finite(torch.zeros(3, 4, 2, 2), 5, "masked")  # finite: nothing happens
    x = torch.zeros(3, 4, 2, 2)
    x[1, 2, 0, 1] = float("nan")
    x[2, 0, 0, 0] = -float("inf")
    with pytest.raises(HybridStitchError) as e:
        checks.check_finite(x, 7, "masked")
    assert "after step 7 (masked stage), sample(s) [1, 2]" in str(e.value)
    with pytest.raises(HybridStitchError, match=r"sample\(s\) \[11, 12\]"):
        checks.check_finite(x, 7, "small", samples=[10, 11, 12])  # rows of a group -> request sample ids


@settings(max_examples=30, deadline=None, derandomize=True)
@given(batch=st.integers(1, 4), bad=st.sets(st.integers(0, 3)), value=st.sampled_from([math.nan, math.inf, -math.inf]),
       step=st.integers(0, 49), kind=st.sampled_from(["large", "masked", "small"]))
def test_check_finite_property(batch, bad, value, step, kind):
    """Raises exactly when some sample is non-finite, and names exactly those samples."""
    bad = sorted(b for b in bad if b < batch)
    x = torch.randn(batch, 2, 3, 3, generator=torch.Generator().manual_seed(step))
    for b in bad:
        x[b, 1, b % 3, 2] = value
    if not bad:
        checks.check_finite(x, step, kind)
        return
    with pytest.raises(HybridStitchError) as e:
        checks.check_finite(x, step, kind)
    assert f"after step {step} ({kind} stage), sample(s) {bad}" in str(e.value)
