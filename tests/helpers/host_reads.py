"""Counting host reads of torch tensors on the CPU: what would make the host wait for a GPU.

No GPU runs in CI, so the device discipline of the token loops is checked by
counting, through a ``TorchFunctionMode``, every torch call that reads device
data to the host on CUDA (``int(t)``, ``t.tolist()``, boolean compaction, ...).
Used by ``tests/core/test_host_syncs.py`` and ``tests/core/test_batched.py``.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

#: torch functions that read device data to the host (a synchronization on CUDA)
READS = {
    "item",
    "tolist",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "__complex__",
    "cpu",
    "numpy",
    "nonzero",
    "argwhere",
    "unique",
    "unique_consecutive",
    "masked_select",
    "equal",
    "allclose",
    "is_nonzero",
    "_local_scalar_dense",
}


def _data_dependent_index(index) -> bool:
    """``t[mask]`` compacts (a read of the mask); ``t[tensor_0d]`` reads the index to the host."""
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and (i.dtype == torch.bool or i.dim() == 0) for i in items)


class HostReads(TorchFunctionMode):
    """Counts the torch calls that would make the host wait for the GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.names: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        hit = name in READS or (name == "__getitem__" and len(args) > 1 and _data_dependent_index(args[1]))
        if name == "to" and "cpu" in [*args[1:], *kwargs.values()]:
            hit = True  # an explicit download (``.to(x.device)`` is not one, though on the CPU it names the CPU)
        if hit:
            self.count += 1
            self.names[name] = self.names.get(name, 0) + 1
        return func(*args, **kwargs)
