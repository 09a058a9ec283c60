"""One denoising step of every sample in flight, with the engine calls grouped by engine.

In the manner of gpt-fast's ``decode_one_token``: a small function of samples and denoisers. Each
sample asks its own stage policy what to run (DESIGN.md section 2), then the step runs

* ONE full large call for every sample in the large stage (storing the KV cache when its
  config needs one) and every FullLarge-ablation sample in a masked stage;
* ONE masked large call per masked-token count k, each sample with its own mask rows and
  cache rows;
* ONE small call for every sample in a masked or the small stage;

then, per sample: the large tokens overwrite the small output at the masked positions,
classifier-free guidance, Eq. 10 and Eq. 9 on its own latents, its policy observes ``d_i``, and
the Euler update. A sample's rows are side by side in every call ([unconditional, conditional]
with guidance) and may be at different timesteps; nothing of a sample depends on the others.

    step(samples, large, small)                # every sample advances one step
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

from . import kvcache
from .checks import check_finite
from .errors import HybridStitchError
from .metrics import predict_x0, relative_l1_rows
from .sample import Sample, euler_step
from .tokens import gather_tokens, merge_masked, patchify
from .trace import StepRecord


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so per-call timings count the device time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class CallTimes:
    """Times of one step's engine calls and who took part in each: the engine's own run time when
    the backend reports it (``last_run_seconds``: its Python around the run counts as overhead),
    else the call's; on a GPU through CUDA events, read once at the end of the step."""

    device: torch.device
    calls: list = field(default_factory=list)  # (name, member ids, seconds or (start, end) events)

    def __call__(self, name: str, members: Sequence[int], denoiser: Any, fn: Callable[[], Any]) -> Any:
        if self.device.type == "cuda" and getattr(denoiser, "last_run_seconds", None) is None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            self.calls.append((name, tuple(members), (start, end)))
            return out
        t0 = time.perf_counter()
        out = fn()
        synchronize(self.device)
        engine = getattr(denoiser, "last_run_seconds", None)
        self.calls.append((name, tuple(members), engine if engine is not None else time.perf_counter() - t0))
        return out

    def finish(self) -> list[tuple[str, tuple, float]]:
        """``[(name, member ids, seconds)]`` of every call."""
        out = []
        for name, members, t in self.calls:
            if isinstance(t, tuple):
                t[1].synchronize()
                t = t[0].elapsed_time(t[1]) / 1e3
            out.append((name, members, t))
        return out


def rows_of(samples: Sequence[Sample], attr: str) -> torch.Tensor:
    """The samples' tensors of ``attr`` (latents repeated per row) as one batch, in sample order."""
    parts = []
    for s in samples:
        x = getattr(s, attr)
        parts.append(x.expand(s.rows, *x.shape[1:]) if attr == "latents" else x)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


_TEXT_LOCK = threading.Lock()


def text_rows(samples: Sequence[Sample], attr: str) -> torch.Tensor:
    """The samples' text conditioning (``prompt_embeds`` or ``pooled``) as one batch. It does not
    change while the samples run, so the batch is made once per group of samples and reused while
    the same samples share a call (kept by the group's first sample, a few groups at most: the
    small and the large calls of a step group the samples differently)."""
    if len(samples) == 1:
        return getattr(samples[0], attr)
    key = (attr, tuple(s.id for s in samples))
    with _TEXT_LOCK:  # the small call may run in another thread (step's pool)
        kept = samples[0].extra.setdefault("text_rows", {})
        if key not in kept:
            if len(kept) >= 8:  # groups change as requests join and leave: drop the oldest
                kept.pop(next(iter(kept)))
            kept[key] = rows_of(samples, attr)
        return kept[key]


def _timesteps(samples: Sequence[Sample]) -> torch.Tensor:
    """[rows]: each row's timestep, made from the host's copy in one transfer."""
    first = samples[0].schedule.timesteps
    values = [s.schedule.timestep_values[s.step] for s in samples for _ in range(s.rows)]
    return torch.tensor(values, dtype=first.dtype, device=first.device)


