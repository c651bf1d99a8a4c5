"""Counting host reads of torch tensors on the CPU: what would make the host wait for a GPU.

No GPU runs in CI, so the device discipline of the token loops is checked by
counting, through a ``TorchFunctionMode``, every torch call that reads device
data to the host on CUDA: conversions (``int(t)``, ``t.tolist()``,
``np.asarray(t)``, ``f"{t:.3f}"``), data-dependent shapes (boolean compaction,
``nonzero``, one-argument ``torch.where``), downloads (``.cpu()``,
``.to("cpu")``, a blocking ``copy_``). Used by ``tests/core/test_host_syncs.py``,
``tests/core/test_batched.py`` and ``tests/backends/test_hf3_fixes.py``.

On the CPU every tensor is a host tensor, so two kinds of call cannot be told
apart by their arguments alone: ``t.to(x.device)`` (on CUDA a no-op, as
transformers' rotary embeddings call it every layer) and ``t.to(cpu_device)``
(on CUDA a download), and a blocking ``copy_`` between two device tensors (no
sync) and one into a host buffer (a sync). Those two are counted when the call
comes from outside torch and transformers -- the project's code, or a test --
and left to the CUDA sync-debug test inside a model's forward.
"""

from __future__ import annotations

import sys

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
    "__array__",  # np.asarray(t), np.array(t)
    "__format__",  # f"{t:.3f}"
    "__repr__",  # repr(t), str(t), logging a tensor
    "cpu",
    "numpy",
    "nonzero",
    "argwhere",
    "unique",
    "unique_consecutive",
    "masked_select",
    "bincount",
    "equal",
    "allclose",
    "is_nonzero",
    "_local_scalar_dense",
}

#: code whose device-to-device ``.to(x.device)`` / ``copy_`` calls look like downloads on the CPU
_MODEL_CODE = ("/transformers/", "/torch/", "\\transformers\\", "\\torch\\")


def _data_dependent_index(index) -> bool:
    """``t[mask]`` compacts (a read of the mask); ``t[tensor_0d]`` reads the index to the host."""
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and (i.dtype == torch.bool or i.dim() == 0) for i in items)


def _names_cpu(x) -> bool:
    if isinstance(x, torch.device):
        return x.type == "cpu"
    return isinstance(x, str) and x.split(":")[0] == "cpu"


def _from_model_code() -> bool:
    """Whether the counted call was made by torch or transformers themselves (see the module docstring)."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename == __file__ or frame.f_code.co_name == "__torch_function__"):
        frame = frame.f_back
    return frame is not None and any(m in frame.f_code.co_filename for m in _MODEL_CODE)


def is_read(func, args=(), kwargs=None) -> bool:
    """Whether this torch call reads device data to the host on CUDA."""
    kwargs = kwargs or {}
    name = getattr(func, "__name__", "")
    if name in READS:
        return True
    if name in ("__getitem__", "__setitem__"):  # ``t[mask] = v`` compacts the mask too
        return len(args) > 1 and _data_dependent_index(args[1])
    if name == "where":  # the one-argument form is ``nonzero``: a shape that depends on the data
        return len(args) + len(kwargs) == 1
    if name == "repeat_interleave":  # tensor repeats without output_size: the length is read
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    if name == "to":  # an explicit download; non_blocking into pinned memory is not a wait
        if kwargs.get("non_blocking"):
            return False
        targets = (*args[1:], kwargs.get("device"))
        if any(isinstance(a, str) and _names_cpu(a) for a in targets):
            return True  # ``"cpu"`` spelled out: a download wherever it is written
        return any(_names_cpu(a) for a in targets) and not _from_model_code()
    if name == "copy_":  # a blocking copy into a host buffer waits for the device
        if kwargs.get("non_blocking") or (len(args) > 2 and args[2] is True):
            return False
        return not _from_model_code()
    return False


class HostReads(TorchFunctionMode):
    """Counts the torch calls that would make the host wait for the GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.names: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_read(func, args, kwargs):
            name = getattr(func, "__name__", "")
            self.count += 1
            self.names[name] = self.names.get(name, 0) + 1
        return func(*args, **kwargs)
