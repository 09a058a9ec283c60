"""Image <-> token layout of SD3 transformers, and merging large tokens into small outputs.

Token ``n`` of a latent ``[B, C, H, W]`` with patch ``p`` is the patch at row ``n // (W/p)``,
column ``n % (W/p)``; its vector is laid out ``(p, q, c)``, the layout of ``proj_out`` in
diffusers' ``SD3Transformer2DModel`` (its unpatchify is ``einsum("nhwpqc->nchpwq")``).
"""

from __future__ import annotations

import functools

import torch


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p*p*C] with N = (H/p) * (W/p)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    # [B, h, w, p, q, C]
    x = x.permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    """[B, N, p*p*C] -> [B, C, H, W]; the inverse of :func:`patchify` (and of diffusers' unpatchify)."""
    b, n, e = tokens.shape
    c = e // (patch * patch)
    h, w = height // patch, width // patch
    x = tokens.reshape(b, h, w, patch, patch, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, c, h * patch, w * patch)


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens [B, N, E], index [B, k] -> [B, k, E]."""
    return torch.gather(tokens, 1, index[:, :, None].expand(-1, -1, tokens.shape[-1]))


def scatter_tokens(tokens: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Out-of-place: tokens [B, N, E] with tokens[b, index[b, j]] = values[b, j]; values [B, k, E]."""
    return tokens.scatter(1, index[:, :, None].expand(-1, -1, tokens.shape[-1]), values)


def merge_masked(small_out: torch.Tensor, large_tokens: torch.Tensor, index: torch.Tensor, patch: int) -> torch.Tensor:
    """Stage 2's merge: the large model's output overwrites the small one at the masked tokens, in
    place (only the k tokens move: no patchify / unpatchify of the whole latent). One scatter into
    the flat latent: each token's element (i, j, c) lands at its corner + c*H*W + i*W + j.

    small_out [B, C, H, W] (written and returned), large_tokens [B, k, p*p*C], index [B, k].
    """
    b, c, h, w = small_out.shape
    if not small_out.is_contiguous():
        small_out = small_out.contiguous()
    wp = w // patch
    rows = (torch.arange(b, device=index.device) * (c * h * w))[:, None]  # [B, 1]: each row's start
    corner = (index // wp) * (patch * w) + (index % wp) * patch + rows  # [B, k]: each token's first element
    flat = corner[:, :, None] + _token_offsets(c, h, w, patch, index.device)  # [B, k, p*p*C], token layout
    small_out.view(-1).index_put_((flat.view(-1),), large_tokens.reshape(-1).to(small_out.dtype))
    return small_out


@functools.lru_cache(maxsize=32)
def _token_offsets(c: int, h: int, w: int, patch: int, device: torch.device) -> torch.Tensor:
    """[p*p*C]: where a token's elements, in its (p, q, c) layout, sit from its corner in a [C, H, W] latent."""
    p = torch.arange(patch, device=device)
    return (p[:, None, None] * w + p[None, :, None] + torch.arange(c, device=device)[None, None, :] * (h * w)).reshape(-1)
