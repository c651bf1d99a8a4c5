"""Array helpers shared by the core: one place for device and namespace plumbing.

The core runs on whatever array type a backend returns (numpy from llama.cpp,
torch tensors on the GPU); these helpers keep small host values (uniforms,
draft ids) on the same device and dtype as the logits they meet.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace, device

Array = Any

__all__ = ["Array", "array_namespace", "device", "like"]


def like(ref: Array, values: Any, dtype: Any = None) -> Array:
    """``values`` as an array on ``ref``'s device (and dtype, unless ``dtype`` is given).

    One small copy (a window's uniforms or draft ids) per call. Onto a CUDA
    device it goes through pinned memory without blocking: a plain upload
    would wait for every queued kernel first (a host synchronization).
    """
    xp = array_namespace(ref)
    dt = ref.dtype if dtype is None else dtype
    dev = device(ref)
    if getattr(dev, "type", None) == "cuda" and hasattr(ref, "pin_memory"):  # torch tensor methods
        return xp.asarray(values, dtype=dt, device="cpu").pin_memory().to(dev, non_blocking=True)
    return xp.asarray(values, dtype=dt, device=dev)
