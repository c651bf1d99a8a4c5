"""Write a random-weight GGUF with a real Gemma 3 model's shapes, to benchmark speed offline.

Tokens per second depend on a model's shapes, not its weights: how much of a
token's compute is the transformer body and how much the projection onto the
vocabulary. Persona-judge needs about 1.8 vocabulary rows per token (both
views' distributions at every drafted position) where plain decoding needs
one, so its ratio to plain speed depends on that balance. The embedded
Gemma 3 270M is the worst case (a 262k-vocabulary projection that costs more
than its 18 small layers). This script builds a model with the shapes of a
larger Gemma 3 (random weights, the embedded model's tokenizer copied in)
so the ratio can be measured on this machine without downloading anything::

    python examples/synthetic_gguf.py --shape gemma-3-1b runs/gemma-3-1b-random.gguf
    personajudge bench --model runs/gemma-3-1b-random.gguf --prompt "Why is the sky blue?"

The text such a model writes is noise; only its speed means anything. Needs
``gguf`` (in the ``[hf]`` extra) and the embedded model (``[llama]`` extra).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

from personajudge.core.errors import PersonaJudgeError
from personajudge.core.files import check_output_path, os_error_text

GGUF_HINT = 'pip install -e ".[hf]" in your persona-judge clone'


class SyntheticGGUFError(PersonaJudgeError, ValueError):
    """A user mistake (a source that is not a gemma3 GGUF, a folder as the destination): one line at the CLI."""


#: Shapes of the Gemma 3 text models (from their published configs).
SHAPES: dict[str, dict[str, int]] = {
    "gemma-3-270m": dict(
        embedding_length=640, block_count=18, feed_forward_length=2048, head_count=4, head_count_kv=1, key_length=256
    ),
    "gemma-3-1b": dict(
        embedding_length=1152, block_count=26, feed_forward_length=6912, head_count=4, head_count_kv=1, key_length=256
    ),
    "gemma-3-4b": dict(
        embedding_length=2560, block_count=34, feed_forward_length=10240, head_count=8, head_count_kv=4, key_length=256
    ),
    # a few megabytes of body on the full vocabulary: for tests
    "tiny": dict(
        embedding_length=64, block_count=2, feed_forward_length=128, head_count=2, head_count_kv=1, key_length=32
    ),
}

#: Metadata keys that describe shapes; everything else (tokenizer, rope, norms) is copied.
_SHAPE_KEYS = (
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
)


#: Block types whose random blocks are cheap to write: one f16 scale, then uniform integer codes.
#: Value: the standard deviation of a code (int8 on [-127, 127]; a 4-bit code minus 8).
_CODE_STD = {"Q8_0": 73.3, "Q4_0": 4.61}


def _blocks(rng: np.random.Generator, qtype: str, rows: int, cols: int, std: float) -> np.ndarray:
    """Random blocks of ``qtype`` for a rows x cols matrix, as raw bytes (scale = std / code std)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    if cols % block:
        raise ValueError(f"{qtype} needs rows that are a multiple of {block} wide, not {cols}")
    n = rows * cols // block
    out = np.empty((n, size), dtype=np.uint8)
    out[:, :2] = np.full(n, std / _CODE_STD[qtype], dtype=np.float16).view(np.uint8).reshape(n, 2)
    out[:, 2:] = rng.integers(0, 256, size=(n, size - 2), dtype=np.uint8)
    return out.reshape(rows, cols // block * size)


def write_synthetic(
    source: str | Path, dest: str | Path, shape: dict[str, int], *, body: str = "Q4_0", seed: int = 0
) -> Path:
    """Copy ``source``'s metadata and tokenizer into ``dest`` with ``shape`` and random weights.

    The embedding (tied to the output projection) is Q8_0, as in the embedded
    model; the layers' matrices are ``body`` (Q4_0 or Q8_0). The block type
    matters for speed on a CPU: llama.cpp repacks 4-bit blocks for kernels
    that process several tokens at once, so a batched step costs less.
    """
    import gguf

    # the destination first: a folder found only at the final rename would cost the whole model's write
    dest = check_output_path(dest, "destination", SyntheticGGUFError)
    reader = _read_source(gguf, source)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        _write(gguf, reader, tmp, dest, shape, body=body, seed=seed)
        check_output_path(dest, "destination", SyntheticGGUFError)  # again: it may have changed meanwhile
        tmp.replace(dest)  # never leave a half-written model under the final name
    except BaseException:  # an error, a full disk or Ctrl-C: no DEST.part is left behind
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _read_source(gguf, source: str | Path):
    """``source`` opened as a gemma3 GGUF with a tokenizer, or one line saying why it is not one."""
    src = Path(source)
    if not src.is_file():
        raise SyntheticGGUFError(f"--source {src}: {'is not a file' if src.exists() else 'no such file'}")
    try:
        reader = gguf.GGUFReader(str(src))
        arch = str(reader.fields["general.architecture"].contents())
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    except OSError as err:
        raise SyntheticGGUFError(f"--source {src}: {os_error_text(err)}") from None
    except (ValueError, KeyError, IndexError, TypeError) as err:  # what the reader raises on a non-GGUF
        raise SyntheticGGUFError(f"--source {src} is not a GGUF model with a tokenizer ({err})") from None
    if arch != "gemma3":
        raise SyntheticGGUFError(f"--source {src}: expected a gemma3 GGUF to copy the tokenizer from, got {arch}")
    if not vocab:
        raise SyntheticGGUFError(f"--source {src} has an empty vocabulary")
    return reader


def _write(gguf, reader, tmp: Path, dest: Path, shape: dict[str, int], *, body: str, seed: int) -> None:
    """The model into ``tmp`` (the caller renames it to ``dest`` once it is whole, or removes it)."""
    arch = str(reader.fields["general.architecture"].contents())
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    w = gguf.GGUFWriter(str(tmp), arch)
    shape_keys = {f"{arch}.{k}" for k in _SHAPE_KEYS}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.name") or key in shape_keys:
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), vtype)
    d, ff, nh, nkv, hd = (
        shape["embedding_length"],
        shape["feed_forward_length"],
        shape["head_count"],
        shape["head_count_kv"],
        shape["key_length"],
    )
    w.add_name(f"random {dest.stem}")
    w.add_uint32(f"{arch}.embedding_length", d)
    w.add_uint32(f"{arch}.block_count", shape["block_count"])
    w.add_uint32(f"{arch}.feed_forward_length", ff)
    w.add_uint32(f"{arch}.attention.head_count", nh)
    w.add_uint32(f"{arch}.attention.head_count_kv", nkv)
    w.add_uint32(f"{arch}.attention.key_length", hd)
    w.add_uint32(f"{arch}.attention.value_length", hd)

    rng = np.random.default_rng(seed)

    def matrix(name: str, rows: int, cols: int, std: float = 0.02, qtype: str = body) -> None:
        w.add_tensor(name, _blocks(rng, qtype, rows, cols, std), raw_dtype=gguf.GGMLQuantizationType[qtype])

    def norm(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    matrix("token_embd.weight", vocab, d, std=1.0 / np.sqrt(d), qtype="Q8_0")
    norm("output_norm.weight", d)
    for i in range(shape["block_count"]):
        b = f"blk.{i}."
        matrix(b + "attn_q.weight", nh * hd, d)
        matrix(b + "attn_k.weight", nkv * hd, d)
        matrix(b + "attn_v.weight", nkv * hd, d)
        matrix(b + "attn_output.weight", d, nh * hd)
        matrix(b + "ffn_gate.weight", ff, d)
        matrix(b + "ffn_up.weight", ff, d)
        matrix(b + "ffn_down.weight", d, ff)
        for n_ in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            norm(b + n_ + ".weight", d)
        norm(b + "attn_q_norm.weight", hd)
        norm(b + "attn_k_norm.weight", hd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dest", help="where to write the GGUF")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gemma-3-1b")
    ap.add_argument("--source", help="gemma3 GGUF to copy the tokenizer from (default: the embedded model)")
    ap.add_argument("--body", choices=sorted(_CODE_STD), default="Q4_0", help="block type of the layers' matrices")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    # every mistake is one line and status 2, before anything is assembled or written (as the other examples)
    if importlib.util.find_spec("gguf") is None:
        ap.exit(2, f"{ap.prog}: error: writing a GGUF needs the gguf package; run: {GGUF_HINT}\n")
    try:
        check_output_path(args.dest, "destination", SyntheticGGUFError)
        source = args.source
        if source is None:
            from personajudge.backends.embedded import default_model_path

            source = default_model_path()
        path = write_synthetic(source, args.dest, SHAPES[args.shape], body=args.body, seed=args.seed)
    except PersonaJudgeError as err:
        ap.exit(2, f"{ap.prog}: error: {err}\n")
    except OSError as err:  # a destination that cannot be written: no permission, a full disk
        ap.exit(2, f"{ap.prog}: error: cannot write {args.dest}: {os_error_text(err)}\n")
    print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB, shape {args.shape}, layers {args.body})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
