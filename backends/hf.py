"""Hugging Face transformers backend (``--backend hf``).

One copy of the weights serves every view of every request. A session keeps
**one** batched KV cache whose rows are the session's views, so a
``forward_many`` over several views is a single model forward, on CPU or GPU.

The cache (:class:`_RowCache`) is a per-row-offset variant of a static cache:

- row ``r`` holds its ``length[r]`` tokens contiguously in slots
  ``0 .. length[r]-1``, so a token's slot **is** its position: no holes, no
  compaction, and ``truncate(view, n)`` is just ``length[view] = n`` (the
  stale slots past it are overwritten by the next tokens of that row);
- a forward writes each row's new keys/values at ``length[r] ..`` with one
  ``scatter_`` per layer. Rows receiving fewer new tokens than the longest
  are padded on the **left**, so every row's last ``n_logits`` positions are
  the last positions of the batch (``logits_to_keep`` then limits the LM head
  to them); the pad positions write into a trash slot past the capacity;
- the attention mask is built here as a 4-D tensor from the per-row query
  positions (causal, plus the sliding window for sliding layers), and passed
  as a ``{layer_type: mask}`` dict to models with mixed layer types (Gemma 2/3,
  Qwen 2/3, ...). Position ids are explicit per row;
- a call that touches only some rows runs on the contiguous span of rows it
  needs (a view of the buffers, no copy); untouched rows inside the span are
  fed pad tokens that write only to the trash slot.

Logits come back as float32 torch tensors on the model's device, only for the
positions asked for; the core's array-API algebra runs on them there.

Models given as a ``.gguf`` file load through transformers' ``gguf_file=``
loader (dequantized); the converted model is cached as safetensors under
``$PERSONAJUDGE_CACHE/hf-gguf`` (default ``~/.cache/personajudge``) so later
loads take seconds. With no model, the embedded Gemma 3 270M GGUF is used.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlparse

import numpy as np
from pydantic import Field, field_validator, model_validator

from personajudge.backends.embedded import cache_dir, default_model_path
from personajudge.core.chat_template import ChatTemplate
from personajudge.core.config import BackendConfig, Options, take_options
from personajudge.core.contract import Backend, ForwardCall, Session
from personajudge.core.errors import (
    BackendUnavailableError,
    ConfigError,
    DeviceError,
    ModelLoadError,
    NumericalError,
    PersonaJudgeWarning,
    SessionError,
)
from personajudge.core.files import path_kind
from personajudge.core.transforms import SamplingParams

INSTALL_HINT = 'pip install -e ".[hf]" in your persona-judge clone'
TORCH_HINT = "pip install torch --index-url https://download.pytorch.org/whl/cpu (or the CUDA build's index)"


class HFOptions(Options):
    """``backend.options`` of the hf backend (types checked before transformers sees them)."""

    device_map: str | dict[str, int | str] | None = None
    attn_implementation: str | None = None  # sdpa or eager: checked below with the reason
    trust_remote_code: bool = False
    gguf_file: str | None = Field(None, min_length=1)
    revision: str | None = Field(None, min_length=1)
    cpu_prepack: bool = True
    adapter: str | None = Field(None, min_length=1)
    cache_implementation: Literal["dynamic", "static"] = "dynamic"
    max_cache_len: int | None = Field(None, ge=16)
    compile: bool | Literal["default", "reduce-overhead", "max-autotune"] = False
    compile_backend: str = Field("inductor", min_length=1)

    @field_validator("compile_backend")
    @classmethod
    def _known_compile_backend(cls, name: str) -> str:
        """An unknown name would raise dynamo's ``InvalidBackend`` only after the weights load."""
        if name == "inductor":  # the default: no need to import dynamo to know it
            return name
        try:
            from torch._dynamo import list_backends
        except ImportError:
            return name  # no torch: loading the backend says what to install
        if name not in list_backends(exclude_tags=()):  # every registered name, debug ones (eager) included
            raise ValueError(
                f"not a torch.compile backend (torch._dynamo.list_backends(): {', '.join(list_backends())}; "
                "for debugging also eager, aot_eager)"
            )
        return name

    @model_validator(mode="after")
    def _static_cache_options(self) -> HFOptions:
        """The static-cache rules that need no model, checked before one is loaded."""
        static = self.cache_implementation == "static" or self.compile is not False
        if self.max_cache_len is not None and not static:
            raise ValueError('max_cache_len needs cache_implementation="static" (or compile)')
        if static and self.device_map is not None:
            raise ValueError("a static cache or compile runs on one device; drop device_map")
        return self


_OPTIONS = set(HFOptions.model_fields)
#: accelerate's placement strategies, and the device_map targets every machine has
_DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_DEVICE_MAP_ANYWHERE = (*_DEVICE_MAP_STRATEGIES, "cpu", "disk", "meta")
_DTYPES = ("float32", "float16", "bfloat16", "auto")
_MASKED_ATTN = ("sdpa", "eager")


def _import_torch():
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as err:
        # torch first, from the index of its build: PyPI's default Linux torch is the multi-GB CUDA one, and
        # the extra's ``torch>=2.2`` keeps a torch that is already installed
        first = f"{TORCH_HINT}, then " if err.name == "torch" else ""
        raise BackendUnavailableError(
            f"the hf backend needs torch and transformers ({err.name} is missing); run: {first}{INSTALL_HINT}"
        ) from None
    return torch


# --------------------------------------------------------------------------------------------- tokenizer


