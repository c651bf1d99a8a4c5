"""Every Python block of the README compiles as a script and uses only names the package exports.

The blocks that need a model run elsewhere (the plugin blocks in tests/plugins/test_readme_plugins.py);
this catches the cheap breakages of all of them: a top-level ``async for`` copied into a script, a
``pj.Name`` that was renamed or never exported."""

import ast
import re
import warnings
from pathlib import Path

import pytest

import personajudge as pj

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_a_readme_python_block_compiles_as_a_script(i):
    compile(BLOCKS[i], f"README.md python block {i}", "exec")  # a SyntaxError fails the test


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_a_readme_python_block_uses_only_exported_names(i):
    tree = ast.parse(BLOCKS[i])
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "pj"
    }
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "personajudge"
        for alias in node.names
    }
    missing = sorted(n for n in used | imported if n not in pj.__all__)
    assert not missing, f"README python block {i} uses personajudge names not in __all__: {missing}"


def test_the_serving_engine_example_runs_persona_judge_without_a_warning(monkeypatch, capsys):
    """The engine block of Serving (stream, astream, submit), run on the toy backend: every call has
    two views, so none is the degenerate single-view run the library warns about (audit readme3 C)."""
    (block,) = [b for b in BLOCKS if "model.astream(" in b and "model.submit(" in b]
    assert '{"backend": {"name": "llama-cpp"}}' in block
    script = block.replace('{"backend": {"name": "llama-cpp"}}', '{"backend": {"name": "toy"}}')
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        exec(compile(script, "README.md engine block", "exec"), {"__name__": "__readme__"})
    ours = [str(w.message) for w in seen if issubclass(w.category, pj.PersonaJudgeWarning)]
    assert not ours, ours
    assert capsys.readouterr().out.strip()  # it printed the three texts
