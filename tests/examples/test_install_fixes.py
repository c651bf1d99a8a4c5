"""A new user's first hour: install extras, the wheel build, and the examples' handling of mistakes.

Each test here failed before its fix (audit "install", findings A-F): bench-serve with only the ``serve``
extra, the setuptools floor, a stale ``build/lib`` in the wheel, ``examples/synthetic_gguf.py``'s
tracebacks and leftover ``DEST.part``, plots lost without matplotlib, and ``demo.py --threads 0``.
"""

from __future__ import annotations

import ast
import errno
import importlib.util
import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from personajudge.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _extra(name: str) -> set[str]:
    return {Requirement(r).name.lower().replace("_", "-") for r in PYPROJECT["project"]["optional-dependencies"][name]}


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


# -- A: bench-serve with the serve extra -----------------------------------------------------------


def test_bench_serve_without_httpx_is_one_line_before_any_work(monkeypatch, capsys):
    """httpx missing: the install hint and exit 2 before the direct row runs or a server starts."""
    import personajudge.cli.serve as serve_cli

    monkeypatch.setitem(sys.modules, "httpx", None)  # find_spec and import both see it as not installed
    calls: list[object] = []
    monkeypatch.setattr(serve_cli, "run_bench_serve", lambda *a, **k: calls.append(k))
    argv = ["bench-serve", "--backend", "toy", "--prefer", "concise", "--prefer", "humor", "--requests", "1"]
    assert main([*argv, "--concurrency", "1", "--max-tokens", "2"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "httpx" in line and '".[serve]"' in line
    assert calls == []  # no bench work began


def _third_party_imports(path: Path) -> set[str]:
    """Top-level names of every import in ``path`` (module level and in functions) outside the stdlib."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "personajudge"}


def test_the_serve_extra_installs_what_bench_serve_imports():
    """Every third-party module bench-serve's client imports is checked up front and in ``[serve]``."""
    import personajudge.cli.serve as serve_cli

    core = {Requirement(r).name.lower() for r in PYPROJECT["project"]["dependencies"]}
    needed = _third_party_imports(ROOT / "personajudge" / "serve" / "bench.py") - core
    assert "httpx" in needed  # the client; if bench.py stops using it this test must be revisited
    assert needed <= set(serve_cli.BENCH_SERVE_MODULES)
    assert {m.replace("_", "-") for m in serve_cli.BENCH_SERVE_MODULES} <= _extra("serve")


# -- B: the setuptools floor -----------------------------------------------------------------------


def test_the_setuptools_floor_reads_a_pep639_license():
    """``license = "MIT"`` (a string: a PEP 639 expression) is read by setuptools 77 and later only;
    76 stops with "project.license must be valid exactly by one definition". The declared floor
    matters where pip does not fetch the newest (``--no-build-isolation``, as ``make test-wheel``)."""
    assert isinstance(PYPROJECT["project"]["license"], str)
    (req,) = [Requirement(r) for r in PYPROJECT["build-system"]["requires"] if Requirement(r).name == "setuptools"]
    spec = SpecifierSet(str(req.specifier))
    assert not spec.contains("76.1.0") and spec.contains("77.0.3")


# -- C: the wheel is built from a clean state -------------------------------------------------------

_MAPPED = {"personajudge": "personajudge", "core": "personajudge/core", "backends": "personajudge/backends"}
_MAPPED |= {"preferences": "personajudge/preferences", "plugins": "personajudge/plugins"}


def test_make_wheel_ships_the_tree_not_a_stale_build_lib(tmp_path):
    """A module left in ``build/lib`` by an earlier build (deleted from the tree since) is not in the
    wheel ``make wheel`` builds (what ``make test-wheel`` installs), and every module of the tree is."""
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md", "Makefile"):
        shutil.copy2(ROOT / name, src / name)
    for folder in _MAPPED:
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    stale = src / "build" / "lib" / "personajudge" / "zz_stale.py"  # as a build before its deletion left it
    stale.parent.mkdir(parents=True)
    stale.write_text("X = 1\n")
    venv = tmp_path / "venv"  # `install` is up to date: the Makefile's marker, newer than its inputs
    venv.mkdir()
    (venv / ".installed").touch()
    dist = tmp_path / "dist"
    proc = subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(src),
            "wheel",
            f"VENV={venv}",
            f"BIN={Path(sys.executable).parent}",
            f"WHEEL_DIR={dist}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = dist.glob("persona_judge-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    tree = {
        f"{_MAPPED[folder]}/{p.relative_to(src / folder).as_posix()}"
        for folder in _MAPPED
        for p in (src / folder).rglob("*.py")
    }
    assert "personajudge/zz_stale.py" not in shipped
    assert shipped == tree


# -- D: examples/synthetic_gguf.py -----------------------------------------------------------------

SYNTH = EXAMPLES / "synthetic_gguf.py"


def _source_gguf(path: Path, arch: str = "gemma3", vocab: int = 32) -> Path:
    """A small GGUF with a tokenizer and no tensors: all the script copies from a source."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"tok{i}" for i in range(vocab)])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _synth(*args: str, pre: str = "pass") -> subprocess.CompletedProcess[str]:
    code = f"import runpy, sys; {pre}; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    return subprocess.run(
        [sys.executable, "-c", code, str(SYNTH), *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def test_synthetic_gguf_writes_the_tiny_shape_from_a_source(tmp_path):
    gguf = pytest.importorskip("gguf")
    dest = tmp_path / "out" / "tiny.gguf"
    proc = _synth("--shape", "tiny", "--source", str(_source_gguf(tmp_path / "src.gguf")), str(dest))
    assert proc.returncode == 0, proc.stderr[-2000:]
    fields = gguf.GGUFReader(str(dest)).fields
    assert fields["gemma3.block_count"].contents() == 2 and len(fields["tokenizer.ggml.tokens"].data) == 32
    assert not list(dest.parent.glob("*.part"))


def test_synthetic_gguf_refuses_a_folder_before_writing(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    proc = _synth("--shape", "tiny", "--source", str(_source_gguf(tmp_path / "src.gguf")), str(folder))
    assert proc.returncode == 2
    assert "is a directory" in _one_error_line(proc.stderr)
    assert not list(tmp_path.glob("*.part")) and not any(folder.iterdir())


@pytest.mark.parametrize("kind", ["missing", "folder", "not-gguf", "other-arch"])
def test_synthetic_gguf_bad_source_is_one_line(tmp_path, kind):
    pytest.importorskip("gguf")
    source = {
        "missing": tmp_path / "nope.gguf",
        "folder": tmp_path,
        "not-gguf": tmp_path / "hostname",
        "other-arch": tmp_path / "llama.gguf",
    }[kind]
    if kind == "not-gguf":
        source.write_text("my-host\n")
    elif kind == "other-arch":
        _source_gguf(source, arch="llama")
    dest = tmp_path / "x.gguf"
    proc = _synth("--shape", "tiny", "--source", str(source), str(dest))
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert "--source" in line and str(source) in line
    assert not dest.exists() and not list(tmp_path.glob("*.part"))


def test_synthetic_gguf_without_gguf_names_the_extra(tmp_path):
    proc = _synth("--shape", "tiny", str(tmp_path / "x.gguf"), pre="sys.modules['gguf'] = None")
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert "gguf" in line and '".[hf]"' in line
    assert not list(tmp_path.iterdir())


def test_synthetic_gguf_leaves_no_part_file_when_the_write_fails(tmp_path, monkeypatch, capsys):
    """A full disk while writing: one line, exit 2, and neither DEST nor DEST.part left behind."""
    gguf = pytest.importorskip("gguf")
    spec = importlib.util.spec_from_file_location("synthetic_gguf_under_test", SYNTH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    source = _source_gguf(tmp_path / "src.gguf")
    write = gguf.GGUFWriter.write_tensors_to_file

    def full_disk(self, *args, **kwargs):
        write(self, *args, **kwargs)  # the .part file holds the data by now
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    dest = tmp_path / "x.gguf"
    with pytest.raises(SystemExit) as exc:
        mod.main(["--shape", "tiny", "--source", str(source), str(dest)])
    assert exc.value.code == 2
    assert "No space left on device" in _one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.gguf"]


# -- E: reports without matplotlib ----------------------------------------------------------------

EVAL = ["eval", "--backend", "toy", "--limit", "2", "--max-new-tokens", "4", "--scorers", "length", "-q"]


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("personajudge: warning:")]


def test_report_without_matplotlib_warns_and_keeps_the_earlier_plots(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    assert main([*EVAL, "--run-dir", str(run)]) == 0
    pngs = {p.name: p.read_bytes() for p in run.glob("*.png")}
    assert set(pngs) == {"winrate.png", "scores.png"}
    capsys.readouterr()

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as in a venv without the eval extra
    assert main(["report", str(run)]) == 0
    (warning,) = _warnings(capsys.readouterr().err)
    assert "plots skipped" in warning and "matplotlib" in warning and '".[eval]"' in warning
    assert "winrate.png" in warning and "kept" in warning
    assert {p.name: p.read_bytes() for p in run.glob("*.png")} == pngs  # not deleted
    rep = json.loads((run / "report.json").read_text())
    assert rep["plots"] == {} and set(rep["plots_kept"].values()) == set(pngs) and "matplotlib" in rep["plots_skipped"]
    assert "matplotlib is not installed" in (run / "report.md").read_text()

    monkeypatch.delitem(sys.modules, "matplotlib.figure")  # installed again: drawn, and no longer "kept"
    assert main(["report", str(run)]) == 0
    rep = json.loads((run / "report.json").read_text())
    assert set(rep["plots"].values()) == set(pngs) and "plots_kept" not in rep and "plots_skipped" not in rep
    assert _warnings(capsys.readouterr().err) == []


def test_eval_without_matplotlib_says_the_plots_were_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    run = tmp_path / "run"
    assert main([*EVAL, "--run-dir", str(run)]) == 0
    (warning,) = _warnings(capsys.readouterr().err)
    assert "plots skipped" in warning and '".[eval]"' in warning and "kept" not in warning  # nothing earlier
    assert not list(run.glob("*.png"))
    assert "None drawn: matplotlib is not installed" in (run / "report.md").read_text()


# -- F: demo.py --threads 0 ------------------------------------------------------------------------


def test_demo_refuses_threads_0_as_the_cli_does(capsys):
    """Both go through RunConfig's ``backend.threads`` check: the same reason, exit 2, one line."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "demo.py"), "--backend", "toy", "--threads", "0", "--max-new-tokens", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    demo = _one_error_line(proc.stderr)
    assert main(["generate", "hi", "--backend", "toy", "--threads", "0"]) == 2
    cli = _one_error_line(capsys.readouterr().err)
    reason = cli.split("backend.threads:", 1)[1]
    assert "backend.threads:" in demo and demo.split("backend.threads:", 1)[1] == reason


# -- G: a venv whose ensurepip fails ----------------------------------------------------------------


def test_make_venv_retries_when_venvs_ensurepip_fails(tmp_path):
    """CI once stopped at ``python3 -m venv .venv`` ("ensurepip ... exit status 1", venv hides the rest):
    the Makefile's ``make-venv`` (used by ``install`` and ``test-wheel``) then makes the venv without pip
    and runs ensurepip where its output shows, ending with a venv that has pip."""
    fake = tmp_path / "python"  # a Python whose `-m venv DIR` fails as venv's captured ensurepip did
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1 $2" = "-m venv" ] && [ "$3" != "--without-pip" ]; then\n'
        "  echo 'Error: ensurepip returned non-zero exit status 1' >&2; exit 1\n"
        "fi\n"
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    extra = tmp_path / "venv.mk"
    extra.write_text("venv-only:\n\t$(call make-venv,$(DEST))\n")
    dest = tmp_path / "venv"
    proc = subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(ROOT),
            "-f",
            "Makefile",
            "-f",
            str(extra),
            "venv-only",
            f"PYTHON={fake}",
            f"DEST={dest}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "venv's ensurepip failed; retrying it with its output shown" in proc.stderr
    pip = subprocess.run([str(dest / "bin" / "python"), "-m", "pip", "--version"], capture_output=True, text=True)
    assert pip.returncode == 0 and str(dest) in pip.stdout, pip.stdout + pip.stderr