def _inputs(samples: Sequence[Sample], dtype: torch.dtype) -> tuple:
    return (rows_of(samples, "latents").to(dtype), text_rows(samples, "prompt_embeds"), text_rows(samples, "pooled"),
            _timesteps(samples))


def _split(batch: torch.Tensor, samples: Sequence[Sample]) -> list[torch.Tensor]:
    return list(torch.split(batch, [s.rows for s in samples]))


def _small_call(small, members: Sequence[Sample], dtype: torch.dtype) -> torch.Tensor:
    """The small model on ``members``; a denoiser that keeps per-image state (a cache hook bound to a stage,
    :mod:`hybridstitch.cachehooks`) is also told which images the rows are."""
    if hasattr(small, "forward_samples"):
        return small.forward_samples(members, *_inputs(members, dtype))
    return small.forward(*_inputs(members, dtype))


def plan(sample: Sample, large) -> None:
    """The stage (and, for a masked stage, the mask) of the sample's coming step."""
    # the mask selector keeps the cache ages: a freshness option may run a masked step as a full large step
    stage = sample.masks.plan(sample.policy.stage_for_step(sample.step), sample.step)
    sample.stage, sample.index = stage, None
    rec = StepRecord(step=sample.step, timestep=sample.schedule.timestep_values[sample.step],
                     sigma=sample.schedule.sigma_values[sample.step],
                     stage=stage.index, stage_kind=stage.kind, d=None, mask_ratio=stage.mask_ratio)
    if stage.kind == "masked":
        if sample.config.uses_masked_large:  # fixed-bucket engines may serve the ratio with a larger bucket
            bucket = large.bucket_for(stage.mask_ratio, sample.num_tokens)
            rec.masked_tokens, rec.bucket_ratio = bucket.masked_tokens, bucket.ratio
        else:  # FullLarge runs the whole large model: no bucket involved
            from .masks import tokens_for_ratio

            rec.masked_tokens, rec.bucket_ratio = tokens_for_ratio(stage.mask_ratio, sample.num_tokens), stage.mask_ratio
        sample.index = sample.masks.select(rec.masked_tokens)  # [1, k]
        if sample.record_masks:
            rec.mask_index = sample.index.tolist()
    sample.extra["record"] = rec


def _owned(members: Sequence[Sample]) -> list[list[Sample]]:
    """The members grouped by the request they belong to, in order."""
    groups: dict[int, list[Sample]] = {}
    for m in members:
        groups.setdefault(id(m.owner) if m.owner is not None else id(m), []).append(m)
    return list(groups.values())


def _fail(members: Sequence[Sample], error: BaseException, what: str) -> None:
    for m in members:
        m.error = error if isinstance(error, HybridStitchError) else HybridStitchError(
            f"the {what} engine call failed at step {m.step} ({type(error).__name__}: {error})")


def _run(timer: CallTimes, name: str, den: Any, members: list[Sample], make: Callable) -> list[tuple[list, Any]]:
    """``make(members)`` as one engine call. If it raises and the members belong to several requests, each
    request's members are run alone, so a failure stays with its own request; failed members get ``error``."""
    try:
        return [(members, timer(name, [m.id for m in members], den, lambda: make(members)))]
    except Exception as error:  # noqa: BLE001 -- an engine's own exception types; attributed below
        groups = _owned(members)
        if len(groups) == 1:
            _fail(members, error, name)
            return []
    out = []
    for group in groups:
        try:
            out.append((group, timer(name, [m.id for m in group], den, lambda g=group: make(g))))
        except Exception as error:  # noqa: BLE001
            _fail(group, error, name)
    return out


def step(samples: Sequence[Sample], large, small, dtype: torch.dtype = torch.float32, device=None,
         pool: Executor | None = None) -> int:
    """Advance every sample one step (see the module docstring); returns the engine calls made.
    ``dtype``: the models' input dtype. ``pool``: an executor that runs the small call while this
    thread runs the large ones (they are independent: the merge waits for both); None: in turn.

    Samples of different latent sizes or text lengths cannot share a call: each such group runs
    its own calls. A sample whose call fails, or whose latents stop being finite, gets ``error``
    (a HybridStitchError naming the step and stage) and is not advanced; the others are."""
    shapes: dict[tuple, list[Sample]] = {}
    for s in samples:
        shapes.setdefault((*s.latents.shape[-2:], s.prompt_embeds.shape[1]), []).append(s)
    return sum(_step(group, large, small, dtype, torch.device(device or group[0].latents.device), pool)
               for group in shapes.values())


