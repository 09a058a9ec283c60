"""Property tests over the API's arguments (issue 15): whatever a careless or hostile caller
passes to ``HybridStitchPipeline.__call__`` -- on the tiny torch pair with embeddings, on the
shipped testbed folder with prompts -- or to ``hybridstitch generate``, the result is either a
HybridStitchError (one line and exit 2 on the command line, no file changed) or a finite result
equal to a reference run with the same arguments in plain Python types. Never a raw exception.

Few examples, derandomized, no deadline: the three tests take well under a minute together.
"""

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hybridstitch import HybridStitchError, HybridStitchPipeline, StitchConfig
from hybridstitch.cli import main
from hybridstitch.testbed import LARGE_DIR, SMALL_DIR
from tests.conftest import JOINT_DIM, POOLED_DIM

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

def mostly(valid, invalid, odds: int = 8):
    """``valid`` about ``odds`` times in ``odds + 1``: with ten arguments, about a third of the calls
    are entirely valid and run, the rest fail on one or two bad arguments."""
    # (st.one_of would merge the repeated branches and pick invalid half the time.)
    return st.integers(0, odds).flatmap(lambda i: invalid if i == odds else valid)


# Arguments: valid values (plain and NumPy) mixed with the wrong types and ranges users pass.
STEPS = mostly(st.one_of(st.integers(1, 3), st.sampled_from([np.int64(2), np.int32(1)])),
               st.one_of(st.integers(-2, 0), st.booleans(), st.floats(allow_nan=True, allow_infinity=True),
                         st.just("2"), st.none(), st.just(2**70)))
GUIDANCE = mostly(st.sampled_from([1.0, 4.5, 1, np.float32(2.0), 0.0, np.int64(3)]),
                  st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just("7"), st.none(), st.booleans(),
                            st.just(torch.tensor(3.0)), st.just(1e38)))
SIZE = mostly(st.sampled_from([None, 64, 32, 48, np.int64(32)]),
              st.sampled_from([0, -16, 72, 288, 64.0, "64", True, [64]]))
PER_PROMPT = mostly(st.sampled_from([1, 2, np.int64(2)]), st.sampled_from([0, -1, 1.0, True, None]))
SEEDS = mostly(st.one_of(st.none(), st.integers(0, 3)),
               st.one_of(st.lists(st.integers(0, 3), min_size=0, max_size=3), st.sampled_from(["int", "text"])))
OUTPUT = mostly(st.just("latent"), st.sampled_from(["pil", "pt", None, 3]), odds=4)
CONFIG = mostly(st.sampled_from(["large", "small", "hybridstitch-30", "t-stitch", "srdiffusion",
                                 StitchConfig(mask_ratios=(0.3,), thresholds=(float("inf"), 0.0))]),
                st.sampled_from(["fast", None, 3, ["large"]]))
EMBEDS = mostly(st.sampled_from(["ok", "ok2"]),
                st.sampled_from(["numpy", "nan", "inf_pooled", "2d", "int", "no_pooled", "no_negative",
                                 "wrong_width", "negative_shape", "none", "list"]))
LATENTS = mostly(st.sampled_from(["none", "right"]), st.sampled_from(["wrong_shape", "nan", "numpy", "int", "list"]))


