"""The README's plugin section runs as written: its backend and encoder are copied out and used."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from typecheck import run_mypy

ROOT = Path(__file__).resolve().parents[2]


def readme_block(first_line: str) -> str:
    """The ```python block of README.md whose first line is ``first_line``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        if block.startswith(first_line + "\n"):
            return block
    raise AssertionError(f"README.md has no python block starting with {first_line!r}")


def write_plugin(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    for name in ("my_backend", "my_encoder", "test_my_backend"):
        (site / f"{name}.py").write_text(readme_block(f"# {name}.py"))
    # an installed distribution: entry points as the README's pyproject.toml snippet declares them
    info = site / "my_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[personajudge]\nbigram = my_backend\npersona_card = my_encoder\n")
    return site


def test_readme_backend_and_encoder_run_from_the_cli(tmp_path):
    site = write_plugin(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("PERSONAJUDGE_PLUGINS", None)
    cmd = [
        sys.executable,
        "-m",
        "personajudge",
        "generate",
        "hello",
        "--backend",
        "bigram",
        "--encoder",
        "persona-card",
        "--prefer",
        "concise",
        "--prefer",
        "humor",
        "--max-new-tokens",
        "16",
        "--seed",
        "2",
        "--json",
        "--show-prompt",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["settings"]["backend"] == "bigram" and out["settings"]["encoder"] == "persona-card"
    assert 0 < len(out["tokens"]) <= 16 and set(out["text"]) <= set("abcdefghijklmnopqrstuvwxyz ")
    assert "# Persona card\n- concise: Be concise" in proc.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "personajudge", "plugins"], capture_output=True, text=True, env=env, timeout=120
    )
    assert "A seeded bigram table over letters (a README example).  [my-plugins 0.1, entry point" in listed.stdout
    bad = subprocess.run(cmd[:-2] + ["--backend-option", "sed=1"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "unknown option(s) for bigram: sed" in bad.stderr


def test_readme_backend_passes_the_conformance_suite(tmp_path):
    site = write_plugin(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(site),
            str(site / "test_my_backend.py"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=site,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    from personajudge.testing import BackendConformance

    n = len([m for m in dir(BackendConformance) if m.startswith("test_")])
    assert re.search(rf"\b{n} passed\b", proc.stdout), proc.stdout[-500:]  # every test ran, none skipped


def test_readme_says_what_the_tokenizer_protocol_says():
    """The protocol's members are all named in the README's plugin section."""
    from personajudge.core.contract import Tokenizer

    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Writing plugins")[1].split("\n## ")[0]
    members = [m for m in vars(Tokenizer) if not m.startswith("_")] + list(Tokenizer.__annotations__)
    assert members and all(f"`{m}" in section for m in set(members)), textwrap.shorten(str(members), 200)


def test_readme_backend_type_checks_against_the_public_protocols(tmp_path):
    """A plugin author who runs mypy on the README's backend gets no error from the project's own types
    (the ``Tokenizer`` protocol's attributes are read-only, so ``chat_template = None`` satisfies it)."""
    import pytest

    pytest.importorskip("mypy")
    site = write_plugin(tmp_path)
    proc = run_mypy([site / "my_backend.py"], tmp_path)  # the package in its installed layout, as `make lint`
    assert proc.returncode == 0 and "Success" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
