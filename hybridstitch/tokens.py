"""Image <-> token layout of SD3 transformers, and merging large tokens into small outputs.

Token ``n`` of a latent ``[B, C, H, W]`` with patch ``p`` is the patch at row ``n // (W/p)``,
column ``n % (W/p)``; its vector is laid out ``(p, q, c)``, the layout of ``proj_out`` in
diffusers' ``SD3Transformer2DModel`` (its unpatchify is ``einsum("nhwpqc->nchpwq")``).
"""

from __future__ import annotations

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
    place (only the k tokens move: no patchify / unpatchify of the whole latent).

    small_out [B, C, H, W] (written and returned), large_tokens [B, k, p*p*C], index [B, k].
    """
    b, c, h, w = small_out.shape
    k = index.shape[1]
    wp = w // patch
    if not small_out.is_contiguous():
        small_out = small_out.contiguous()
    # [B, C, h, p, w, q] viewed as [B, h, w, C, p, q]: one token is one (h, w) cell
    cells = small_out.view(b, c, h // patch, patch, wp, patch).permute(0, 2, 4, 1, 3, 5)
    values = large_tokens.to(small_out.dtype).reshape(b, k, patch, patch, c).permute(0, 1, 4, 2, 3)  # [B, k, C, p, q]
    batch = torch.arange(b, device=index.device)[:, None].expand(b, k)
    cells[batch, index // wp, index % wp] = values
    return small_out
