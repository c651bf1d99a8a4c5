"""What the hf backend says when a model cannot be loaded, and what it checks before loading one.

A user's mistake (a damaged file, an option that cannot work, a device this
machine lacks, a path they cannot read, a FIFO) is one line naming what is
wrong, raised as a :class:`PersonaJudgeError` (exit status 2 at the CLI),
never a traceback; mistakes in the options alone are found before any weights
load (shown by giving a model path that does not exist: the option error must
come first). A load prints no progress bar: stderr carries the one line of
stats.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_hf import build_tiny  # noqa: E402  (tests/helpers)

from personajudge.api import PersonaJudge  # noqa: E402
from personajudge.backends.hf import HFBackend, HFOptions  # noqa: E402
from personajudge.cli import main  # noqa: E402
from personajudge.core.config import BackendConfig, take_options  # noqa: E402
from personajudge.core.errors import ConfigError, DeviceError, ModelLoadError, PersonaJudgeWarning  # noqa: E402

pytestmark = pytest.mark.hf

MISSING = "/nonexistent/persona-judge-model"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny-loading") / "llama", "llama")


def load(model: str, **kw) -> HFBackend:
    return HFBackend(BackendConfig(name="hf", model=model, **kw))


def one_line_exit_2(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------- damaged weights (item 2)


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    """A well-formed GGUF (metadata and one tensor) written by the gguf package, as bytes."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path_factory.mktemp("gguf") / "whole.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_tensor("token_embd.weight", np.ones((8, 16), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.mark.parametrize("cut", [0, 8, 30, "metadata", "data"])
def test_a_truncated_gguf_is_a_model_load_error_naming_the_file(small_gguf, tmp_path, cut):
    """Cut inside the header (struct.error from the GGUF reader), the metadata, or the tensor data."""
    n = {"metadata": len(small_gguf) // 4, "data": len(small_gguf) - 64}.get(cut, cut)
    f = tmp_path / "cut.gguf"
    f.write_bytes(small_gguf[:n])
    with pytest.raises(ModelLoadError) as info:
        load(str(f))
    msg = str(info.value)
    assert f"cannot load model '{f}'" in msg and "\n" not in msg  # the file, not its folder


def test_a_truncated_gguf_at_the_cli_exits_2_with_the_reader_error(small_gguf, tmp_path, capsys):
    f = tmp_path / "t.gguf"
    f.write_bytes(small_gguf[:8])  # magic and version: the reader's struct.unpack runs out of bytes
    err = one_line_exit_2(["generate", "hi", "--backend", "hf", "--model", str(f)], capsys)
    assert str(f) in err and "struct.error" in err


def damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "head":
        path.write_bytes(data[:5000])
    elif how == "tail":
        path.write_bytes(data[:-1000])
    else:
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))


@pytest.mark.parametrize("how", ["head", "tail", "random"])
def test_a_damaged_safetensors_file_is_a_model_load_error_naming_it(llama, tmp_path, how):
    folder = tmp_path / "m"
    shutil.copytree(llama, folder)
    damage(folder / "model.safetensors", how)
    with pytest.raises(ModelLoadError, match="SafetensorError") as info:
        load(str(folder))
    assert f"cannot load model '{folder / 'model.safetensors'}'" in str(info.value)


def test_a_config_with_a_value_of_the_wrong_type_is_a_model_load_error(llama, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(llama, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = "two"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="num_hidden_layers"):
        load(str(folder))


# ----------------------------------------------------------------------------- compile (item 3)


def test_an_unknown_compile_backend_is_refused_before_loading():
    with pytest.raises(ConfigError, match="compile_backend: not a torch.compile backend.*inductor.*got 'nope'"):
        load(MISSING, options={"compile": True, "compile_backend": "nope"})


@pytest.mark.parametrize("name", ["inductor", "eager", "aot_eager", "cudagraphs"])
def test_the_compile_backends_torch_registers_are_accepted(name):
    assert take_options({"compile_backend": name}, HFOptions)["compile_backend"] == name


def test_torch_compile_raising_falls_back_to_eager_with_one_warning(llama, monkeypatch):
    """``torch.compile`` itself failing (not the first compiled call) loads the model and runs eager."""
    cfg = {"backend": {"name": "hf"}, "preferences": ["concise", "humor"]}
    options = {"compile": True, "compile_backend": "eager", "max_cache_len": 256}
    with PersonaJudge(cfg, backend=load(llama, options={"cache_implementation": "static", "max_cache_len": 256})) as pj:
        want = [r.tokens for r in pj.generate_batch(["hi", "Name a fruit."], max_new_tokens=12, seed=3)]

    def refuse(*args, **kwargs):
        raise RuntimeError("this torch cannot\ncompile")

    monkeypatch.setattr(torch, "compile", refuse)
    with pytest.warns(PersonaJudgeWarning) as caught:
        backend = load(llama, options=options)
    assert [str(w.message) for w in caught if w.category is PersonaJudgeWarning] == [
        "hf backend: torch.compile failed, running eager: RuntimeError: this torch cannot compile"
    ]
    assert backend.describe()["compile"] == "failed, eager (RuntimeError: this torch cannot compile)"
    assert backend.compile_fallback == "RuntimeError: this torch cannot compile"
    with PersonaJudge(cfg, backend=backend) as pj:
        with pytest.warns(PersonaJudgeWarning, match="compiling the judge failed, running eager"):
            got = [r.tokens for r in pj.generate_batch(["hi", "Name a fruit."], max_new_tokens=12, seed=3)]
        with warnings.catch_warnings():
            warnings.simplefilter("error", PersonaJudgeWarning)  # each fallback warned once
            again = [r.tokens for r in pj.generate_batch(["hi", "Name a fruit."], max_new_tokens=12, seed=3)]
    assert got == want == again


# ----------------------------------------------------------------------------- devices (item 4)


@pytest.mark.parametrize("device", ["mps", "xpu", "xpu:1"])
def test_an_unavailable_device_is_a_device_error_before_loading(device):
    kind = device.split(":")[0]
    if getattr(torch, kind).is_available():
        pytest.skip(f"this machine has {kind}")
    with pytest.raises(DeviceError, match=rf"'{device}' requested but {kind.upper()} is not available.*--device cpu"):
        load(MISSING, device=device)


def test_an_unavailable_device_at_the_cli_exits_2(capsys):
    if torch.xpu.is_available():
        pytest.skip("this machine has xpu")
    err = one_line_exit_2(["generate", "hi", "--backend", "hf", "--model", MISSING, "--device", "xpu"], capsys)
    assert "XPU is not available" in err


def test_a_device_torch_does_not_know_is_a_config_error():
    with pytest.raises(ConfigError, match="backend.device"):
        load(MISSING, device="gpu7")


# ----------------------------------------------------------------------------- permissions (item 5)


PROBE = """
import json, sys
from personajudge.backends.hf import HFBackend
from personajudge.core.config import BackendConfig
for model in sys.argv[1:]:
    try:
        HFBackend(BackendConfig(name="hf", model=model))
        print(json.dumps(["loaded", model]))
    except Exception as err:
        print(json.dumps([type(err).__name__, str(err)]))
"""


def test_a_model_in_a_folder_the_user_cannot_enter_is_a_model_load_error(llama, tmp_path):
    """As root, drop the capabilities that bypass file permissions (setpriv), so chmod 000 bites."""
    cmd = [sys.executable, "-c", PROBE]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root needs setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
        caps = "-dac_override,-dac_read_search"
        cmd = [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}", "--", *cmd]
    locked = tmp_path / "locked"
    shutil.copytree(llama, locked / "m")
    paths = [locked, locked / "m", locked / "m.gguf"]
    locked.chmod(0)
    try:
        out = subprocess.run(cmd + [str(p) for p in paths], capture_output=True, text=True, timeout=300)
    finally:
        locked.chmod(0o755)
    assert out.returncode == 0, out.stderr
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(results) == 3, out.stdout + out.stderr
    for p, (kind, msg) in zip(paths, results):
        assert kind == "ModelLoadError", msg
        assert f"cannot access model path {p}: permission denied" in msg and "check the permissions" in msg


def test_permission_errors_from_path_checks_are_model_load_errors(tmp_path, monkeypatch):
    """The same without a subprocess: whatever ``stat`` raises for the path is one line."""
    from pathlib import Path

    target = tmp_path / "model.gguf"
    real = Path.stat

    def stat(self, *a, **k):
        if self == target:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(ModelLoadError, match=f"cannot access model path {target}: permission denied"):
        load(str(target))


# ----------------------------------------------------------------------------- options (item 6)


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"max_cache_len": 64}, 'max_cache_len needs cache_implementation="static"'),
        ({"compile": True, "device_map": "auto"}, "drop device_map"),
        ({"cache_implementation": "static", "device_map": "auto"}, "drop device_map"),
    ],
)
def test_static_option_mistakes_are_found_before_loading(options, needle):
    with pytest.raises(ConfigError, match=needle):
        take_options(options, HFOptions)
    with pytest.raises(ConfigError, match=needle):  # not "model path not found": the options come first
        load(MISSING, options=options)