def _step(samples: Sequence[Sample], large, small, dtype: torch.dtype, device: torch.device,
          pool: Executor | None) -> int:
    t_step = time.perf_counter()
    timer = CallTimes(device)
    for s in samples:
        plan(s, large)
    velocity: dict[int, torch.Tensor] = {}  # sample id -> its rows' velocity (before guidance)
    full_v: dict[int, torch.Tensor] = {}

    # 1. the small call: every sample in a masked or the small stage (in another thread with a pool)
    smalls = [s for s in samples if s.stage.kind in ("masked", "small")]

    def run_small():
        return _run(timer, "small", small, smalls, lambda ms: _small_call(small, ms, dtype)) if smalls else []

    small_results = pool.submit(run_small) if pool is not None else None

    # 2. the full large call: large-stage samples, and FullLarge samples in a masked stage
    full = [s for s in samples if s.stage.kind == "large" or (s.stage.kind == "masked" and not s.config.uses_masked_large)]
    if full:
        def run_full(members):
            if any(m.config.needs_kv_cache and m.stage.kind == "large" for m in members):
                return large.forward_store(*_inputs(members, dtype))
            return large.forward(*_inputs(members, dtype)), None

        for members, (v, caches) in _run(timer, "large", large, full, run_full):
            full_v.update(zip((m.id for m in members), _split(v, members)))
            if caches is not None:
                for m, c in zip(members, kvcache.split(caches, [m.rows for m in members])):
                    if m.config.needs_kv_cache and m.stage.kind == "large":
                        m.caches = c

    # 3. one masked large call per masked-token count, each sample over its own caches
    masked = [s for s in samples if s.stage.kind == "masked" and s.config.uses_masked_large and s.error is None]
    recycle = getattr(large, "recycle", None)  # backends that reuse a replaced cache set's buffers
    masked_out = []  # (members, their tokens [rows, k, E], their index [rows, k]): merged once the small output is there
    for k in sorted({s.index.shape[1] for s in masked}):
        def run_masked(members, k=k):
            index = torch.cat([m.index.expand(m.rows, k) for m in members])  # [rows, k]: one mask for both CFG halves
            caches = kvcache.gather([m.caches for m in members])
            tokens, new = large.forward_masked(*_inputs(members, dtype), index, caches)
            if recycle is not None and kvcache.whole(members[0].caches, caches):
                # every row of that batch was these samples', and each now has new rows: nothing reads it again
                recycle(caches)
            return tokens, new, index

        group = [s for s in masked if s.index.shape[1] == k]
        for members, (tokens, new, index) in _run(timer, "large_masked", large, group, run_masked):
            for m, c in zip(members, kvcache.split(new, [m.rows for m in members])):
                m.caches = c
            masked_out.append((members, tokens, index))
    for members, v in (small_results.result() if small_results is not None else run_small()):
        velocity.update(zip((m.id for m in members), _split(v, members)))
    _merge(masked, masked_out, velocity, large.spec.patch_size)
    calls = timer.finish()

    # 4. per sample (in groups that share their step's numbers): guidance, Eq. 10 and Eq. 9, the policy, Euler
    p = large.spec.patch_size
    live = []
    for s in samples:
        rec = s.extra.pop("record")
        if s.error is not None:
            continue
        if s.stage.kind == "large":
            v = full_v[s.id]
        elif not s.config.uses_masked_large and s.stage.kind == "masked":  # FullLarge: merge the large tokens
            rows_index = s.index.expand(s.rows, s.index.shape[1])
            v = merge_masked(velocity[s.id], gather_tokens(patchify(full_v[s.id], p), rows_index), rows_index, p)
        else:
            v = velocity[s.id]
        live.append((s, rec, v))
    groups: dict[tuple, list] = {}
    for item in live:
        s, _, v = item
        i = s.step
        key = (s.schedule.sigma_values[i], s.schedule.sigma_values[i + 1], s.guided, s.guidance_scale if s.guided else 0,
               s.latents.dtype, v.dtype, s.x0_prev is None)
        groups.setdefault(key, []).append(item)
    for items in groups.values():
        _advance_group(items)
    for s, rec, _ in live:
        if s.error is not None:
            continue
        if s.caches is not None and s.policy.stage.kind == "small":
            s.caches = None  # no masked step is left: the cache is dead weight
        for name, members, seconds in calls:  # the calls this sample took part in
            if s.id in members:
                rec.seconds[name] = rec.seconds.get(name, 0.0) + seconds
        s.trace.steps.append(rec)
        s.step += 1
    overhead = max(0.0, time.perf_counter() - t_step - sum(t for _, _, t in calls))
    for s in samples:
        if s.error is not None or not s.trace.steps:
            continue
        s.trace.steps[-1].overhead_seconds = overhead
        if s.done:
            s.trace.switch_steps = list(s.policy.switch_steps)
    return len(calls)