class HFTokenizer:
    """Adapts a transformers tokenizer to :class:`personajudge.core.contract.Tokenizer`."""

    def __init__(self, tok: Any, vocab_size: int, eos_token_ids: frozenset[int], origin: str = "the model"):
        self.hf = tok
        self.origin = origin  # named in chat-template errors
        self._compiled: tuple[str, ChatTemplate] | None = None
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.chat_template: str | None = getattr(tok, "chat_template", None) or None

    @functools.cached_property
    def special_texts(self) -> frozenset[str]:
        """The special tokens' texts (``<eos>``, ``<start_of_turn>``), which ``encode`` turns into those
        tokens unless ``special=False``: the API encodes a user's text that holds one as plain text."""
        added = getattr(self.hf, "added_tokens_decoder", None) or {}
        texts = {t.content for t in added.values() if getattr(t, "special", False)}
        texts.update(getattr(self.hf, "all_special_tokens", ()) or ())
        return frozenset(t for t in texts if isinstance(t, str) and t)

    def encode(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Token ids of ``text``; ``special=False`` encodes special-token text (``<eos>``) as plain text.

        ``add_bos`` runs the tokenizer's post-processor, which adds BOS; where it also appends
        tokens after the text (EOS, for a tokenizer saved with ``add_eos_token=True``) they are
        dropped, as the llama-cpp backend does: a prompt for generation never ends with an EOS."""
        kw = {} if special else {"split_special_tokens": True}
        ids = list(self.hf.encode(text, add_special_tokens=add_bos, **kw))
        tail = self._appended if add_bos else []
        if tail and ids[-len(tail) :] == tail:
            del ids[-len(tail) :]
        return ids

    @functools.cached_property
    def _appended(self) -> list[int]:
        """The ids the post-processor appends after a text (``[eos]`` for ``add_eos_token=True``; mostly none)."""
        bare = list(self.hf.encode("a", add_special_tokens=False))
        full = list(self.hf.encode("a", add_special_tokens=True))
        at = next((i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare), None)
        return [] if at is None or not bare else full[at + len(bare) :]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def token_name(self, token_id: int) -> str:
        """The token as the tokenizer spells it (special tokens too, which ``decode`` drops): the API
        names it when a prompt holds an id the model has no embedding for."""
        return str(self.hf.convert_ids_to_tokens(int(token_id)))

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Render with the model's template in the project's sandbox, under the same time and size
        limits as llama.cpp's (:mod:`personajudge.core.chat_template`), with the special tokens
        transformers would pass (``bos_token``, ``eos_token``, ...)."""
        if not self.chat_template:
            raise ConfigError("this model has no chat template; use --encoder plain (or auto)")
        if self._compiled is None or self._compiled[0] != self.chat_template:
            self._compiled = (self.chat_template, ChatTemplate(self.chat_template, self.origin))
        tokens: dict[str, Any] = {  # template variables (bos_token, ...), not render()'s limits
            k: v for k, v in getattr(self.hf, "special_tokens_map", {}).items() if isinstance(v, str)
        }
        return self._compiled[1].render(messages=messages, add_generation_prompt=add_generation_prompt, **tokens)


# --------------------------------------------------------------------------------------------- the cache


class _Step:
    """What one forward tells the cache layers: which rows, where each new token goes."""

    def __init__(self, static: bool = False, mark_static: bool = False) -> None:
        self.span = (0, 0)
        self.cap = 0  # slots per row; slot ``cap`` is the trash slot for pad tokens
        self.kv_len = 0
        self.slots: Any = None  # (n, Q) int64 on the input device
        self.static = static  # fixed capacity, full rows, full-length keys: fixed shapes for compile/graphs
        self.mark_static = mark_static  # tag the buffers as fixed addresses for torch.compile's CUDA graphs
        self._index: dict[tuple, Any] = {}

    def set(self, span: tuple[int, int], slots: Any, kv_len: int) -> None:
        self.span, self.slots, self.kv_len = span, slots, kv_len
        self._index.clear()

    def scatter_index(self, like: Any) -> Any:
        """``slots`` broadcast to ``like``'s (n, H, Q, D) shape and device, built once per shape.

        In static mode the index is a view built in place (no memo dict): the
        forward may be a compiled graph, where a Python-side cache would be a
        side effect to trace."""
        n, h, q, d = like.shape
        if self.static:
            return self.slots[:, None, :, None].expand(n, h, q, d)
        key = (tuple(like.shape), like.device)
        idx = self._index.get(key)
        if idx is None:
            idx = self.slots.to(like.device, non_blocking=True)[:, None, :, None].expand(n, h, q, d)
            self._index[key] = idx
        return idx


def _make_cache_classes():
    """Build the cache classes on first use (they subclass transformers types)."""
    import torch
    from transformers.cache_utils import Cache, CacheLayerMixin

    class RowLayer(CacheLayerMixin):
        is_sliding = False
        is_compileable = False
        is_croppable = False

        def __init__(self, step: _Step, rows: int):
            super().__init__()
            self.step = step
            self.rows = rows

        def lazy_initialization(self, key_states, value_states) -> None:
            self.device = key_states.device
            self.is_initialized = True

        def _ensure(self, k, v) -> None:
            want = self.step.cap + 1
            if self.keys is not None and self.keys.shape[2] >= want:
                return
            if not self.is_initialized:
                self.lazy_initialization(k, v)
            _, hk, _, dk = k.shape
            _, hv, _, dv = v.shape
            new_k = torch.zeros((self.rows, hk, want, dk), dtype=k.dtype, device=k.device)
            new_v = torch.zeros((self.rows, hv, want, dv), dtype=v.dtype, device=v.device)
            if self.keys is not None and self.values is not None:  # keep the valid slots, drop the trash slot
                old = self.keys.shape[2] - 1
                new_k[:, :, :old] = self.keys[:, :, :old]
                new_v[:, :, :old] = self.values[:, :, :old]
            self.keys, self.values = new_k, new_v
            if self.step.mark_static:  # allocated once, eagerly (the first forward of a session is never compiled)
                torch._dynamo.mark_static_address(self.keys)
                torch._dynamo.mark_static_address(self.values)

        def update(self, key_states, value_states, *args, **kwargs):
            self._ensure(key_states, value_states)
            a, b = self.step.span
            keys, values = self.keys[a:b], self.values[a:b]
            keys.scatter_(2, self.step.scatter_index(key_states), key_states)
            values.scatter_(2, self.step.scatter_index(value_states), value_states)
            n = self.step.kv_len
            if self.step.static:
                return keys, values  # every slot, the trash slot included (masked): one shape for every step
            return keys[:, :, :n], values[:, :, :n]

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.step.kv_len, 0

        def get_seq_length(self) -> int:
            return self.step.kv_len

        def get_max_length(self) -> int:
            return -1

    class RowCache(Cache):
        """Batched KV cache with one row per view and per-row lengths (see module docstring)."""

        def __init__(self, step: _Step, rows: int, n_layers: int):
            super().__init__(layers=[RowLayer(step, rows) for _ in range(n_layers)])
            self.step = step
            self.rows = rows

        def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
            while layer_idx >= len(self.layers):  # models with extra (e.g. MTP) layers
                self.layers.append(RowLayer(self.step, self.rows))
            return cast(RowLayer, self.layers[layer_idx]).update(key_states, value_states)  # only RowLayers here

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return self.step.kv_len

    return RowCache


_CACHE_CLASS = None


def _row_cache(step: _Step, rows: int, n_layers: int):
    global _CACHE_CLASS
    if _CACHE_CLASS is None:
        _CACHE_CLASS = _make_cache_classes()
    return _CACHE_CLASS(step, rows, n_layers)


# --------------------------------------------------------------------------------------------- session


#: query lengths a compiled step is traced for; longer feeds (prompts) run eager on the same buffers
_COMPILED_QUERIES = (1, 2, 4, 8, 16)


class HFSession(Session):
    """One batched KV cache, one row per view (``n_views`` rows).

    With the dynamic cache (the default) the buffers grow with the longest row
    and each forward runs on the span of rows it touches, its keys cut to the
    longest row: the least work per step, in shapes that change every step.
    With ``cache_implementation="static"`` the buffers are allocated once at
    the session's capacity and every forward runs on all rows over the full
    capacity, so a step has one shape per query length: what CUDA graphs and
    ``torch.compile`` need. The inputs then go through persistent pinned
    buffers (one per query length) and the mask is one additive tensor per
    attention kind, built on the device from the position ids.
    """

    def __init__(self, backend: HFBackend, n_views: int):
        super().__init__(n_views, backend.context_length, backend.tokenizer.vocab_size)
        self.backend = backend
        self._step = _Step(static=backend.static, mark_static=backend.compile_mode is not None)
        if backend.static:
            self._step.cap = backend.context_length
        self._cache = _row_cache(self._step, n_views, backend._n_layers)
        self._buffers: dict[int, tuple[Any, Any, Any, Any]] = {}  # q -> (pinned host, its numpy view, device, event)
        #: per row, one past the last slot a forward wrote (host-side, from the calls): what a truncation clears
        self._written = [0] * n_views
        spare = backend._take_spare(n_views) if backend.static else None
        if spare is not None:  # the last static session's buffers, at the same addresses (see ``_close``)
            kv, self._buffers = spare
            for layer, (k, v) in zip(self._cache.layers, kv):
                layer.keys, layer.values, layer.device, layer.is_initialized = k, v, k.device, True

    def _truncate(self, view: int, length: int) -> None:
        self._clear(view, length)

    def _clear(self, view: int, start: int) -> None:
        """Zero ``view``'s slots from ``start`` to the last one written (and, static, its trash slot).

        A masked slot still enters the arithmetic: its score gets the mask's
        large negative (NaN + that is NaN) and its value weight 0 (0 * NaN is
        NaN). So keys or values a forward left past a row's length -- a
        rejected draft's, a failed request's, NaN from an overflowing dtype --
        would poison every later query whose attention span covers them: the
        dynamic cache cuts keys at the longest row of a call, the static one
        attends over every slot, trash included, and hands its buffers to
        the next session. Cleared here, on every truncation (a finished or
        failed request's rows are truncated to 0; ``_undo`` truncates a
        failed forward's rows to where they were), a row holds only what its
        current request wrote. Plain slices with host-side bounds: device
        work only, no read.
        """
        end = self._written[view]
        self._written[view] = min(end, start)
        layers = [layer for layer in getattr(self._cache, "layers", []) if layer.keys is not None]
        if not layers or (end <= start and not self._step.static):
            return
        trash = layers[0].keys.shape[2] - 1
        with self.backend.torch.inference_mode():  # the buffers are inference tensors (made in the forward)
            for layer in layers:
                for buf in (layer.keys, layer.values):
                    if end > start:
                        buf[view, :, start:end].zero_()
                    if self._step.static:  # attended (masked) by every query of the row: cleared too
                        buf[view, :, trash].zero_()

    def _layout(self, rows: list[int], calls: list[ForwardCall], q: int, trash: int, out: Any) -> int:
        """Write ids, query positions and cache slots, left-padded per row, into ``out`` (3, n, q).

        Rows without a call get pad tokens that write only to the trash slot;
        pad queries sit at the row's last position, so their attention rows are
        never empty. Returns the longest row after the call (the keys needed).
        """
        lengths = self._lengths
        lo = rows[0]
        out[0] = self.backend.pad_token_id
        out[2] = trash
        for r, v in enumerate(rows):
            out[1, r] = max(lengths[v] - 1, 0)
        kv_len = 1
        for v, toks, _ in calls:
            r, start, k = v - lo, lengths[v], len(toks)
            out[0, r, q - k :] = toks
            out[1, r, q - k :] = range(start, start + k)
            out[2, r, q - k :] = range(start, start + k)
            kv_len = max(kv_len, start + k)
        return kv_len

    def _inputs(self, n_rows: int, q: int):
        """The persistent (host, device) input buffers for ``q`` query positions, the host side free to write."""
        torch = self.backend.torch
        dev = self.backend.input_device
        buf = self._buffers.get(q)
        if buf is None:
            cuda = dev.type == "cuda"
            if cuda:  # pinned, so the upload is queued, not waited for
                host = torch.empty((3, n_rows, q), dtype=torch.long, pin_memory=True)
                host_np = host.numpy()
            else:  # the numpy array first: ``.numpy()`` reads like a download to the host-read counter
                host_np = np.empty((3, n_rows, q), dtype=np.int64)
                host = torch.from_numpy(host_np)
            packed = torch.empty((3, n_rows, q), dtype=torch.long, device=dev)
            buf = (host, host_np, packed, torch.cuda.Event() if cuda else None)
            if self._step.mark_static:
                torch._dynamo.mark_static_address(packed)
            self._buffers[q] = buf
        elif buf[3] is not None and not buf[3].query():
            buf[3].synchronize()  # the last copy out of this pinned buffer must be done before it is overwritten
        return buf

    def _forward_many(self, calls: list[ForwardCall]):
        b = self.backend
        torch = b.torch
        lengths = self._lengths
        q = max(len(t) for _, t, _ in calls)
        step = self._step
        compiled = False
        if step.static:
            lo, hi = 0, self.n_views
            if b.compile_mode is not None and q <= _COMPILED_QUERIES[-1] and self._cache.layers[0].keys is not None:
                q = next(c for c in _COMPILED_QUERIES if c >= q)
                compiled = True
        else:
            lo = min(v for v, _, _ in calls)
            hi = max(v for v, _, _ in calls) + 1
            need = max(lengths[v] + len(t) for v, t, _ in calls)
            if need > step.cap:
                step.cap = min(b.context_length, max(need + 64, 2 * step.cap, 256))
        n_rows = hi - lo
        for v, t, _ in calls:  # before the forward: one that raises may have written some of it (see _clear)
            self._written[v] = max(self._written[v], lengths[v] + len(t))
        keep = q if compiled else max(1, max(n for _, _, n in calls))  # logits_to_keep=0 means "all positions"
        rows = list(range(lo, hi))
        if step.static:
            host, host_np, packed, done = self._inputs(n_rows, q)
            self._layout(rows, calls, q, step.cap, host_np)
            kv_len = step.cap + 1  # every slot: one key length for every step
            packed.copy_(host, non_blocking=True)
            if done is not None:
                done.record()
        else:
            arr = np.empty((3, n_rows, q), dtype=np.int64)
            kv_len = self._layout(rows, calls, q, step.cap, arr)
            layout = torch.from_numpy(arr)
            if b.input_device.type == "cuda":  # from pinned memory the copy is queued; from pageable it waits
                packed = layout.pin_memory().to(b.input_device, non_blocking=True)
            elif b.input_device.type == "cpu":
                packed = layout  # already where the model is: no copy
            else:
                packed = layout.to(b.input_device)
        input_ids, position_ids, slot_idx = packed[0], packed[1], packed[2]
        step.set((lo, hi), slot_idx, kv_len)
        try:
            with torch.inference_mode():
                logits = b.run_step(input_ids, position_ids, self._cache, keep, compiled=compiled)
        except torch.cuda.OutOfMemoryError:
            self.close()
            b._spare = None  # nothing kept for a next session: the memory was what ran out
            raise DeviceError(
                f"out of memory on {b.device_label} running {n_rows} row(s) x {kv_len} tokens; use fewer prompts "
                "per batch (--batch-size), a shorter context, or a smaller dtype (--dtype bfloat16)"
            ) from None
        return [logits[v - lo, keep - n :, :] for v, _, n in calls]

    def _close(self) -> None:
        layers = getattr(self._cache, "layers", [])
        if self._step.static and layers and layers[0].keys is not None:
            # Handed to the next static session of this size. CUDA graphs are recorded on the buffers'
            # addresses (marked static without guards): a session on new buffers re-records every graph,
            # and a server that reopens its session when idle would pass inductor's re-record limit and
            # then run without graphs. Every slot a row of this session wrote is zeroed first (see ``_clear``):
            # masked slots still enter the attention arithmetic, where a NaN left in them would poison
            # every later session's requests.
            for v in range(self.n_views):
                self._clear(v, 0)
            kv = [(layer.keys, layer.values) for layer in layers if layer.keys is not None]
            with self.backend._spare_lock:
                self.backend._spare = (self.n_views, kv, self._buffers)
        for layer in layers:
            layer.keys = layer.values = None
        self._buffers = {}
        self._step.cap = 0


# --------------------------------------------------------------------------------------------- backend


def _merge_adapter(model: Any, adapter: str) -> Any:
    """Apply a LoRA/PEFT adapter and merge it into the weights (PAD's personalized reward model)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise BackendUnavailableError("backend.options.adapter needs peft: pip install peft") from None
    try:
        return PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the adapter {adapter}: {str(err).splitlines()[0]}") from None


def _cache_root() -> Path:
    return cache_dir()


#: The first transformers release whose GGUF loader converts the embedded Gemma 3 tokenizer as
#: llama.cpp reads it. 5.17 to 5.22 lose merges ("the" became "t" + "he") and the BOS token, which
#: degrades what the model writes; found by running the suite against transformers 5.17.0, 5.20.2,
#: 5.22.2 and 5.23.0 (``test_embedded_gguf_agrees_with_llama_cpp``).
GGUF_TOKENIZER_MIN_TRANSFORMERS = (5, 23)


def gguf_tokenizer_warning(version: str) -> str | None:
    """The warning for loading a GGUF with this transformers ``version`` (None: none needed)."""
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return None  # not a release number we can compare (a source build): assume current
    if (major, minor) >= GGUF_TOKENIZER_MIN_TRANSFORMERS:
        return None
    need = ".".join(map(str, GGUF_TOKENIZER_MIN_TRANSFORMERS))
    return (
        f"transformers {version} converts GGUF tokenizers with missing merges and no BOS token "
        f"(the embedded Gemma 3's among them), which degrades the output; upgrade to transformers>={need} "
        "or load the model's own Hugging Face folder"
    )


def _embedded_gguf() -> Path:
    """The embedded Gemma 3 270M GGUF (assembled into the cache on first use)."""
    return Path(default_model_path())


def _install_cpu_lm_head(torch, model) -> None:
    """Compute the LM head as ``(W @ x.T).T`` for a few rows on CPU.

    ``F.linear(x, W)`` with 2..64 rows makes the CPU GEMM pack the whole
    (vocab x hidden) weight on every call: for Gemma's 262k x 640 head that is
    ~190 ms for 2 rows against ~80 ms for 1 row, which would make batching two
    views slower than running them one after the other. ``W @ x.T`` streams the
    weight once (~55 ms for 2 rows). One row (GEMV) and large batches keep
    ``F.linear``. The result is the same product up to float summation order.
    """
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return
    linear = torch.nn.functional.linear

    def forward(x, _head=head):
        w, bias = _head.weight, _head.bias
        rows = x.numel() // x.shape[-1] if x.dim() else 0
        if 1 < rows <= 64 and x.device.type == "cpu" and x.dtype == w.dtype:
            out = (w @ x.reshape(rows, x.shape[-1]).T).T.contiguous()
            if bias is not None:
                out += bias
            return out.reshape(*x.shape[:-1], w.shape[0])
        return linear(x, w, bias)

    head.forward = forward


def _install_cpu_prepack(torch, model) -> int:
    """Run the float32 ``nn.Linear`` layers (not the LM head) on oneDNN-prepacked weights.

    A decoding step feeds 1-2 rows per view. With plain weights the CPU GEMM
    re-packs each weight matrix on every call, so two rows cost about twice one
    row and batching the views buys nothing; with the weights prepacked once
    here, two rows cost about what one does (Gemma 3 270M, one thread: 153 ->
    86 ms per two-view step). The original weight tensors are released (the
    parameters keep their dtype, with no elements), so memory does not grow;
    ``backend.options.cpu_prepack=false`` turns this off. Returns how many
    layers were converted (0 when oneDNN is unavailable or a self-check fails).
    """
    head = model.get_output_embeddings()
    try:
        reorder = torch.ops.mkldnn._reorder_linear_weight
        pointwise = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return 0
    if not torch.backends.mkldnn.is_available():
        return 0
    layers = [
        m
        for m in model.modules()
        if type(m) is torch.nn.Linear
        and m is not head
        and m.weight.dtype == torch.float32
        and m.weight.device.type == "cpu"
        and m.weight.dim() == 2
    ]
    if not layers:
        return 0
    tied = {id(p) for p in (getattr(head, "weight", None), model.get_input_embeddings().weight) if p is not None}
    try:
        with torch.inference_mode():  # self-check on the first layer before touching anything
            probe = layers[0]
            x = torch.randn(2, 1, probe.in_features)
            packed = reorder(probe.weight, 2)
            if not torch.allclose(
                pointwise(x, packed, probe.bias, "none", [], ""),
                torch.nn.functional.linear(x, probe.weight, probe.bias),
                atol=1e-4,
                rtol=1e-4,
            ):
                return 0
    except RuntimeError:
        return 0
    n = 0
    with torch.inference_mode():
        for m in layers:
            if id(m.weight) in tied:
                continue
            packed = reorder(m.weight, 2)

            def forward(x, _packed=packed, _bias=m.bias):
                return pointwise(x if x.is_contiguous() else x.contiguous(), _packed, _bias, "none", [], "")

            m.forward = forward
            m.weight.data = torch.empty(0, dtype=m.weight.dtype)
            n += 1
    return n


def _bad_model_errors() -> tuple[type[BaseException], ...]:
    """What transformers' loaders raise for a damaged or malformed model, to report in one line.

    Besides the usual OSError/ValueError/KeyError/RuntimeError: the GGUF reader's
    ``struct.error`` (a truncated header) and ``OverflowError`` (a count too large),
    safetensors' ``SafetensorError`` (a truncated or random weights file),
    huggingface_hub's ``StrictDataclassError`` (a config.json value of the wrong
    type), and ``ZeroDivisionError`` / ``IndexError`` from a model built on a
    config with zero heads or an empty vocabulary. Anything else is a bug and
    keeps its traceback."""
    from safetensors import SafetensorError

    errors: list[type[BaseException]] = [OSError, ValueError, KeyError, RuntimeError, struct.error, EOFError]
    errors += [SafetensorError, ArithmeticError, IndexError]
    try:
        from huggingface_hub.errors import StrictDataclassError

        errors.append(StrictDataclassError)
    except ImportError:  # an older huggingface_hub: configs are not validated this way
        pass
    return tuple(errors)


def _damaged_safetensors(folder: Path) -> Path | None:
    """The first ``*.safetensors`` file in ``folder`` whose header safetensors cannot read, if any."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError):
            return f
    return None


