"""Per-sample KV caches, batched for one engine call and split again, without copies when they can be avoided.

A cache is a plain dict of torch tensors, ``{"cache_k.{layer}.{attn}": [R, H, N, D], "cache_v...": ...}``
(the engines' I/O names, :func:`cache_names`), owned by the caller: every backend takes the caches of
a call as inputs and returns the updated ones as new tensors. ``R`` is the sample's rows: 2 with
classifier-free guidance (its unconditional and conditional rows, side by side), else 1.

Samples that share an engine call are batched row-wise. When their caches are consecutive views of
one buffer -- as they are after a call that served the same samples in the same order, which is
the steady state of a run -- the batch is that buffer (no copy, no slicing); otherwise the rows are
concatenated once. The outputs of a call are handed back as each sample's rows of them (:class:`Rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Caches = dict[str, torch.Tensor]


def cache_names(attention_slots: Sequence[tuple[int, str]], prefix: str = "") -> list[str]:
    """``[prefix + "cache_k.0.attn", prefix + "cache_v.0.attn", ...]``: K then V, slot by slot."""
    names = []
    for layer, attn in attention_slots:
        names += [f"{prefix}cache_k.{layer}.{attn}", f"{prefix}cache_v.{layer}.{attn}"]
    return names


def _as_one_view(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The rows of ``parts`` as one view of the tensor they were sliced from, when they are consecutive
    rows of it (that tensor itself when they are all of it)."""
    first = parts[0]
    base = first._base  # slices (split, [a:b]) of one tensor share their base
    if base is None:
        return None
    stride, tail = first.stride(), first.shape[1:]
    offset, rows = first.storage_offset(), 0
    for part in parts:
        if part._base is not base or part.stride() != stride or part.shape[1:] != tail \
                or part.storage_offset() != offset + rows * stride[0]:
            return None
        rows += part.shape[0]
    if base.shape[0] == rows and base.shape[1:] == tail and base.stride() == stride and base.storage_offset() == offset:
        return base
    return first.as_strided((rows, *tail), stride, offset)


def join(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The rows of ``parts`` as one tensor: a view when they are consecutive in one buffer, else a copy."""
    if len(parts) == 1:
        return parts[0]
    view = _as_one_view(parts)
    return view if view is not None else torch.cat(parts)


@dataclass(frozen=True)
class Rows:
    """A sample's rows of a call's caches: ``batch[name][start:start + rows]`` for every name, sliced
    only when needed. While the same samples share the calls, the next call takes ``batch`` whole."""

    batch: Caches
    start: int
    rows: int

    def caches(self) -> Caches:
        return {name: t[self.start:self.start + self.rows] for name, t in self.batch.items()}


def gather(caches: Sequence[Rows | Caches]) -> Caches:
    """One batch of the samples' caches, rows in the given order: the previous call's batch itself
    when the samples are its rows in order; else a view per tensor when the rows are consecutive in
    one buffer, else one concatenation per tensor."""
    first = caches[0]
    if isinstance(first, Rows) and all(isinstance(c, Rows) and c.batch is first.batch for c in caches):
        starts = [c.start for c in caches]
        total = next(iter(first.batch.values())).shape[0]
        if starts[0] == 0 and all(b.start == a.start + a.rows for a, b in zip(caches, caches[1:])) \
                and caches[-1].start + caches[-1].rows == total:
            return first.batch
    parts = [c.caches() if isinstance(c, Rows) else c for c in caches]
    if len(parts) == 1:
        return dict(parts[0])
    return {name: join([c[name] for c in parts]) for name in parts[0]}


def whole(rows: "Rows | Caches | None", batch: Caches) -> bool:
    """Whether ``batch`` (what :func:`gather` returned) is the call batch ``rows`` came from, whole."""
    return isinstance(rows, Rows) and rows.batch is batch


def split(batch: Caches, rows: Sequence[int]) -> list[Rows]:
    """Each sample's rows of a batch of caches (``rows``: each sample's row count, in order)."""
    out, start = [], 0
    for r in rows:
        out.append(Rows(batch, start, r))
        start += r
    return out


def nbytes(caches: Caches) -> int:
    return sum(t.numel() * t.element_size() for t in caches.values())


__all__ = ["Caches", "Rows", "cache_names", "gather", "join", "whole", "nbytes", "split"]