def _merge(masked: Sequence[Sample], results: list, velocity: dict, patch: int) -> None:
    """Stage 2's merge: each masked call's tokens overwrite the small output at its members' masked
    positions -- in one scatter over the call's rows when the small call ran the same samples side by
    side (the usual case), else sample by sample. A sample missing either output gets ``error``."""
    merged = set()
    for members, tokens, index in results:
        ok = [m.id in velocity for m in members]
        if all(ok):
            rows = merge_masked(kvcache.join([velocity[m.id] for m in members]), tokens, index, patch)
            velocity.update(zip((m.id for m in members), _split(rows, members)))
            merged.update(m.id for m in members)
            continue
        for m, t, i, good in zip(members, _split(tokens, members), _split(index, members), ok):
            if good:
                velocity[m.id] = merge_masked(velocity[m.id], t, i, patch)
                merged.add(m.id)
    for s in masked:
        if s.id not in merged and s.error is None:
            s.error = HybridStitchError(f"the masked step {s.step} lost one of its engine calls")


def _advance_group(items: list) -> None:
    """Guidance, Eq. 10, Eq. 9 and the Euler update of samples at the same sigmas and guidance, as one
    batch; the same elementwise arithmetic as one sample alone (Python-scalar sigmas and guidance, as
    diffusers), and ``d_i`` by batch-invariant row sums, so no sample's numbers depend on the others."""
    samples = [s for s, _, _ in items]
    first = samples[0]
    i = first.step
    v = kvcache.join([v for _, _, v in items])  # [rows, C, h, w]
    if first.guided:
        pairs = v.view(len(samples), 2, *v.shape[1:])
        v_uncond, v_text = pairs[:, 0], pairs[:, 1]
        v = v_uncond + first.guidance_scale * (v_text - v_uncond)  # [S, C, h, w]
    latents = kvcache.join([s.latents for s in samples])  # [S, C, h, w]
    x0 = predict_x0(latents, v, first.schedule.sigma_values[i])  # float32
    if first.x0_prev is None:
        ds = [None] * len(samples)
    else:  # Eq. 9, each sample's own number whatever the batch (row_sums), one host read for all
        ds = relative_l1_rows(x0, kvcache.join([s.x0_prev for s in samples]))
    sigmas = first.schedule.sigmas
    new = euler_step(latents, v, sigmas[i], sigmas[i + 1])  # [S, C, h, w]
    finite = torch.isfinite(new).flatten(1).all(dim=1).tolist()
    for r, (s, rec, _) in enumerate(items):
        rec.d = ds[r]
        if ds[r] is not None and s.config.has_masked_stage:  # only masked stages read token scores
            s.masks.observe(x0[r:r + 1], s.x0_prev)
        s.policy.observe(s.step, ds[r])
        s.x0_prev = x0[r:r + 1]
        s.latents = new[r:r + 1]
        if not finite[r]:  # this image stops; the others of its step go on
            try:
                check_finite(s.latents, s.step, s.stage.kind, samples=[s.trace.sample])
            except HybridStitchError as error:
                s.error = error


__all__ = ["CallTimes", "plan", "rows_of", "step", "synchronize"]
