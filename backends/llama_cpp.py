"""llama.cpp backend (llama-cpp-python): any local GGUF model, one KV sequence per view.

The model is loaded **once**; all views of a request live in **one** llama.cpp
context, each in its own KV-cache sequence (``seq_id = view``):

- ``Session.forward_many`` puts the new tokens of every call -- different views,
  any lengths -- into one ``llama_decode`` batch and asks llama.cpp for logits
  only at the positions the caller needs (one row for a draft step, lambda+1
  rows for a verification). Rows are copied out one by one with
  ``llama_get_logits_ith``; nothing like ``logits_all`` is ever enabled, so
  the memory for logits is a few rows of the vocabulary, not the whole context.
- ``Session.truncate`` removes positions ``>= length`` from that view's
  sequence only (``llama_memory_seq_rm``); nothing is re-evaluated.
- Each view may hold ``context_length`` tokens. By default every sequence gets
  its own KV stream of that size (``kv_unified=False``); with
  ``kv_unified=True`` the sequences share one pool of
  ``context_length * n_sequences`` cells. The full-size SWA cache is always
  used, so rolling back never loses tokens of a sliding window.
- The context grows (is re-created, the weights stay) when a session needs more
  sequences than it has; one extra sequence is reserved for
  :meth:`LlamaCppBackend.native_generate`, the plain-sampling baseline that
  runs llama.cpp's own sampler chain.

With no model path the backend uses the embedded Gemma 3 270M (see
:mod:`personajudge.backends.embedded`). llama-cpp-python is imported only when
a backend is constructed, so listing plugins stays fast.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
import os
import stat
import struct
import threading
import warnings
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from personajudge.backends.embedded import default_model_path
from personajudge.core.chat_template import ChatTemplate
from personajudge.core.config import MAX_THREADS, BackendConfig, Options, take_options
from personajudge.core.contract import Backend, ForwardCall, Session
from personajudge.core.errors import (
    BackendUnavailableError,
    ConfigError,
    ContextLengthError,
    DeviceError,
    ModelLoadError,
    PersonaJudgeWarning,
    SessionError,
    TooManyViewsError,
)
from personajudge.core.files import path_kind
from personajudge.core.transforms import SamplingParams

INSTALL_HINT = 'pip install -e ".[llama]" in your persona-judge clone'
DEFAULT_N_CTX = 4096

#: llama.cpp keeps sizes and positions in 32-bit integers; larger values wrap around silently
_INT32 = 2**31 - 1
#: KV sequences llama.cpp allows in one context (LLAMA_MAX_SEQ)
MAX_SEQUENCES = 256


class LlamaCppOptions(Options):
    """``backend.options`` of the llama-cpp backend, bounded by what llama.cpp can do.

    Two limits are not visible in llama.cpp's own parameter checks and end in ``GGML_ASSERT`` /
    ``std::bad_alloc`` (the process aborts): ``n_batch`` must be at least the number of KV sequences
    (llama.cpp reserves one output row per sequence within one batch; checked when the context is
    created, see :meth:`LlamaCppBackend._ensure_sequences`), and no more than 512 threads.
    """

    n_batch: int = Field(
        512,
        ge=1,
        le=_INT32,
        description="Max tokens per llama_decode call; longer inputs are chunked. At least the number of views + 1.",
    )
    n_ubatch: int = Field(512, ge=1, le=_INT32, description="Physical micro-batch (at most n_batch).")
    n_seq_max: int | None = Field(
        None, ge=2, le=MAX_SEQUENCES, description="Initial number of KV sequences (views + 1); grows on demand."
    )
    kv_unified: bool = Field(False, description="One shared KV pool instead of one stream per sequence.")
    flash_attn: bool | None = Field(None, description="None = llama.cpp decides (auto); true / false force it.")
    threads_batch: int | None = Field(
        None, ge=1, le=MAX_THREADS, description="Threads for prompt processing (default: threads)."
    )
    use_mmap: bool = Field(True, description="Memory-map the model file.")
    verbose: bool = Field(False, description="Pass llama.cpp's log to stderr.")

    @model_validator(mode="after")
    def _batch_holds_sequences(self) -> LlamaCppOptions:
        if self.n_seq_max is not None and self.n_batch < self.n_seq_max:
            raise ValueError(
                f"n_batch={self.n_batch} is smaller than n_seq_max={self.n_seq_max}; llama.cpp "
                "needs a batch of at least one token per KV sequence (it aborts otherwise)"
            )
        return self


#: backend.options understood by this backend, with their defaults
OPTION_DEFAULTS: dict[str, Any] = {name: f.default for name, f in LlamaCppOptions.model_fields.items()}

# ggml log levels
_LOG_WARN, _LOG_ERROR, _LOG_CONT = 3, 4, 5


# --------------------------------------------------------------------------- llama_cpp import and logging


class _Log:
    """Keeps llama.cpp quiet: its log goes to a small ring buffer (warnings and errors only).

    The callback is installed once per process; error lines are used to explain
    load failures. ``verbose`` backends make it echo everything to stderr.
    """

    def __init__(self) -> None:
        self.lines: deque[tuple[int, int, str]] = deque(maxlen=64)
        self.counter = 0
        self.verbose = 0
        self._last_level = 0
        self._callback = None
        self._lock = threading.Lock()

    def install(self, lib: Any) -> None:
        with self._lock:
            if self._callback is not None:
                return

            @lib.llama_log_callback
            def callback(level: int, text: bytes, user_data: Any) -> None:  # pragma: no cover - C callback
                try:
                    if level == _LOG_CONT:
                        level = self._last_level
                    else:
                        self._last_level = level
                    msg = text.decode("utf-8", errors="replace") if text else ""
                    if self.verbose:
                        import sys

                        sys.stderr.write(msg)
                    if level >= _LOG_WARN and msg.strip():
                        self.counter += 1
                        self.lines.append((self.counter, level, msg.strip()))
                except Exception:
                    pass

            self._callback = callback  # keep a reference: ctypes callbacks must outlive their use
            lib.llama_log_set(callback, ctypes.c_void_p(0))

    def mark(self) -> int:
        return self.counter

    def errors_since(self, mark: int) -> list[str]:
        return [m for c, lvl, m in list(self.lines) if c > mark and lvl >= _LOG_ERROR]


_LOG = _Log()
_init_lock = threading.Lock()
_backend_initialized = False


def _import_llama() -> Any:
    """``llama_cpp`` (the low-level bindings), with quiet logging and the backend initialized."""
    global _backend_initialized
    try:
        import llama_cpp as lib
    except ImportError as err:
        raise BackendUnavailableError(
            f"the llama-cpp backend needs llama-cpp-python ({err}); run: {INSTALL_HINT}"
        ) from None
    except (OSError, RuntimeError) as err:  # the shared library failed to load
        raise BackendUnavailableError(
            f"llama-cpp-python is installed but its native library failed to load ({err}); "
            "reinstall it: pip install --force-reinstall --no-cache-dir llama-cpp-python"
        ) from None
    _LOG.install(lib)
    with _init_lock:
        if not _backend_initialized:
            lib.llama_backend_init()
            _backend_initialized = True
    return lib


# --------------------------------------------------------------------------- model file checks

GGUF_MAGIC = b"GGUF"
_OTHER_FORMATS = {
    b"ggml": "an old GGML model",
    b"ggmf": "an old GGMF model",
    b"ggjt": "an old GGJT model",
    b"PK\x03\x04": "a zip archive (a PyTorch checkpoint?)",
}


def check_model_file(path: str | os.PathLike[str]) -> Path:
    """Fail early, with a clear message, on a path llama.cpp cannot load (or would abort the process on).

    ``os.stat`` before opening: a FIFO or device as ``--model`` would make ``open()`` (ours or
    llama.cpp's) block forever, and ``Path.exists()`` raises ``PermissionError`` on Python 3.11 for
    a path in a folder the user cannot enter. The header's hyperparameters are checked against
    the ``GGML_ASSERT`` checks of llama.cpp's loader (:func:`_check_hparams`), which abort the process.
    """
    p = Path(path).expanduser()
    kind = path_kind(p, "the model file", ModelLoadError)
    if kind is None:
        raise ModelLoadError(
            f"model file not found: {p}; give a local .gguf file as --model PATH / backend.model "
            "(or leave it out to use the embedded Gemma 3 270M)"
        )
    if kind == "dir":
        ggufs = sorted(x.name for x in p.iterdir() if x.name.lower().endswith(".gguf"))[:3]
        hint = (
            f" (this folder holds {', '.join(ggufs)}: give its path)"
            if ggufs
            else " (it holds config.json, a transformers model: add --backend hf)"
            if (p / "config.json").is_file()
            else ""
        )
        raise ModelLoadError(f"model path {p} is a directory; the llama-cpp backend needs a .gguf file{hint}")
    if kind == "other":
        raise ModelLoadError(
            f"model path {p} is not a regular file (a FIFO, device or socket); the llama-cpp backend needs a .gguf file"
        )
    try:
        # O_NONBLOCK: should the path have become a FIFO since the stat, opening it does not block
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ModelLoadError(f"model path {p} is not a regular file; the llama-cpp backend needs a .gguf file")
            head = f.read(9)
            if len(head) < 8 and GGUF_MAGIC.startswith(head[:4]):  # empty, or the start of a GGUF header
                raise ModelLoadError(
                    f"model file {p} is {'empty' if not head else 'truncated'} ({st.st_size} bytes), "
                    "not a GGUF model; download it again"
                )
            if head[:4] != GGUF_MAGIC:
                what = next((v for k, v in _OTHER_FORMATS.items() if head.startswith(k)), None)
                if what is None and head[8:9] == b"{":
                    what = "a safetensors file"
                raise ModelLoadError(
                    f"model file {p} is {what or 'not a GGUF file'} (it does not start with the GGUF magic); "
                    "the llama-cpp backend needs a .gguf model -- convert safetensors/PyTorch checkpoints with "
                    "llama.cpp's convert_hf_to_gguf.py, or use the hf backend"
                )
            version = int.from_bytes(head[4:8], "little")
            if not 1 <= version <= 3:
                raise ModelLoadError(
                    f"model file {p} has GGUF version {version}, which this llama.cpp does not read; "
                    "the file is corrupt, or needs a newer llama-cpp-python"
                )
            if version >= 2:  # GGUF v1 (32-bit counts) is refused by llama.cpp itself
                _check_hparams(p, _read_gguf_metadata(f))
    except OSError as err:
        raise ModelLoadError(f"cannot read the model file {p}: {err.strerror or err}; check its permissions") from None
    return p


#: GGUF value types (gguf's GGUFValueType): fixed-size scalars as struct formats, and the two variable ones
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
#: arrays of more elements than this are skipped, not kept (per-layer hyperparameters have at most LLAMA_MAX_LAYERS)
_KEEP_ARRAY = 4096
#: llama.cpp's LLAMA_MAX_LAYERS: a larger block_count aborts the process (GGML_ASSERT)
LLAMA_MAX_LAYERS = 512
#: llama.cpp's LLAMA_MAX_EXPERTS (1024 in the llama.cpp llama-cpp-python 0.3.36 vendors): more aborts the process
LLAMA_MAX_EXPERTS = 1024
#: rope.scaling.type values llama.cpp knows; any other aborts it (GGML_ASSERT ... != UNSPECIFIED)
_ROPE_SCALING_TYPES = frozenset({"none", "linear", "yarn", "longrope"})


def _read_gguf_metadata(f: Any) -> dict[str, Any]:
    """The GGUF key/values before the vocabulary: numbers, strings and short numeric arrays (as tuples).

    ``gguf.GGUFReader`` is the library way, but it parses every key, and a 262,144-token vocabulary
    costs it 7.9 s on the embedded Gemma (14 times the whole model load). This reads the memory-mapped
    header and stops at the first long string array (the vocabulary) once ``general.architecture`` and
    the architecture's ``block_count`` are seen: converters write ``general.*``, then the
    hyperparameters, then ``tokenizer.*``. A key that runs past the end of the file ends the scan;
    llama.cpp then reports the damage itself.
    """
    meta: dict[str, Any] = {}
    try:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return meta
    with mm:
        size = len(mm)

        def scalar(fmt: str, off: int) -> tuple[Any, int]:
            return struct.unpack_from(fmt, mm, off)[0], off + struct.calcsize(fmt)

        def string(off: int) -> tuple[str, int]:
            n, off = scalar("<Q", off)
            if off + n > size:
                raise IndexError("string past the end of the file")
            return bytes(mm[off : off + n]).decode("utf-8", errors="replace"), off + n

        try:
            n_kv, off = scalar("<Q", 16)
            for _ in range(min(n_kv, size)):
                key, off = string(off)
                vtype, off = scalar("<I", off)
                if vtype in _GGUF_SCALARS:
                    meta[key], off = scalar(_GGUF_SCALARS[vtype], off)
                elif vtype == _GGUF_STRING:
                    meta[key], off = string(off)
                elif vtype == _GGUF_ARRAY:
                    itype, off = scalar("<I", off)
                    count, off = scalar("<Q", off)
                    if itype in _GGUF_SCALARS:
                        fmt = _GGUF_SCALARS[itype]
                        width = struct.calcsize(fmt)
                        if off + count * width > size:
                            break
                        if count <= _KEEP_ARRAY:
                            meta[key] = struct.unpack_from(f"<{count}{fmt[1]}", mm, off)
                        off += count * width
                    elif itype == _GGUF_STRING:
                        arch = meta.get("general.architecture")
                        if count > _KEEP_ARRAY and f"{arch}.block_count" in meta:
                            break  # the vocabulary: the hyperparameters are all read
                        if off + count * 8 > size:
                            break
                        for _ in range(count):
                            n, off = scalar("<Q", off)
                            off += n
                    else:
                        break  # nested arrays or an unknown type: leave it to llama.cpp
                else:
                    break
        except (struct.error, IndexError):
            pass
    return meta


def _check_hparams(p: Path, meta: dict[str, Any]) -> None:
    """Refuse hyperparameters on which llama.cpp's loader or its first decode abort the process.

    Generic over architectures: the keys are looked up under the file's ``general.architecture``.
    These are the ``GGML_ASSERT`` checks of ``llama_model::load_hparams`` (llama-model.cpp) and of the
    norm kernels, each reproduced with a damaged file on llama-cpp-python 0.3.36. Values that
    llama.cpp reports itself (a zero head count or embedding length: a tensor of the wrong shape)
    are left to it.
    """
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        return

    def number(name: str) -> int | None:
        v = meta.get(f"{arch}.{name}")
        if isinstance(v, tuple):  # per-layer values: the loader checks the largest
            v = max((x for x in v if isinstance(x, int)), default=None)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    def bad(name: str, value: Any, why: str) -> ModelLoadError:
        return ModelLoadError(
            f"model file {p} has an invalid hyperparameter {arch}.{name} = {value} ({why}); the file is "
            "corrupt -- download or convert it again"
        )

    n_layer = number("block_count")
    if n_layer is not None and not 1 <= n_layer <= LLAMA_MAX_LAYERS:
        raise bad("block_count", n_layer, f"llama.cpp needs 1 to {LLAMA_MAX_LAYERS} layers")
    nextn = number("nextn_predict_layers")
    if nextn is not None and n_layer is not None and nextn > n_layer:
        raise bad("nextn_predict_layers", nextn, f"more than block_count = {n_layer}")
    n_expert = number("expert_count") or 0
    used = number("expert_used_count") or 0
    groups = number("expert_group_count") or 0
    group_used = number("expert_group_used_count") or 0
    if n_expert > LLAMA_MAX_EXPERTS:
        raise bad("expert_count", n_expert, f"llama.cpp allows at most {LLAMA_MAX_EXPERTS} experts")
    if used > n_expert:
        raise bad("expert_used_count", used, f"more than expert_count = {n_expert}")
    if n_expert > 0 and used == 0:
        raise bad("expert_used_count", used, f"a model with {n_expert} experts must use at least one")
    if n_expert > 0 and groups >= n_expert:
        raise bad("expert_group_count", groups, f"must be fewer than expert_count = {n_expert}")
    if n_expert == 0 and groups > 0:
        raise bad("expert_group_count", groups, "the model has no experts")
    if groups > 1 and n_expert % groups:
        raise bad("expert_group_count", groups, f"does not divide expert_count = {n_expert}")
    if groups > 1 and not 0 < group_used < groups:
        raise bad("expert_group_used_count", group_used, f"must be 1 to {groups - 1}")
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if isinstance(scaling, str) and scaling not in _ROPE_SCALING_TYPES:
        raise bad("rope.scaling.type", repr(scaling), f"llama.cpp knows {', '.join(sorted(_ROPE_SCALING_TYPES))}")
    for key, value in meta.items():  # norm epsilons: ggml asserts eps >= 0 (NaN fails too) at the first decode
        name = key[len(arch) + 1 :]
        if key.startswith(f"{arch}.") and (name.endswith("epsilon") or name.endswith("_eps") or name.endswith(".eps")):
            for v in value if isinstance(value, tuple) else (value,):
                if isinstance(v, float) and not (math.isfinite(v) and v >= 0):
                    raise bad(name, v, "a norm epsilon must be a finite number >= 0")


# --------------------------------------------------------------------------- tokenizer


def _occurrences(text: str, sub: str) -> list[int]:
    """Where ``sub`` starts in ``text``, without overlaps."""
    out, at = [], text.find(sub)
    while at >= 0:
        out.append(at)
        at = text.find(sub, at + len(sub))
    return out


class LlamaCppTokenizer:
    """The model's own tokenizer through llama.cpp, plus a jinja2 chat-template renderer."""

    def __init__(self, lib: Any, model: Any, origin: str = "the model"):
        self._lib = lib
        self.origin = origin  # named in chat-template errors
        self._vocab = lib.llama_model_get_vocab(model)
        self.vocab_size = int(lib.llama_vocab_n_tokens(self._vocab))
        is_eog = lib.llama_vocab_is_eog
        eog = {t for t in range(self.vocab_size) if is_eog(self._vocab, t)}
        for fn in ("llama_vocab_eos", "llama_vocab_eot"):
            t = int(getattr(lib, fn)(self._vocab))
            if 0 <= t < self.vocab_size:
                eog.add(t)
        self.eos_token_ids = frozenset(eog)
        self.bos_token_id = int(lib.llama_vocab_bos(self._vocab))
        self.eos_token_id = int(lib.llama_vocab_eos(self._vocab))
        self.add_bos = bool(lib.llama_vocab_get_add_bos(self._vocab))
        self._add_eos = bool(lib.llama_vocab_get_add_eos(self._vocab))
        tpl = lib.llama_model_chat_template(model, None)
        self.chat_template: str | None = tpl.decode("utf-8", errors="replace") if tpl else None
        self._compiled: tuple[str, Any] | None = None

    @property
    def vocab(self) -> Any:
        """The model's vocabulary, which ``LlamaCppBackend.close()`` frees (then a typed error, not an abort)."""
        if self._vocab is None:
            raise SessionError("this llama-cpp backend is closed; load the model again to use its tokenizer")
        return self._vocab

    def token_text(self, token: int, *, special: bool = True) -> str:
        """The text of one token (special tokens rendered when ``special``)."""
        if not 0 <= token < self.vocab_size:
            return ""
        buf = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    @functools.cached_property
    def special_texts(self) -> frozenset[str]:
        """The texts of the control (and unknown) tokens, which ``encode`` turns into those tokens
        unless ``special=False`` (llama.cpp's ``parse_special``): the API encodes a user's text that
        holds one (``<eos>``, ``<end_of_turn>``) as plain text. Also the user-defined tokens that
        end generation or begin a text and are not marked control: llama.cpp matches those in text
        whatever ``parse_special`` says, so ``encode(special=False)`` cuts them apart itself
        (:attr:`_guarded`; the embedded Gemma has none). The other user-defined tokens (Gemma's ``<start_of_image>``, HTML tags
        such as ``<table>``, runs of spaces or newlines) are matched in text as llama.cpp always
        matches them; they end nothing. Read once, on first use (a pass over the vocabulary)."""
        attr = self._lib.llama_vocab_get_attr
        flags = int(self._lib.LLAMA_TOKEN_ATTR_CONTROL) | int(self._lib.LLAMA_TOKEN_ATTR_UNKNOWN)
        vocab = self.vocab
        ids = [t for t in range(self.vocab_size) if int(attr(vocab, t)) & flags]
        return frozenset(text for text in map(self.token_text, ids) if text) | self._guarded

    @functools.cached_property
    def _guarded(self) -> frozenset[str]:
        """The texts of user-defined tokens that end generation or begin a text, which llama.cpp
        would match in a user's text even with ``parse_special`` off (a token also marked control,
        as Gemma 3's ``</s>`` is, is not matched then, and needs no guard)."""
        attr = self._lib.llama_vocab_get_attr
        defined = int(self._lib.LLAMA_TOKEN_ATTR_USER_DEFINED)
        control = int(self._lib.LLAMA_TOKEN_ATTR_CONTROL) | int(self._lib.LLAMA_TOKEN_ATTR_UNKNOWN)
        vocab = self.vocab
        ends = {t for t in (*self.eos_token_ids, self.bos_token_id) if 0 <= t < self.vocab_size}
        flags = {t: int(attr(vocab, t)) for t in ends}
        return frozenset(
            text for t in sorted(ends) if flags[t] & defined and not flags[t] & control and (text := self.token_text(t))
        )

    def encode(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Token ids of ``text``; ``special=False`` encodes control-token text (``<eos>``) as plain text
        (and the user-defined tokens of :attr:`_guarded`, cut after their first character)."""
        if not special and self._guarded:
            cuts = sorted({i + 1 for g in self._guarded for i in _occurrences(text, g)})
            if cuts:
                pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
                ids = self._tokenize(pieces[0], add_bos, False)
                for piece in pieces[1:]:
                    ids += self._tokenize(piece, False, False)
                return ids
        return self._tokenize(text, add_bos, special)

    def _tokenize(self, text: str, add_bos: bool, special: bool) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        arr = (ctypes.c_int32 * n_max)()
        n = self._lib.llama_tokenize(self.vocab, data, len(data), arr, n_max, add_bos, special)
        if n < 0:
            n_max = -n
            arr = (ctypes.c_int32 * n_max)()
            n = self._lib.llama_tokenize(self.vocab, data, len(data), arr, n_max, add_bos, special)
        if n < 0:
            raise RuntimeError(f"llama_tokenize failed ({n})")
        ids = list(arr[:n])
        if (
            add_bos
            and self._add_eos
            and ids
            and ids[-1] == self.eos_token_id
            and not text.endswith(self.token_text(self.eos_token_id))
        ):
            ids.pop()  # a prompt for generation never ends with an EOS the model config appends
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        toks = [int(t) for t in ids]
        if not toks:
            return ""
        bad = [t for t in toks if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        arr = (ctypes.c_int32 * len(toks))(*toks)
        size = max(64, 8 * len(toks))
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = self._lib.llama_detokenize(self.vocab, arr, len(toks), buf, size, False, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n
        raise RuntimeError("llama_detokenize failed")

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ConfigError(
                "this model has no chat template (GGUF key tokenizer.chat_template); use --encoder plain (or auto)"
            )
        if self._compiled is None or self._compiled[0] != self.chat_template:
            self._compiled = (self.chat_template, ChatTemplate(self.chat_template, self.origin))
        return self._compiled[1].render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.token_text(self.bos_token_id) if self.bos_token_id >= 0 else "",
            eos_token=self.token_text(self.eos_token_id) if self.eos_token_id >= 0 else "",
        )


# --------------------------------------------------------------------------- batch


class _Batch:
    """A ``llama_batch`` whose arrays are numpy buffers (filled with slices, not per-token ctypes calls)."""

    def __init__(self, lib: Any, capacity: int):
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        base = self.seq.ctypes.data
        self._seq_ptrs = (ctypes.c_void_p * capacity)(*[base + 4 * i for i in range(capacity)])
        b = lib.llama_batch()
        b.n_tokens = 0
        b.token = self.token.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.embd = type(b.embd)()  # a NULL pointer: the batch carries tokens, not embeddings
        b.pos = self.pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.seq_id = ctypes.cast(self._seq_ptrs, type(b.seq_id))
        b.logits = self.logits.ctypes.data_as(type(b.logits))
        self.struct = b


_DECODE_ERRORS = {
    1: "no free slot in the KV cache",
    2: "aborted",
    -1: "invalid input batch",
}


# --------------------------------------------------------------------------- session


class LlamaCppSession(Session):
    """One KV-cache sequence per view in the backend's single llama.cpp context.

    A backend serves one open session at a time (its sequences are the
    views); opening another closes this one, and the base class then refuses
    further calls on it.
    """

    def __init__(self, backend: LlamaCppBackend, n_views: int):
        super().__init__(n_views, backend.context_length, backend.n_vocab)
        self.backend = backend

    def _forward_many(self, calls: list[ForwardCall]) -> list[np.ndarray]:
        return self.backend._decode([(c.view, self.length(c.view), c.tokens, c.n_logits) for c in calls])

    def _truncate(self, view: int, length: int) -> None:
        self.backend._seq_rm(view, length)

    def _close(self) -> None:
        if self.backend._session is self:
            self.backend._session = None
            self.backend._clear_sequences(self.n_views)


# --------------------------------------------------------------------------- backend


class LlamaCppBackend(Backend):
    """llama.cpp on any local GGUF file; default: the embedded Gemma 3 270M.

    Config: ``model`` (path to a .gguf; None = embedded default), ``threads``,
    ``n_ctx`` (tokens per view; default min(4096, training context)),
    ``n_gpu_layers`` (None = llama.cpp's default, -1 = all). ``options``: see
    :data:`OPTION_DEFAULTS`.
    """

    name = "llama-cpp"
    config_fields = frozenset({"model", "threads", "n_ctx", "n_gpu_layers"})
    Options = LlamaCppOptions  # backend.options, checked without loading (the Ray driver does, before Ray starts)
    description = "llama.cpp on a local GGUF model (default: embedded Gemma 3 270M); one KV sequence per view."

    def __init__(self, config: BackendConfig | None = None):
        config = config or BackendConfig(name=self.name)
        self.options = take_options(config, LlamaCppOptions, owner=self.name)
        if config.threads is not None and config.threads > MAX_THREADS:
            raise ConfigError(
                f"backend.threads={config.threads}: llama.cpp runs at most {MAX_THREADS} threads (it aborts with more)"
            )
        initial = self.options["n_seq_max"] or 3
        if config.n_ctx is not None and config.n_ctx * initial > 2**32 - 1:  # llama.cpp's n_ctx is a uint32_t
            raise ConfigError(
                f"backend.n_ctx={config.n_ctx} x {initial} KV sequences is more than llama.cpp can "
                "address; lower the context size (--n-ctx)"
            )
        if config.n_gpu_layers is not None and config.n_gpu_layers > _INT32:
            raise ConfigError(f"backend.n_gpu_layers={config.n_gpu_layers} is out of range; -1 offloads every layer")
        if self.options["n_batch"] < initial:
            raise ConfigError(
                f"backend.options.n_batch={self.options['n_batch']} is smaller than the {initial} KV "
                f"sequences the context starts with (views + 1); set n_batch to at least {initial}"
            )
        self._model = None
        self._ctx = None
        self._session: LlamaCppSession | None = None
        self._n_seq = 0
        self._lock = threading.RLock()

        lib = _import_llama()
        self._lib = lib
        if self.options["verbose"]:
            _LOG.verbose += 1
            self._verbose_counted = True
        else:
            self._verbose_counted = False

        if config.n_gpu_layers not in (None, 0) and not lib.llama_supports_gpu_offload():
            warnings.warn(
                f"the llama-cpp backend: this llama-cpp-python build has no GPU offload, so the model runs on "
                f"the CPU; n_gpu_layers={config.n_gpu_layers} ignored (for a GPU, reinstall llama-cpp-python "
                'built with CMAKE_ARGS="-DGGML_CUDA=on")',
                PersonaJudgeWarning,
                stacklevel=2,
            )
        self.threads = int(config.threads or _default_threads())
        self.threads_batch = int(self.options["threads_batch"] or self.threads)
        self.n_gpu_layers = config.n_gpu_layers
        self.n_batch = int(self.options["n_batch"])
        self.n_ubatch = min(int(self.options["n_ubatch"]), self.n_batch)
        self._batch: _Batch | None = None
        self.embedded = config.model is None
        self.model_path: Path | None = None
        try:
            self._model = self._load(config.model)
            self.tokenizer = LlamaCppTokenizer(lib, self._model, origin=str(self.model_path))
            self.n_vocab = self.tokenizer.vocab_size
            self.n_ctx_train = int(lib.llama_model_n_ctx_train(self._model))
            default_ctx = min(DEFAULT_N_CTX, self.n_ctx_train) if self.n_ctx_train > 0 else DEFAULT_N_CTX
            self.context_length = int(config.n_ctx or default_ctx)
            initial = self.options["n_seq_max"] or 3  # two views + the native-sampling sequence
            self._ensure_sequences(int(initial), on_error=ModelLoadError)
        except BaseException:
            self.close()
            raise

    def _load(self, model: str | None) -> Any:
        """Check and load the configured file, or the embedded default (rebuilt once if it fails to load)."""
        if model is not None:
            self.model_path = check_model_file(model)
            return self._load_model(self.model_path)

        try:
            self.model_path = check_model_file(default_model_path())
            return self._load_model(self.model_path)
        except ModelLoadError:
            # The cached file passed the cheap size/mtime check but does not load: re-hash it
            # (it is rebuilt when corrupt, never used) and try once more.
            self.model_path = check_model_file(default_model_path(verify=True))
            return self._load_model(self.model_path)

    # ---------------------------------------------------------------- setup

    def _load_model(self, path: Path) -> Any:
        lib = self._lib
        params = lib.llama_model_default_params()
        if self.n_gpu_layers is not None:
            params.n_gpu_layers = int(self.n_gpu_layers)
        if not self.options["use_mmap"]:
            params.load_mode = lib.LLAMA_LOAD_MODE_NONE
        mark = _LOG.mark()
        model = lib.llama_model_load_from_file(str(path).encode("utf-8"), params)
        if not model:
            raise ModelLoadError(f"llama.cpp could not load {path}: {_explain(_LOG.errors_since(mark))}")
        return model

    def _ensure_sequences(self, n_seq: int, *, on_error: type[Exception] = DeviceError) -> None:
        """(Re)create the context so that it has at least ``n_seq`` sequences of ``context_length`` tokens."""
        if self._ctx is not None and self._n_seq >= n_seq:
            return
        lib = self._lib
        if n_seq > int(lib.llama_max_parallel_sequences()):
            raise TooManyViewsError(
                f"{n_seq - 1} views need more KV sequences than llama.cpp supports "
                f"({lib.llama_max_parallel_sequences()})"
            )
        # llama.cpp reserves one output row per sequence within a batch and aborts (GGML_ASSERT
        # n_outputs_max <= cparams.n_outputs_max) when the batch is smaller: refuse instead.
        if self.n_batch < n_seq:
            raise TooManyViewsError(
                f"{n_seq - 1} view(s) need {n_seq} KV sequences, more than backend.options.n_batch="
                f"{self.n_batch} tokens per batch can serve; set n_batch to at least {n_seq}"
            )
        if self.context_length * n_seq > 2**32 - 1:  # n_ctx is a uint32_t: it would wrap around
            raise TooManyViewsError(
                f"a context of {self.context_length} tokens x {n_seq} sequences is more than llama.cpp "
                "can address; lower the context size (--n-ctx)"
            )
        if self._session is not None:
            self._session._closed = True
            self._session = None
        self._free_context()
        p = lib.llama_context_default_params()
        p.n_ctx = self.context_length * n_seq
        p.n_batch = self.n_batch
        p.n_ubatch = self.n_ubatch
        p.n_seq_max = n_seq
        p.n_threads = self.threads
        p.n_threads_batch = self.threads_batch
        p.kv_unified = bool(self.options["kv_unified"])
        p.swa_full = True  # rollback must never find sliding-window tokens evicted
        p.embeddings = False
        p.no_perf = True
        if hasattr(p, "n_outputs_max_per_seq"):
            p.n_outputs_max_per_seq = 0  # a verification needs lambda+1 rows of one sequence
        fa = self.options["flash_attn"]
        p.flash_attn_type = (
            lib.LLAMA_FLASH_ATTN_TYPE_AUTO
            if fa is None
            else lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if fa
            else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        mark = _LOG.mark()
        ctx = lib.llama_init_from_model(self._model, p)
        if not ctx:
            raise on_error(
                f"llama.cpp could not create a context of {self.context_length} tokens x {n_seq} sequences "
                f"({_explain(_LOG.errors_since(mark))}); lower the context size (--n-ctx)"
            )
        per_seq = int(lib.llama_n_ctx(ctx)) if p.kv_unified else int(lib.llama_n_ctx_seq(ctx))
        if per_seq < self.context_length * (n_seq if p.kv_unified else 1):
            lib.llama_free(ctx)
            raise on_error(
                f"llama.cpp gave each sequence {per_seq} tokens of context, fewer than the "
                f"requested {self.context_length}; lower the context size (--n-ctx)"
            )
        self._ctx = ctx
        self._mem = lib.llama_get_memory(ctx)
        self._n_seq = n_seq
        self._batch = _Batch(lib, min(self.n_batch, int(lib.llama_n_batch(ctx))))

    def _free_context(self) -> None:
        if self._ctx is not None:
            self._lib.llama_free(self._ctx)
            self._ctx = None
            self._mem = None
            self._batch = None
            self._n_seq = 0

    # ---------------------------------------------------------------- contract

    def open(self, n_views: int) -> LlamaCppSession:
        if n_views < 1:
            raise ValueError("a session needs at least one view")
        with self._lock:
            self._require_open()
            if self._session is not None:
                self._session._closed = True  # one open session per backend: the newest wins
                self._session = None
            self._ensure_sequences(n_views + 1)
            self._lib.llama_memory_clear(self._mem, False)
            self._session = LlamaCppSession(self, n_views)
            return self._session

    def native_generate(
        self, tokens: Sequence[int], *, temperature: float, top_k: int, top_p: float, max_new_tokens: int, seed: int
    ) -> list[int]:
        """Plain sampling with llama.cpp's own sampler chain (temperature, top-k, top-p), stopping at EOS.

        Runs on a sequence reserved for it, so an open session is not disturbed.
        """
        lib = self._lib
        prompt = [int(t) for t in tokens]
        if not prompt:
            raise ValueError("native_generate needs at least one prompt token")
        if not (0 <= min(prompt) and max(prompt) < self.n_vocab):
            raise ValueError(f"token ids must be in 0..{self.n_vocab - 1}")
        if len(prompt) >= self.context_length:
            raise ContextLengthError(
                f"the prompt is {len(prompt)} tokens, the context holds {self.context_length}; "
                "shorten it or raise --n-ctx"
            )
        with self._lock:
            self._require_open()
            seq = self._n_seq - 1
            self._seq_rm(seq, 0)
            chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
            try:
                if SamplingParams(temperature).greedy:
                    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
                else:  # same order as the core's transforms: temperature, top-k, top-p
                    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(float(temperature)))
                    if 0 < top_k < self.n_vocab:
                        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(int(top_k)))
                    if top_p < 1.0:
                        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(float(top_p), 1))
                    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(int(seed) % (1 << 32)))
                eos = self.tokenizer.eos_token_ids
                out: list[int] = []
                idx = self._feed_seq(seq, 0, prompt)
                while len(out) < max_new_tokens and len(prompt) + len(out) < self.context_length:
                    tok = int(lib.llama_sampler_sample(chain, self._ctx, idx))
                    if tok in eos:
                        break
                    out.append(tok)
                    n = len(prompt) + len(out)
                    if len(out) >= max_new_tokens or n >= self.context_length:
                        break
                    idx = self._feed_seq(seq, n - 1, [tok])
                return out
            finally:
                lib.llama_sampler_free(chain)
                if self._ctx is not None:
                    self._seq_rm(seq, 0)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "backend": self.name,
            "model": str(self.model_path),
            "threads": self.threads,
            "n_ctx": self.context_length,
        }
        if self._model is not None:
            buf = ctypes.create_string_buffer(256)
            self._lib.llama_model_desc(self._model, buf, len(buf))
            info["model_desc"] = buf.value.decode("utf-8", errors="replace")
            info["embedded"] = self.embedded
        info["n_gpu_layers"] = self.n_gpu_layers
        info["device"] = "gpu" if self._lib.llama_supports_gpu_offload() and self.n_gpu_layers != 0 else "cpu"
        info["kv_unified"] = bool(self.options["kv_unified"])
        # not the KV sequences the context has grown to (``_n_seq``): that depends on earlier calls,
        # and this feeds every row's ``settings`` (PersonaJudge.settings), which must not
        return info

    def close(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            session = getattr(self, "_session", None)
            if session is not None:
                session._closed = True
                self._session = None
            if getattr(self, "_ctx", None) is not None:
                self._free_context()
            if getattr(self, "_model", None) is not None:
                tok = getattr(self, "tokenizer", None)
                if isinstance(tok, LlamaCppTokenizer):
                    tok._vocab = None  # it points into the model freed next
                self._lib.llama_model_free(self._model)
                self._model = None
            if getattr(self, "_verbose_counted", False):
                _LOG.verbose -= 1
                self._verbose_counted = False

    def __del__(self) -> None:  # pragma: no cover - best effort at garbage collection
        try:
            self.close()
        except Exception:
            pass

    # ---------------------------------------------------------------- internals

    def _require_open(self) -> None:
        if self._model is None:
            raise SessionError("this llama-cpp backend is closed; load the model again (a new backend)")

    def _seq_rm(self, seq: int, start: int) -> None:
        if not self._lib.llama_memory_seq_rm(self._mem, seq, start, -1):
            raise DeviceError(
                f"llama.cpp could not remove positions >= {start} of sequence {seq} "
                "(this model's memory does not support partial removal)"
            )

    def _clear_sequences(self, n: int) -> None:
        with self._lock:  # a session may be closed from another thread while the backend closes
            if self._ctx is not None:
                for s in range(min(n, self._n_seq)):
                    self._lib.llama_memory_seq_rm(self._mem, s, -1, -1)

    def _run(self, n: int) -> None:
        b = self._batch
        assert b is not None  # made together with the context, which every caller holds open
        b.struct.n_tokens = n
        rc = self._lib.llama_decode(self._ctx, b.struct)
        if rc != 0:
            why = _DECODE_ERRORS.get(rc, "fatal error")
            raise _DecodeFailed(rc, f"llama.cpp decode failed (code {rc}: {why}) on a batch of {n} tokens")

    def _feed_seq(self, seq: int, start: int, tokens: list[int]) -> int:
        """Feed one sequence (chunked), logits only for the last token; return its batch index."""
        b = self._batch
        assert b is not None  # made together with the context
        k = 0
        try:
            while k < len(tokens):
                chunk = tokens[k : k + b.capacity]
                n = len(chunk)
                b.token[:n] = chunk
                b.pos[:n] = np.arange(start + k, start + k + n, dtype=np.int32)
                b.seq[:n] = seq
                b.logits[:n] = 0
                k += n
                if k == len(tokens):
                    b.logits[n - 1] = 1
                self._run(n)
            return n - 1
        except _DecodeFailed as err:
            self._lib.llama_memory_seq_rm(self._mem, seq, start, -1)
            raise DeviceError(str(err) + "; try a smaller batch (backend option n_batch)") from None

    def _decode(self, calls: list[tuple[int, int, Sequence[int], int]]) -> list[np.ndarray]:
        """One llama_decode for all ``(seq, start, tokens, n_logits)`` calls (chunked past n_batch)."""
        with self._lock:
            self._require_open()
            lib, b, V = self._lib, self._batch, self.n_vocab
            assert b is not None  # _require_open(): the context and its batch exist
            total = sum(len(t) for _, _, t, _ in calls)
            token = np.empty(total, dtype=np.int32)
            pos = np.empty(total, dtype=np.int32)
            seq = np.empty(total, dtype=np.int32)
            want = np.zeros(total, dtype=np.int8)
            outs = [np.empty((n, V), dtype=np.float32) for _, _, _, n in calls]
            dest: dict[int, tuple[int, int]] = {}  # flat index -> (call, row)
            k = 0
            for ci, (s, start, toks, n) in enumerate(calls):
                L_ = len(toks)
                token[k : k + L_] = toks
                pos[k : k + L_] = np.arange(start, start + L_, dtype=np.int32)
                seq[k : k + L_] = s
                want[k + L_ - n : k + L_] = 1
                for r in range(n):
                    dest[k + L_ - n + r] = (ci, r)
                k += L_
            row_bytes = V * 4
            try:
                for c0 in range(0, total, b.capacity):
                    c1 = min(total, c0 + b.capacity)
                    n = c1 - c0
                    b.token[:n] = token[c0:c1]
                    b.pos[:n] = pos[c0:c1]
                    b.seq[:n] = seq[c0:c1]
                    b.logits[:n] = want[c0:c1]
                    self._run(n)
                    for i in np.flatnonzero(want[c0:c1]):
                        ci, r = dest[c0 + int(i)]
                        ptr = lib.llama_get_logits_ith(self._ctx, int(i))
                        if not ptr:
                            raise _DecodeFailed(0, "llama.cpp returned no logits for a requested position")
                        ctypes.memmove(outs[ci].ctypes.data + r * row_bytes, ptr, row_bytes)
            except _DecodeFailed as err:
                for s, start, _, _ in calls:  # leave every sequence as it was before the call
                    lib.llama_memory_seq_rm(self._mem, s, start, -1)
                raise DeviceError(
                    str(err) + "; if it persists, lower the context size (--n-ctx) or the batch "
                    "size (backend option n_batch)"
                ) from None
            return outs


class _DecodeFailed(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _default_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_THREADS))


def _explain(errors: list[str]) -> str:
    """The most telling llama.cpp error line, or a generic hint."""
    for line in errors:
        if "error loading model:" in line:
            msg = line.split("error loading model:", 1)[1].strip()
            if msg.startswith("llama_model_loader: "):
                msg = msg[len("llama_model_loader: ") :]
            return msg + _hint(errors)
    for line in reversed(errors):
        if "failed to load model" not in line:
            return line.split(": ", 1)[-1].strip() + _hint(errors)
    return "unknown error; the file may be truncated or corrupt, or need a newer llama-cpp-python"


def _hint(errors: list[str]) -> str:
    text = " ".join(errors)
    if "not within the file bounds" in text or "failed to read" in text:
        return " -- the file is truncated or corrupt; download it again"
    if "unknown model architecture" in text:
        return " -- this llama-cpp-python is too old for the model; upgrade it"
    return ""
