from __future__ import annotations

import torch


def first_occurrence(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position, the index of the first position holding the same id, and whether it is that one.

    Batches gathered from several ranks repeat items; scoring each item once makes the loss
    equal to one process's over the same global batch and keeps duplicates from being negatives.
    """
    same = ids.unsqueeze(0) == ids.unsqueeze(1)
    first = same.int().argmax(dim=1)
    return first, first == torch.arange(len(ids), device=ids.device)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 unless wider: a bf16 model's logits (up to 20-100, at a temperature of 0.05 or a logit scale of 100)
    would keep 8 significant bits, steps of 0.125-0.5, in the loss and its gradient."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def similarities(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T, at least in fp32."""
    dtype = torch.promote_types(at_least_fp32(a).dtype, b.dtype)
    return a.to(dtype) @ b.to(dtype).T


def hashed_uniform(*keys: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) numbers that depend only on the integer keys (broadcast together)."""
    x = torch.zeros((), dtype=torch.int64)
    for i, key in enumerate(keys):
        x = x * 1000003 + key.to(torch.int64) + 7919 * (i + 1)
    x = x & 0xFFFFFFFF
    for _ in range(3):  # integer mixing rounds (xorshift-multiply), kept within 32 bits
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return (x ^ (x >> 16)).to(torch.float64) / 2**32