@pytest.mark.parametrize(
    "options",
    [{"compile": True, "max_cache_len": 64}, {"cache_implementation": "static", "max_cache_len": 64}, {}],
)
def test_static_options_that_go_together_pass(options):
    take_options(options, HFOptions)


# ----------------------------------------------------------------------------- not a file (item 9)


@pytest.fixture
def fifo_guard():
    """Open each FIFO's writing end after a while, so a loader that reads one fails instead of hanging."""
    timers = []

    def guard(path):
        def release():
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass  # no reader waiting: nothing to release

        t = threading.Timer(30, release)
        t.start()
        timers.append(t)
        return path

    yield guard
    for t in timers:
        t.cancel()


@pytest.mark.parametrize("name", ["model.gguf", "model"])
def test_a_fifo_is_not_a_model(tmp_path, fifo_guard, name):
    f = fifo_guard(tmp_path / name)
    os.mkfifo(f)
    with pytest.raises(ModelLoadError, match=f"model path {f} is not a regular file or folder"):
        load(str(f))


def test_a_fifo_gguf_file_in_a_folder_is_not_found(tmp_path, fifo_guard):
    os.mkfifo(fifo_guard(tmp_path / "w.gguf"))
    with pytest.raises(ModelLoadError, match="GGUF file 'w.gguf' not found"):
        load(str(tmp_path), options={"gguf_file": "w.gguf"})


def test_a_fifo_among_a_model_folders_files_is_refused_before_transformers_blocks_on_it(llama, tmp_path, fifo_guard):
    folder = tmp_path / "model"
    shutil.copytree(llama, folder)
    (folder / "tokenizer.json").unlink()
    os.mkfifo(fifo_guard(folder / "tokenizer.json"))
    with pytest.raises(ModelLoadError, match=r"holds tokenizer\.json, not a regular file .*would block"):
        load(str(folder))


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
def test_a_device_file_at_the_cli_exits_2(capsys):
    err = one_line_exit_2(["generate", "hi", "--backend", "hf", "--model", "/dev/null"], capsys)
    assert "/dev/null is not a regular file or folder" in err


# ----------------------------------------------------------------------------- progress bars (item 10)


def test_loading_prints_no_progress_bar(llama, capfd):
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    hub_before = are_progress_bars_disabled()
    hf_logging.enable_progress_bar()
    for _ in hf_logging.tqdm(range(3), desc="Loading weights"):  # control: a bar reaches this capture
        pass
    assert "Loading weights" in capfd.readouterr().err
    load(llama, device="cpu")
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # put back as found
    assert are_progress_bars_disabled() == hub_before