@contextlib.contextmanager
def _no_weight_loading_bar():
    """Turn off transformers' "Loading weights" progress bar for one load, then restore it.

    The README promises one line of stats on stderr. transformers' switch also
    turns off huggingface_hub's bars; downloads keep theirs (minutes of progress
    are worth a few lines), and the hub's own setting is put back as found."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    bar_on = hf_logging.is_progress_bar_enabled()
    hub_off = are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    if not hub_off:
        enable_progress_bars()
    try:
        yield
    finally:
        if bar_on:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the hub warns when HF_HUB_DISABLE_PROGRESS_BARS pins it off
                hf_logging.enable_progress_bar()
        if hub_off:
            disable_progress_bars()


def _pad_id(vocab: int, *candidates: int | None) -> int:
    """The first candidate id the model has an embedding row for, else 0.

    The pad id only fills the positions of a batched forward that a row does not use (their keys go to
    the trash slot, their logits are never read), so any id inside the embedding serves. The tokenizer's
    own pad id comes first, but the common recipe ``tok.add_special_tokens({"pad_token": "[PAD]"})``
    without ``model.resize_token_embeddings`` gives one past the embedding, and looking it up would fail
    every padded step (an IndexError deep in torch)."""
    for c in candidates:
        if isinstance(c, int) and 0 <= c < vocab:
            return c
    return 0


def _warn_tokens_past_embedding(tok: Any, vocab: int, label: str) -> None:
    """One :class:`PersonaJudgeWarning` when the tokenizer has ids the model has no embedding row for.

    Such a model still runs prompts that avoid those tokens, so this is a warning, not an error; but a
    prompt (or a chat template) that uses one fails per request, and the user should hear the cause and
    the remedy once, at load, rather than only then."""
    if len(tok) <= vocab:
        return
    past = sorted((i, t) for t, i in tok.get_vocab().items() if i >= vocab)
    if not past:
        return
    shown = ", ".join(repr(t) for _, t in past[:3]) + (", ..." if len(past) > 3 else "")
    warnings.warn(
        f"the tokenizer of {label} has {len(past)} token id(s) past the model's {vocab} embedding rows ({shown}); "
        "a prompt using one cannot run: resize the model's embeddings (model.resize_token_embeddings(len(tokenizer)))",
        PersonaJudgeWarning,
        stacklevel=4,
    )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _has_tokenizer_files(folder: Path) -> bool:
    """Whether ``folder`` holds any file a transformers tokenizer loads from.

    Asked only after the tokenizer failed to load: without any such file transformers falls back to
    building a slow tokenizer from nothing and says to install sentencepiece or tiktoken, which is no
    remedy for a folder the tokenizer was never saved into."""
    return any(
        f.is_file() and (f.name in _TOKENIZER_FILES or f.suffix in (".model", ".tiktoken")) for f in folder.iterdir()
    )


@contextlib.contextmanager
def _without_log_lines(logger: str, *needles: str):
    """Drop the records of transformers' ``logger`` that contain one of ``needles``, for one call.

    A filter, not a higher level: transformers 5.x checks these loggers' levels to decide to log
    more. Used for two notices that would land in the user's stderr although they need no action:

    - the load's "LOAD REPORT" table (missing, unexpected, mismatched weights):
      :func:`_check_loading_info` turns what matters in it (weights left random) into a one-line
      :class:`ModelLoadError`; the rest (unused checkpoint tensors, e.g. a pooler) changes nothing
      the model computes, and the README promises one line of stats on stderr;
    - "generation flags are not valid" in a greedy ``generate``: ``native_generate`` leaves the
      sampling fields out then, but ``generate`` merges in the model's own generation_config, whose
      sampling fields (a hub model's ``top_k=20``, say) raise the notice about settings greedy
      decoding never reads, in the middle of the benchmark's output.
    """
    from transformers.utils import logging as hf_logging

    drop = _Without(needles)
    log = hf_logging.get_logger(logger)
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


class _Without(logging.Filter):
    """A logging filter that drops the records whose message contains one of ``needles``."""

    def __init__(self, needles: tuple[str, ...]):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(s in str(record.msg) for s in self.needles)


def _no_load_report():
    # the report, and its note on tied weights that are missing (listed in it too)
    return _without_log_lines("transformers.modeling_utils", "LOAD REPORT", "checkpoint seem corrupted")


def _no_flag_notice():
    return _without_log_lines("transformers.generation.configuration_utils", "generation flags are not valid")


def _check_loading_info(model: Any, info: dict[str, Any], label: str) -> None:
    """Refuse a model whose checkpoint left weights randomly initialised.

    transformers fills a tensor the checkpoint lacks (or has in another shape) with random values and
    only logs it: the model then runs, exits 0, and gives different text on every load for the same
    seed. That is a damaged or wrong checkpoint (a file cut short, tensors deleted, a BERT-like
    encoder loaded as a causal LM with a fresh head), so it is a :class:`ModelLoadError`. The
    ``missing_keys`` transformers reports already leave out tied weights (an LM head tied to the
    embedding) and each model's ``_keys_to_ignore_on_load_missing`` (e.g. rotary buffers), which are
    not random after loading."""
    cls = type(model).__name__
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ModelLoadError(
            f"model {label!r} lacks {len(missing)} weight tensor(s) that {cls} needs ({shown}); transformers "
            "would fill them with random values: is the checkpoint complete, and is it a causal LM?"
        )
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        key, have, want = mismatched[0]
        raise ModelLoadError(
            f"model {label!r} has {len(mismatched)} weight tensor(s) of another shape than {cls} needs "
            f"({key}: {tuple(have)} in the checkpoint, {tuple(want)} in the model); does config.json match the weights?"
        )


def _looks_like_path(model: str) -> bool:
    return (
        model.startswith(("/", "./", "../", "~", "\\"))
        or model.lower().endswith(".gguf")
        or model.count("/") > 1
        or (len(model) > 1 and model[1] == ":")
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def cudagraph_thread_ready(torch: Any) -> None:
    """Give the calling thread CUDA-graph trees' per-thread state, as torch 2.13 does by itself.

    Inductor keeps its CUDA-graph trees in thread-local state that torch before 2.13 sets up only
    in the thread that imported ``torch._inductor.cudagraph_trees`` (and the autograd threads it
    starts): a CUDA-graph step first run from any other thread fails on a bare ``AssertionError``
    (pytorch#123177). The engine runs every step on its own thread, so on an H200 with torch 2.11
    the compiled step fell back to eager for good. This sets the state up as torch 2.13's
    ``_initialize_tls`` does: each thread then records and replays its own trees. Called before
    each CUDA-graph call; once set up it costs two attribute checks. Nothing to do before the
    module is imported: the compile that imports it sets up its own thread.
    """
    trees = sys.modules.get("torch._inductor.cudagraph_trees")
    if trees is None:
        return
    local = trees.local
    if hasattr(local, "tree_manager_containers") or torch._C._is_key_in_tls("tree_manager_containers"):
        return
    local.tree_manager_containers = {}
    local.tree_manager_locks = collections.defaultdict(threading.Lock)
    torch._C._stash_obj_in_tls("tree_manager_containers", local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", local.tree_manager_locks)


class CompiledKernel:
    """``torch.compile(fn)`` that turns into ``fn`` for good when compiling or running it fails.

    ``fn`` is traced as one graph (``fullgraph``): a graph break would bring
    the launches back. Shapes become dynamic at the first new row count, so
    a batch that grows and shrinks costs one recompile, not one per size.
    ``on_fail(err)`` is told why (and returns the reason to keep); without
    it a failure raises.
    """

    def __init__(self, torch, fn, compile_backend: str = "inductor", on_fail=None):
        self.torch, self.fn, self.on_fail = torch, fn, on_fail
        self.fallback: str | None = None  #: why it runs eager, if it does
        self.calls = 0  #: calls that ran compiled
        # dynamo's ``cudagraphs`` backend replays ``fn`` as CUDA graphs, whose outputs live in the graph
        # pool and are overwritten by the next replay (the compiled step's, after its
        # ``cudagraph_mark_step_begin``): copied out, as ``run_step`` copies the step's logits, a judge
        # output held across a step stays valid (a few rows of ints: a few microseconds)
        self.clone_outputs = compile_backend == "cudagraphs"
        try:
            self.compiled: Any = torch.compile(fn, backend=compile_backend, fullgraph=True)
        except Exception as err:  # torch.compile itself refused: the same fallback as a failed first call
            if on_fail is None:
                raise
            self.compiled = None
            self.fallback = on_fail(err)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                if self.clone_outputs:
                    cudagraph_thread_ready(self.torch)
                if self.calls:
                    out = self.compiled(*args)
                else:
                    with warnings.catch_warnings():
                        # the first trace: dynamo notes (once) that it traces through array-api-compat's
                        # cached namespace tests, which hold no state
                        warnings.filterwarnings("ignore", message=".*functools.lru_cache", category=UserWarning)
                        out = self.compiled(*args)
                self.calls += 1
                if self.clone_outputs:
                    out = self.torch.utils._pytree.tree_map(
                        lambda x: x.clone() if isinstance(x, self.torch.Tensor) else x, out
                    )
                return out
            except self.torch.cuda.OutOfMemoryError:
                raise
            except Exception as err:
                if self.on_fail is None:
                    raise
                self.compiled = None
                self.fallback = self.on_fail(err)
        return self.fn(*args)


#: hf backends loaded with an explicit ``threads``: torch's thread count is one per process (see _set_threads)
_THREADED: weakref.WeakSet[Any] = weakref.WeakSet()
_THREADED_LOCK = threading.Lock()


def _set_threads(torch: Any, threads: int, backend: Any) -> None:
    """``torch.set_num_threads(threads)``, with a warning when it changes what a loaded backend asked for.

    torch has one intra-op thread pool per process, so ``threads`` cannot be per backend: the last
    backend loaded sets it for every backend in the process (and for anything else using torch).
    Rather than pretend otherwise, each backend's ``describe()["threads"]`` reports the count in
    force when asked (a run's ``settings`` then say what it ran on), and loading one with a count
    another live backend set differently warns, naming both.
    """
    with _THREADED_LOCK:
        others = sorted({b.config.threads for b in _THREADED if b is not backend and b.config.threads != threads})
        _THREADED.add(backend)
    if others:
        warnings.warn(
            f"hf backend: threads={threads} changes torch's process-wide thread count, which the hf backend(s) "
            f"loaded with threads={', '.join(map(str, others))} use too: every backend in this process now runs "
            f"on {threads} thread(s) (torch has one thread pool per process)",
            PersonaJudgeWarning,
            stacklevel=3,
        )
    torch.set_num_threads(threads)


class _FiniteLogits:
    """A ``model.generate`` logits processor: notes, on the device, a step whose raw logits are not finite.

    Without it, NaN logits make greedy ``generate`` return the argmax of NaN (token 0, timed as a
    baseline) and sampling raise torch's "probability tensor contains inf, nan" RuntimeError on the
    CPU (a device-side assert on CUDA, which ends the CUDA context). A row's max is NaN when any
    logit is NaN (``amax`` propagates it), +inf when one is, -inf when all are, so one reduction per
    token finds them without a host read; such a row is replaced by zeros so that generation runs to
    its end, and :meth:`HFBackend.native_generate` raises ``NumericalError`` after it. It runs before
    the sampling warpers (transformers puts a caller's processors after its own, none of which the
    baseline's settings enable, and before temperature/top-k/top-p), so it sees the model's logits.
    """

    def __init__(self, torch: Any):
        self.torch = torch
        self.bad: Any = None  # a 0-d bool on the device: some step was not finite

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        torch = self.torch
        rows = ~torch.isfinite(scores.amax(dim=-1, keepdim=True))
        self.bad = rows.any() if self.bad is None else self.bad | rows.any()
        return torch.where(rows, torch.zeros((), dtype=scores.dtype, device=scores.device), scores)


class HFBackend(Backend):
    """A causal LM loaded with transformers; see the module docstring.

    ``backend.options``: ``device_map`` (e.g. ``"auto"`` to shard over GPUs with
    accelerate), ``attn_implementation`` (``sdpa`` or ``eager``),
    ``trust_remote_code`` (default False), ``gguf_file`` (a GGUF file inside
    the model folder or hub repo), ``revision`` (hub branch, tag or commit).
    """

    name = "hf"
    config_fields = frozenset({"model", "device", "dtype", "threads", "n_ctx"})
    Options = HFOptions  # backend.options, checked without loading (the Ray driver does, before Ray starts)
    description = "Hugging Face transformers causal LMs (hub id, folder or GGUF) on CPU or CUDA; one batched KV cache row per view."

    def __init__(self, config: BackendConfig | None = None):
        config = config or BackendConfig(name="hf")
        opts = take_options(config, HFOptions, owner="hf")  # before torch is imported
        self.torch = torch = _import_torch()
        self.config = config
        self.device_map = opts.get("device_map")
        self.attn_implementation = opts.get("attn_implementation")
        if self.attn_implementation is not None and self.attn_implementation not in _MASKED_ATTN:
            raise ConfigError(
                f"backend.options.attn_implementation: the hf backend supports {' or '.join(_MASKED_ATTN)} "
                f"(it passes per-row 4-D attention masks), got {self.attn_implementation!r}"
            )
        self.trust_remote_code = bool(opts.get("trust_remote_code", False))
        self.revision = opts.get("revision")
        if config.threads:
            _set_threads(torch, config.threads, self)
        self.device = self._resolve_device(config.device)
        if self.device_map is not None:
            self._check_device_map(self.device_map)
        self.dtype_name = (config.dtype or ("auto" if self.device.type == "cuda" else "float32")).lower()
        if self.dtype_name not in _DTYPES:
            raise ConfigError(f"backend.dtype must be one of {', '.join(_DTYPES)}, got {config.dtype!r}")
        t0 = time.perf_counter()
        self.model_label, self.model, tok = self._load(config.model, opts.get("gguf_file"))
        if opts.get("adapter"):
            self.model = _merge_adapter(self.model, str(opts["adapter"]))
            self.model_label += f"+{opts['adapter']}"
        #: seconds the load took: a stat, not a setting (kept out of ``describe()``, whose facts the
        #: API copies into every run's ``settings``: two identical runs must report identical settings)
        self.load_time_s = time.perf_counter() - t0
        self.model.eval()
        mcfg = self.model.config
        tcfg = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
        self._n_layers = int(getattr(tcfg, "num_hidden_layers", 0) or 0)
        out_emb = self.model.get_output_embeddings()
        vocab = getattr(out_emb, "out_features", None) or getattr(tcfg, "vocab_size", None) or len(tok)
        eos: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), tcfg):
            e = getattr(src, "eos_token_id", None) if src is not None else None
            eos.update([e] if isinstance(e, int) else (e or []))
        if tok.eos_token_id is not None:
            eos.add(int(tok.eos_token_id))
        vocab = int(vocab)
        self.tokenizer = HFTokenizer(tok, vocab, frozenset(int(x) for x in eos), origin=str(self.model_label))
        _warn_tokens_past_embedding(tok, vocab, self.model_label)
        self.pad_token_id = _pad_id(
            vocab, tok.pad_token_id, getattr(tcfg, "pad_token_id", None), min(eos, default=None)
        )
        max_pos = getattr(tcfg, "max_position_embeddings", None) or getattr(tcfg, "n_positions", None)
        #: the model's own limit on positions (None when its config does not say): the API's too-long-prompt
        #: message advises a larger --n-ctx only below it
        self.max_context_length = int(max_pos) if max_pos else None
        if config.n_ctx:
            if max_pos and config.n_ctx > max_pos:
                raise ConfigError(f"backend.n_ctx={config.n_ctx} exceeds the model's maximum of {max_pos} positions")
            self.context_length = config.n_ctx
        else:
            self.context_length = int(max_pos or 4096)
        self.input_device = self.model.get_input_embeddings().weight.device
        self.device_label = str(self.input_device) if self.device_map is None else f"device_map={self.device_map}"
        self._setup_attention(tcfg)
        self._facts: dict[str, Any] = {}  # _setup_static may record a compile fallback here
        #: the last closed static session's (rows, [(keys, values) per layer], input buffers): see HFSession._close
        self._spare: tuple[int, list[tuple[Any, Any]], dict[int, Any]] | None = None
        self._spare_lock = threading.Lock()  # the engine's thread and a caller's may open sessions at once
        self._setup_static(opts)
        self.cpu_prepacked = 0
        # the CPU kernels swapped in below are opaque to torch.compile's code generator: compile keeps the model as is
        if self.device_map is None and self.input_device.type == "cpu" and self.compile_mode is None:
            _install_cpu_lm_head(torch, self.model)
            if opts.get("cpu_prepack", True):
                self.cpu_prepacked = _install_cpu_prepack(torch, self.model)
        self._facts = {
            "backend": self.name,
            "model": self.model_label,
            "device": self.device_label,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
            "context_length": self.context_length,
            "threads": torch.get_num_threads(),
            "cpu_prepacked_linears": self.cpu_prepacked,
            "cache_implementation": "static" if self.static else "dynamic",
            "compile": self._facts.get("compile", self.compile_mode or False),  # or why it runs eager
        }
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params

    # ----------------------------------------------------------------- loading

    def _resolve_device(self, device: str | None, advice: str = "use --device cpu"):
        torch = self.torch
        if device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise ConfigError(f"backend.device: expected cpu, cuda, cuda:N, mps or xpu, got {device!r}") from None
        if dev.type == "cpu":
            return dev
        # Every other type torch parses (cuda, mps, xpu, ...) is checked here, before any weights load:
        # torch would otherwise fail only when the model moves (an AssertionError for xpu).
        name = dev.type.upper()
        module = getattr(torch, dev.type, None)
        is_available = getattr(module, "is_available", None)
        if not callable(is_available) or not is_available():
            why = (
                "no GPU, or torch was built without CUDA"
                if dev.type == "cuda"
                else f"no {name} device, or torch was built without it"
            )
            raise DeviceError(f"device {device!r} requested but {name} is not available ({why}); {advice}")
        count = getattr(module, "device_count", None)
        if dev.index is not None and callable(count) and dev.index >= count():
            raise DeviceError(f"device {device!r} does not exist; this machine has {count()} {name} device(s)")
        return dev

    def _check_device_map(self, device_map: str | dict[str, int | str]) -> None:
        """Every device a ``device_map`` names must exist here, checked as ``--device`` is.

        Unchecked, ``device_map="cuda"`` (or ``{"": 0}``) on a machine without CUDA reached
        accelerate's allocator warm-up and failed there with torch's bare ``AssertionError``
        (not compiled with CUDA), after the model was read. The placement strategies (``auto``,
        ``balanced``, ...) pick among the devices that exist, and ``cpu``/``disk``/``meta`` always do;
        an integer is a GPU index, as accelerate reads it."""
        values = [device_map] if isinstance(device_map, str) else list(device_map.values())
        for v in values:
            if isinstance(v, str) and v in _DEVICE_MAP_ANYWHERE:
                continue
            name = f"cuda:{v}" if isinstance(v, int) and not isinstance(v, bool) else str(v)
            try:
                self._resolve_device(name, advice="use device_map=auto (or drop device_map) on this machine")
            except ConfigError:
                raise ConfigError(
                    f"backend.options.device_map: {v!r} is not a device (cpu, cuda, cuda:N, a GPU index) "
                    f"nor a placement strategy ({', '.join(_DEVICE_MAP_STRATEGIES)})"
                ) from None

    def _torch_dtype(self):
        return "auto" if self.dtype_name == "auto" else getattr(self.torch, self.dtype_name)

    def _load(self, model: str | None, gguf_file: str | None):
        """Returns (label, model, tokenizer)."""
        if model is None and gguf_file is None:
            path = _embedded_gguf()
            self._warn_local_revision("the embedded model")
            return f"embedded:{path.name}", *self._load_gguf(str(path.parent), path.name, local=path)
        if model is None:
            raise ConfigError("backend.options.gguf_file needs backend.model (the folder or hub repo holding it)")
        p = Path(model).expanduser()
        kind = path_kind(p, "model path", ModelLoadError)
        if kind in ("file", "dir"):
            self._warn_local_revision(f"the local model {p}")
        if kind == "file":
            if not p.name.lower().endswith(".gguf"):
                raise ModelLoadError(
                    f"model file {p} is not a .gguf file; pass a model folder, a hub id or a .gguf file"
                )
            return str(p), *self._load_gguf(str(p.parent), p.name, local=p)
        if kind == "dir":
            if gguf_file:
                g = p / gguf_file
                if path_kind(g, "model path", ModelLoadError) != "file":
                    raise ModelLoadError(f"GGUF file {gguf_file!r} not found in {p}")
                return str(g), *self._load_gguf(str(p), gguf_file, local=g)
            if path_kind(p / "config.json", "model path", ModelLoadError, named=p) != "file":
                raise ModelLoadError(f"model folder {p} has no config.json; is it a transformers model folder?")
            # transformers opens the folder's files by name (tokenizer.json, ...): one that is a FIFO
            # would block the load for good
            odd = sorted(e.name for e in p.iterdir() if path_kind(e, "model path", ModelLoadError, named=p) == "other")
            if odd:
                raise ModelLoadError(
                    f"model folder {p} holds {', '.join(odd[:3])}, not a regular file (a FIFO, device or socket); "
                    "transformers would block reading it"
                )
            return str(p), *self._from_pretrained(str(p), local=True)
        if kind == "other":  # reading a FIFO would block for good; a device or socket is no model either
            raise ModelLoadError(
                f"model path {p} is not a regular file or folder (a FIFO, device or socket); "
                "pass a model folder, a hub id or a .gguf file"
            )
        if _looks_like_path(model):
            raise ModelLoadError(f"model path not found: {model}")
        # A hub id: use the local HF cache first; only go online when the hub is reachable.
        if gguf_file:
            return f"{model}:{gguf_file}", *self._load_gguf(model, gguf_file, local=None)
        return model, *self._from_pretrained(model, local=False)

    def _warn_local_revision(self, what: str) -> None:
        """``revision`` picks a hub branch, tag or commit; a local file or folder has none, and transformers
        ignores it there in silence while the run's settings would report it as applied."""
        if self.revision:
            warnings.warn(
                f"backend.options.revision={self.revision!r} picks a hub revision; {what} has none: ignored",
                PersonaJudgeWarning,
                stacklevel=4,
            )

    def _common_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.revision:
            kw["revision"] = self.revision
        return kw

    def _fetch(self, fn, source: str, **kw):
        """Call a ``from_pretrained``: local cache first, then the hub if reachable; one-line errors."""
        if kw.pop("_local", False):
            return fn(source, **kw)
        try:
            return fn(source, local_files_only=True, **kw)
        except OSError:
            pass
        if not _hub_reachable():
            raise ModelLoadError(
                f"model {source!r} is not a local path and not in the Hugging Face cache, and the hub cannot be "
                "reached (offline?); pass a local model folder or .gguf file, or download it first"
            )
        return fn(source, **kw)

    def _from_pretrained(
        self, source: str, *, local: bool, gguf_file: str | None = None, dtype: Any = None, device: Any = "default"
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch = self.torch
        kw = self._common_kwargs()
        if gguf_file:
            kw["gguf_file"] = gguf_file
        mkw: dict[str, Any] = dict(kw, dtype=self._torch_dtype() if dtype is None else dtype)
        if self.attn_implementation:
            mkw["attn_implementation"] = self.attn_implementation
        if self.device_map is not None:
            mkw["device_map"] = self.device_map
        # a GGUF is named by its file, not by the folder transformers is given
        label = source if not gguf_file else str(Path(source) / gguf_file) if local else f"{source}:{gguf_file}"
        # mismatched shapes come back in the loading info (checked below) instead of as transformers'
        # RuntimeError pointing at a report this load keeps off stderr
        mkw.update(output_loading_info=True, ignore_mismatched_sizes=True)
        try:
            with warnings.catch_warnings(), _no_weight_loading_bar(), _no_load_report():
                warnings.simplefilter("ignore")
                try:
                    tok = self._fetch(AutoTokenizer.from_pretrained, source, _local=local, **kw)
                except _bad_model_errors() + (ImportError,):
                    if local and not gguf_file and not _has_tokenizer_files(Path(source)):
                        raise ModelLoadError(
                            f"model folder {source} has no tokenizer (no tokenizer.json, tokenizer_config.json or "
                            "tokenizer.model); copy the tokenizer files of the model into it"
                        ) from None
                    raise
                model, info = self._fetch(AutoModelForCausalLM.from_pretrained, source, _local=local, **mkw)
            _check_loading_info(model, info, label)
            if self.device_map is None and device is not None:
                model.to(self.device if device == "default" else device)
        except (ModelLoadError, ConfigError, DeviceError):
            raise
        except torch.cuda.OutOfMemoryError:
            raise DeviceError(
                f"out of memory loading {label} on {self.device}; try --dtype bfloat16, "
                "--backend-option device_map=auto, or a smaller model"
            ) from None
        except ImportError as err:
            raise BackendUnavailableError(
                f"loading {label} needs a missing package: {err}; run: {INSTALL_HINT}"
            ) from None
        except _bad_model_errors() as err:
            if local and not gguf_file and type(err).__name__ == "SafetensorError":
                label = str(_damaged_safetensors(Path(source)) or label)  # the file, where one fails to open
            msg = " ".join(str(err).split())
            if len(msg) > 300:
                msg = msg[:300] + "..."
            kind = type(err).__name__
            if kind == "error":  # struct.error, socket.error, ...: say whose
                kind = f"{type(err).__module__}.error"
            raise ModelLoadError(f"cannot load model {label!r}: {kind}: {msg}") from None
        return model, tok

    def _gguf_cache_dir(self, source: str, gguf_file: str, local: Path | None) -> Path:
        import transformers

        if local is not None:
            st = local.resolve().stat()
            ident = f"{local.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        else:
            ident = f"hub:{source}|{gguf_file}|{self.revision or ''}"
        key = hashlib.sha256(f"{ident}|transformers {transformers.__version__}".encode()).hexdigest()[:16]
        stem = Path(gguf_file).name
        stem = stem[:-5] if stem.lower().endswith(".gguf") else stem
        return _cache_root() / "hf-gguf" / f"{stem}-{key}"

    def _load_gguf(self, source: str, gguf_file: str, *, local: Path | None):
        """Dequantize a GGUF through transformers, caching the converted model as safetensors."""
        import transformers

        why = gguf_tokenizer_warning(transformers.__version__)
        if why is not None:
            warnings.warn(why, PersonaJudgeWarning, stacklevel=3)
        cached = self._gguf_cache_dir(source, gguf_file, local)
        if (cached / "config.json").is_file():
            try:
                return self._from_pretrained(str(cached), local=True)
            except ModelLoadError:
                shutil.rmtree(cached, ignore_errors=True)  # a damaged conversion: redo it
        # Convert at float32 (what the GGUF loader dequantizes to), save, then cast.
        model, tok = self._from_pretrained(
            source, local=local is not None, gguf_file=gguf_file, dtype=self.torch.float32, device=None
        )
        model.hf_quantizer = None  # the weights are plain tensors now; let save_pretrained write them
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        self._save_conversion(model, tok, cached, source, gguf_file)
        dtype = self._torch_dtype()
        if dtype == "auto":
            dtype = self.torch.float32
        try:
            if self.device_map is None:
                model.to(device=self.device, dtype=dtype)
            elif dtype != self.torch.float32:
                model.to(dtype=dtype)
        except self.torch.cuda.OutOfMemoryError:
            raise DeviceError(f"out of memory moving {gguf_file} to {self.device}; try --dtype bfloat16") from None
        return model, tok

    @staticmethod
    def _save_conversion(model, tok, target: Path, source: str, gguf_file: str) -> None:
        """Write to a temporary folder, then rename: a crash never leaves a half-written cache entry."""
        tmp = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix="." + target.name + ".", dir=target.parent))
            with _no_weight_loading_bar():  # transformers' "Writing model shards" bar, as the load's
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
            (tmp / "persona-judge-source.json").write_text(
                json.dumps({"source": source, "gguf_file": gguf_file}), encoding="utf-8"
            )
            try:
                os.replace(tmp, target)
                tmp = None
            except OSError:
                pass  # another process won the race; its copy is as good as ours
        except Exception as err:  # the cache is an optimization; never fail the load over it
            warnings.warn(f"could not cache the converted GGUF model in {target.parent}: {err}", stacklevel=3)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    # ----------------------------------------------------------------- attention masks

    def _setup_attention(self, tcfg) -> None:
        impl = getattr(self.model.config, "_attn_implementation", None) or "eager"
        if impl not in _MASKED_ATTN:
            raise ConfigError(
                f"the model uses attn_implementation={impl!r}; the hf backend supports "
                f"{' or '.join(_MASKED_ATTN)} (set backend.options.attn_implementation)"
            )
        # sdpa takes a bool mask (the cheapest to build per step); eager attention, and every static-cache
        # step (fixed shapes for graphs), take one additive float mask
        self._bool_mask = impl == "sdpa"
        window = getattr(tcfg, "sliding_window", None)
        types = getattr(tcfg, "layer_types", None)
        windows: dict[str, int | None] = {}
        if types:
            for t in set(types):
                if t == "full_attention":
                    windows[t] = None
                elif t == "sliding_attention":
                    windows[t] = int(window) if window else None
                else:
                    raise ConfigError(
                        f"the model has {t!r} layers, which the hf backend's batched cache does not support"
                    )
        else:
            use = getattr(tcfg, "use_sliding_window", True)
            windows[""] = int(window) if (window and use) else None
        self._windows = windows
        self._mask_dict = len(windows) > 1

    def _masks(self, position_ids, kv_len: int):
        """4-D masks (n, 1, Q, kv_len): causal in slot space (slot == position), plus sliding windows."""
        torch = self.torch
        kv = torch.arange(kv_len, device=position_ids.device)
        qp = position_ids[:, :, None]
        causal = kv[None, None, :] <= qp
        built: dict[int | None, Any] = {}
        for w in set(self._windows.values()):
            m = causal if w is None or w >= kv_len else causal & (kv[None, None, :] > qp - w)
            m = m[:, None]
            if not self._bool_mask or self.static:
                dt = self.model.dtype
                m = torch.zeros(m.shape, dtype=dt, device=m.device).masked_fill_(~m, torch.finfo(dt).min)
            built[w] = m
        if not self._mask_dict:
            return built[next(iter(self._windows.values()))]
        return {t: built[w] for t, w in self._windows.items()}

    # ----------------------------------------------------------------- static cache and compiled steps

    def _setup_static(self, opts: dict[str, Any]) -> None:
        """``cache_implementation="static"`` fixes each session's capacity; ``compile`` implies it.

        The capacity (``max_cache_len``, default ``n_ctx`` or the smaller of the
        model's maximum and 4096) becomes the backend's context length, so a
        generation that reaches it finishes with ``finish_reason="context"``
        instead of failing mid-way."""
        compile_opt = opts.get("compile", False)
        self.compile_mode: str | None = ("default" if compile_opt is True else compile_opt) or None
        self.compile_backend = str(opts.get("compile_backend") or "inductor")
        self.static = opts.get("cache_implementation") == "static" or self.compile_mode is not None
        cap = opts.get("max_cache_len")  # without a static cache, or with device_map: refused by HFOptions
        if self.static:
            if cap is not None and cap > self.context_length:
                raise ConfigError(
                    f"backend.options.max_cache_len={cap} exceeds the context length of {self.context_length}"
                )
            self.context_length = int(cap or (self.config.n_ctx or min(self.context_length, 4096)))
        self.compile_fallback: str | None = None  # why compiled steps fell back to eager, if they did
        self._compiled: Any = None
        self._kernels: dict[Any, CompiledKernel] = {}  # compile_kernel's, one per function
        if self.compile_mode is not None:
            # one graph per (session size, query length, backend): dynamo's default limit of 8 per function
            # would be reached by a server whose session grows, or by several backends in one process
            dynamo = self.torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
            try:
                self._compiled = self.torch.compile(
                    self._step_logits,
                    mode=None if self.compile_backend != "inductor" else self.compile_mode,
                    backend=self.compile_backend,
                    fullgraph=True,
                    dynamic=False,
                )
            except Exception as err:  # as a failed first compiled call: eager, one warning, never a failed load
                self.compile_fallback = self._compile_failed("compile", "torch.compile", err)

    def _step_logits(self, input_ids, position_ids, cache, keep: int):
        """One forward: masks from the positions, the model, the last ``keep`` positions' logits in float32.

        The unit that ``torch.compile`` captures in static mode, so the mask is
        built inside it: one additive tensor per attention kind, on the device."""
        mask = self._masks(position_ids, cache.step.kv_len)
        kwargs = {self._cache_arg: cache, "use_cache": True}
        if self._has_logits_to_keep:
            kwargs["logits_to_keep"] = keep
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, **kwargs)
        return out.logits[:, -keep:, :].float()

    def run_step(self, input_ids, position_ids, cache, keep: int, *, compiled: bool = False):
        """Run :meth:`_step_logits`, compiled when asked and possible.

        A compile that fails (an unsupported model, no compiler) falls back to
        eager for good, with one warning naming the reason: never a failed
        request. Compiled outputs are copied out, since CUDA graphs reuse
        their output memory on the next replay."""
        if compiled and self._compiled is not None:
            torch = self.torch
            try:
                if self.compile_mode == "reduce-overhead" or self.compile_backend == "cudagraphs":
                    cudagraph_thread_ready(torch)  # the engine's thread, on torch < 2.13
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are copied out
                return self._compiled(input_ids, position_ids, cache, keep).clone()
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as err:
                self._compiled = None
                self.compile_fallback = self._compile_failed("compile", "torch.compile", err)
        return self._step_logits(input_ids, position_ids, cache, keep)

    def _compile_failed(self, fact: str, what: str, err: Exception) -> str:
        """Record and warn once that a compiled function runs eager from now on; the reason, one line."""
        reason = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        self._facts[fact] = f"failed, eager ({reason})"
        warnings.warn(f"hf backend: {what} failed, running eager: {reason}", PersonaJudgeWarning, stacklevel=3)
        return reason

    def compile_kernel(self, fn):
        """With ``compile``, the token loop's array function compiled too; else ``fn`` itself.

        The batched judge's ~150 small operations per step cost a GPU's host
        about 0.5 ms of launches, which a compiled forward makes as long as
        the forward; compiled (``compile_backend``, default mode, shapes
        dynamic in the number of rows) they fuse into a few kernels. Like the
        compiled step, a compile that fails runs eager from then on, with
        one warning and ``describe()["compile_judge"]`` saying why."""
        if self.compile_mode is None:
            return fn
        kernel = self._kernels.get(fn)
        if kernel is None:
            kernel = self._kernels[fn] = CompiledKernel(
                self.torch,
                fn,
                self.compile_backend,
                on_fail=lambda err: self._compile_failed("compile_judge", "compiling the judge", err),
            )
            self._facts["compile_judge"] = f"torch.compile ({self.compile_backend})"
        return kernel

    # ----------------------------------------------------------------- contract

    def open(self, n_views: int) -> HFSession:
        if self.model is None:  # close() dropped the weights
            raise SessionError("this hf backend is closed; load the model again (a new backend)")
        return HFSession(self, n_views)

    def _take_spare(self, rows: int) -> tuple[list[tuple[Any, Any]], dict[int, Any]] | None:
        """The last static session's buffers when it had ``rows`` rows (else they are freed): one owner at a time."""
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is None or spare[0] != rows:
            return None
        return spare[1], spare[2]

    def session_size(self, views: int) -> int | None:
        """The rows a session opened for ``views`` waiting views should have; None: as large as before.

        The engine asks this when it opens a session (idle, or too small). With the dynamic cache a
        forward runs only on the rows it touches, so keeping the largest session an earlier batch
        needed costs nothing per step, and lets later requests join without a reopen: None. With the
        static cache every forward runs on **all** of the session's rows over the full capacity: a
        session kept at a 16-prompt batch's 32 rows would make every later single request compute
        32 rows per step, so it opens at what is needed. With compiled steps, rounded up to a power
        of two: each new row count is a new set of graphs to compile and capture, and a few sizes
        bound them."""
        if not self.static:
            return None
        if self.compile_mode is None:
            return views
        return 1 << max(views - 1, 0).bit_length()

    def native_generate(
        self, tokens: Sequence[int], *, temperature: float, top_k: int, top_p: float, max_new_tokens: int, seed: int
    ) -> list[int]:
        """Plain ``model.generate`` sampling (greedy at temperature 0): the benchmark baseline."""
        from transformers import GenerationConfig

        torch = self.torch
        greedy = SamplingParams(temperature).greedy
        eos = sorted(self.tokenizer.eos_token_ids)
        # Every logits processor set explicitly: ``generate`` fills unset (None) fields from the model's
        # generation_config, which may carry e.g. a repetition penalty the Persona-judge side does not apply.
        # The sampling-only fields go in only when sampling: set beside do_sample=False, transformers
        # logs "generation flags are not valid" on stderr (greedy never reads them anyway).
        sampling = (
            {}
            if greedy
            else dict(
                temperature=temperature,
                top_k=max(top_k, 0),
                top_p=top_p,
                min_p=0.0,
                typical_p=1.0,
                epsilon_cutoff=0.0,
                eta_cutoff=0.0,
            )
        )
        gc = GenerationConfig(
            max_new_tokens=max_new_tokens,
            min_length=0,
            num_beams=1,
            do_sample=not greedy,
            **sampling,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            pad_token_id=self.pad_token_id,
            eos_token_id=eos or None,
            # a hub config asking for a static or hybrid cache would make generate compile
            # (minutes, and a different program from the one timed against it): pin it
            cache_implementation="dynamic",
        )
        torch.manual_seed(seed)
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.input_device)
        finite = _FiniteLogits(torch)
        try:
            with torch.inference_mode(), warnings.catch_warnings(), _no_flag_notice():
                warnings.simplefilter("ignore")
                out = self.model.generate(
                    ids, attention_mask=torch.ones_like(ids), generation_config=gc, logits_processor=[finite]
                )
        except torch.cuda.OutOfMemoryError:
            raise DeviceError(f"out of memory on {self.device_label} in model.generate") from None
        if finite.bad is not None and bool(finite.bad):  # one read, after generate's own
            raise NumericalError(
                "the model produced NaN or infinite logits in model.generate, so its tokens are garbage "
                "(a broken model file, or an overflowing dtype: try --dtype bfloat16 or float32)"
            )
        new = out[0, len(tokens) :].tolist()
        for i, t in enumerate(new):
            if t in self.tokenizer.eos_token_ids:
                return new[:i]
        return new

    def describe(self) -> dict[str, Any]:
        """The backend's facts; ``threads`` is torch's thread count now, which any backend may change
        (it is process-wide: see ``_set_threads``)."""
        facts = dict(self._facts)
        if "threads" in facts:
            facts["threads"] = self.torch.get_num_threads()
        return facts

    def decoding_context(self):
        return self.torch.inference_mode()

    def close(self) -> None:
        self._spare = None
        model = getattr(self, "model", None)
        self.model = None
        del model
        if getattr(self, "torch", None) is not None and self.torch.cuda.is_available():
            self.torch.cuda.empty_cache()
