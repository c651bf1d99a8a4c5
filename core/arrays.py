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

    One small copy (a window's uniforms or draft ids) per call.
    """
    xp = array_namespace(ref)
    return xp.asarray(values, dtype=ref.dtype if dtype is None else dtype, device=device(ref))
