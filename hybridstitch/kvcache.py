"""Per-sample KV caches, batched for one engine call and split again, without copies when they can be avoided.

A cache is a plain dict of torch tensors, ``{"cache_k.{layer}.{attn}": [R, H, N, D], "cache_v...": ...}``
(the engines' I/O names, :func:`cache_names`), owned by the caller: every backend takes the caches of
a call as inputs and returns the updated ones as new tensors. ``R`` is the sample's rows: 2 with
classifier-free guidance (its unconditional and conditional rows, side by side), else 1.

Samples that share an engine call are batched row-wise. When their caches are consecutive views of
one buffer -- as they are after a call that served the same samples in the same order, which is
the steady state of a run -- the batch is a view of that buffer (no copy); otherwise the rows are
concatenated once. The outputs of a call are split back into per-sample views.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Caches = dict[str, torch.Tensor]


def cache_names(attention_slots: Sequence[tuple[int, str]], prefix: str = "") -> list[str]:
    """``[prefix + "cache_k.0.attn", prefix + "cache_v.0.attn", ...]``: K then V, slot by slot."""
    names = []
    for layer, attn in attention_slots:
        names += [f"{prefix}cache_k.{layer}.{attn}", f"{prefix}cache_v.{layer}.{attn}"]
    return names


def _as_one_view(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The rows of ``parts`` as one view of their common storage, when they are consecutive in it."""
    first = parts[0]
    storage = first.untyped_storage().data_ptr()
    stride, rows = first.stride(), 0
    offset = first.storage_offset()
    for part in parts:
        if (part.untyped_storage().data_ptr() != storage or part.stride() != stride or part.shape[1:] != first.shape[1:]
                or part.storage_offset() != offset + rows * stride[0]):
            return None
        rows += part.shape[0]
    return first.as_strided((rows, *first.shape[1:]), stride, offset)


def gather(caches: Sequence[Caches]) -> Caches:
    """One batch of the samples' caches, rows in the given order: a view when they are consecutive
    in one buffer, else one concatenation per tensor."""
    if len(caches) == 1:
        return dict(caches[0])
    out = {}
    for name in caches[0]:
        parts = [c[name] for c in caches]
        view = _as_one_view(parts)
        out[name] = view if view is not None else torch.cat(parts)
    return out


def split(batch: Caches, rows: Sequence[int]) -> list[Caches]:
    """The per-sample views of a batch of caches (``rows``: each sample's row count, in order)."""
    out, start = [], 0
    for r in rows:
        out.append({name: t[start:start + r] for name, t in batch.items()})
        start += r
    return out


def nbytes(caches: Caches) -> int:
    return sum(t.numel() * t.element_size() for t in caches.values())


__all__ = ["Caches", "cache_names", "gather", "nbytes", "split"]