def plain(value):
    """The same value in plain Python types (the reference run's argument)."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def generator_arg(seeds):
    if seeds is None or seeds == "text":
        return seeds if seeds is None else "seed"
    if seeds == "int":
        return 42
    if isinstance(seeds, list):
        return [torch.Generator().manual_seed(s) for s in seeds]
    return torch.Generator().manual_seed(seeds)


def embeddings(kind: str) -> dict:
    g = torch.Generator().manual_seed(7)
    b = 2 if kind == "ok2" else 1
    e = dict(prompt_embeds=torch.randn(b, 5, JOINT_DIM, generator=g), pooled_prompt_embeds=torch.randn(b, POOLED_DIM, generator=g),
             negative_prompt_embeds=torch.randn(b, 5, JOINT_DIM, generator=g),
             negative_pooled_prompt_embeds=torch.randn(b, POOLED_DIM, generator=g))
    if kind == "numpy":
        e["prompt_embeds"] = e["prompt_embeds"].numpy()
    elif kind == "nan":
        e["negative_prompt_embeds"][0, 0, 0] = float("nan")
    elif kind == "inf_pooled":
        e["pooled_prompt_embeds"][0, 0] = float("inf")
    elif kind == "2d":
        e["prompt_embeds"] = e["prompt_embeds"][0]
    elif kind == "int":
        e["pooled_prompt_embeds"] = e["pooled_prompt_embeds"].long()
    elif kind == "no_pooled":
        del e["pooled_prompt_embeds"]
    elif kind == "no_negative":
        del e["negative_prompt_embeds"]
    elif kind == "wrong_width":
        e["prompt_embeds"] = torch.zeros(1, 5, JOINT_DIM + 1)
    elif kind == "negative_shape":
        e["negative_prompt_embeds"] = torch.zeros(1, 6, JOINT_DIM)
    elif kind == "none":
        e = {}
    elif kind == "list":
        e["prompt_embeds"] = e["prompt_embeds"].tolist()
    return e


def latents_arg(kind: str, batch, size, channels: int):
    def int_or(v, default):
        v = plain(v)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else default

    side = int_or(size, 128) // 8
    shape = (max(1, batch), channels, max(1, side), max(1, side))
    g = torch.Generator().manual_seed(11)
    if kind == "none":
        return None
    x = torch.randn(shape, generator=g)
    if kind == "wrong_shape":
        return x[..., :-1] if shape[-1] > 1 else torch.randn(1, 3)
    if kind == "nan":
        x[0, 0, 0, 0] = float("nan")
    if kind == "numpy":
        return x.numpy()
    if kind == "int":
        return x.long()
    if kind == "list":
        return x.tolist()
    return x


def call_and_compare(pipe, kwargs: dict, rebuild) -> None:
    """``pipe(**kwargs)`` must raise HybridStitchError or give a finite result equal to the same call
    with plain-typed arguments and fresh generators (``rebuild()``)."""
    torch.manual_seed(1234)  # without a generator, both calls draw the same noise from the global RNG
    try:
        out = pipe(progress=False, **kwargs)
    except HybridStitchError as e:
        assert str(e) and "\n" not in str(e).strip()
        event("refused: " + str(e)[:40])
        return
    event("ran")
    images = out.images
    if isinstance(images, torch.Tensor):
        assert torch.isfinite(images).all()
    torch.manual_seed(1234)
    ref = pipe(progress=False, **rebuild())
    if isinstance(images, torch.Tensor):
        assert torch.equal(images, ref.images)
    else:
        assert [np.asarray(a).tolist() for a in images] == [np.asarray(b).tolist() for b in ref.images]


@FUZZ
@given(steps=STEPS, guidance=GUIDANCE, height=SIZE, width=SIZE, per_prompt=PER_PROMPT, seeds=SEEDS, output=OUTPUT,
       config=CONFIG, embeds=EMBEDS, latents=LATENTS)
def test_any_arguments_on_the_tiny_pair(tiny_pipe, steps, guidance, height, width, per_prompt, seeds, output, config,
                                        embeds, latents):
    batch = (2 if embeds == "ok2" else 1) * (plain(per_prompt) if isinstance(plain(per_prompt), int) else 1)

    def build(plain_types=False):
        conv = plain if plain_types else (lambda v: v)
        kw = dict(num_inference_steps=conv(steps), guidance_scale=conv(guidance), height=conv(height),
                  width=conv(width), num_images_per_prompt=conv(per_prompt), generator=generator_arg(seeds),
                  output_type=output, config=config, latents=latents_arg(latents, batch, height, 16), **embeddings(embeds))
        return {k: v for k, v in kw.items() if v is not None or k in ("height", "width", "generator", "latents")}

    call_and_compare(tiny_pipe, build(), lambda: build(plain_types=True))


PROMPTS = mostly(st.one_of(st.sampled_from(["a handwritten 3", "7", "", "digit 0"]),
                           st.lists(st.sampled_from(["a handwritten 1", "2", ""]), min_size=1, max_size=3)),
                 st.one_of(st.text(max_size=6), st.lists(st.sampled_from(["a cat", 3, None]), max_size=2),
                           st.integers(), st.none()))


@pytest.fixture(scope="module")
def testbed():
    return HybridStitchPipeline.from_pretrained(large=LARGE_DIR, small=SMALL_DIR)


def weights_state() -> dict:
    out = {}
    for folder in (LARGE_DIR, SMALL_DIR):
        for root, _, files in os.walk(folder):
            for f in files:
                st_ = os.stat(os.path.join(root, f))
                out[os.path.join(root, f)] = (st_.st_size, st_.st_mtime_ns)
    return out


@FUZZ
@given(prompt=PROMPTS, negative=PROMPTS, steps=STEPS, guidance=GUIDANCE, size=SIZE, per_prompt=PER_PROMPT,
       seeds=SEEDS, output=OUTPUT, config=CONFIG)
def test_any_arguments_on_the_testbed_folder(testbed, prompt, negative, steps, guidance, size, per_prompt, seeds,
                                             output, config):
    before = weights_state()

    def build(plain_types=False):
        conv = plain if plain_types else (lambda v: v)
        return dict(prompt=prompt, negative_prompt=negative, num_inference_steps=conv(steps),
                    guidance_scale=conv(guidance) if guidance is not None else 1.25, height=conv(size), width=conv(size),
                    num_images_per_prompt=conv(per_prompt) if per_prompt is not None else 1,
                    generator=generator_arg(seeds), output_type=output, config=config)

    call_and_compare(testbed, build(), lambda: build(plain_types=True))
    assert weights_state() == before


def cli(valid, invalid):
    return mostly(st.sampled_from(valid), st.sampled_from(invalid), odds=10)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(steps=cli(["2", "1"], ["0", "-1", "2.5", "abc", "inf", "1e400", str(2**70), ""]),
       guidance=cli(["1.25", "1", "-3"], ["inf", "nan", "x", "1e39"]),
       seed=cli(["0", "5", str(2**64 - 1)], [str(2**64), "-1", "1.5"]),
       size=cli([None, "32", "16"], ["0", "33", "64", "-32"]), threads=cli([None, "1"], ["0", "-1", "x"]),
       out=cli(["img.png", "new/sub/img.png", "old.png"], [".", "keep.txt/img.png", ""]),
       trace=cli([None, "trace.json"], [".", "img.png", "keep.txt/t.json"]),
       prompt=cli(["a handwritten 4", "7"], ["a cat", "a handwritten 12"]))
def test_any_generate_command_line(tmp_path_factory, capsys, steps, guidance, seed, size, threads, out, trace, prompt):
    work = tmp_path_factory.mktemp("cli")
    (work / "keep.txt").write_text("mine")
    (work / "old.png").write_bytes(b"an old image")
    argv = ["generate", "--large", LARGE_DIR, "--small", SMALL_DIR, "--prompt", prompt, "--steps", steps,
            "--guidance-scale", guidance, "--seed", seed, "--out", str(work / out) if out else "", "--no-progress"]
    for flag, value in (("--height", size), ("--width", size), ("--threads", threads)):
        if value is not None:
            argv += [flag, value]
    if trace is not None:
        argv += ["--trace", str(work / trace)]
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    event(f"exit {rc}")
    if rc == 2:
        assert err.startswith("hybridstitch: error: ") and err.count("\n") == 1, err
        assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before
    else:
        assert rc == 0, err
        written = {work / out} | ({work / trace} if trace else set())
        assert all(p.is_file() for p in written)
        assert {p: b for p, b in before.items() if p not in written} == {
            p: p.read_bytes() for p in before if p not in written}  # nothing else touched
