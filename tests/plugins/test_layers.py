"""The architecture, checked: imports point one way, and none hides behind a function body.

Layers (a module may import its own layer's package and the layers below it):

    0 personajudge.core
    1 personajudge.backends | personajudge.preferences   (neither imports the other)
    2 personajudge.plugins
    2.5 personajudge.engine (the one owner of a loaded model; imports core only)
    3 personajudge.api
    3.5 personajudge.distributed (Ray replicas of the api; used by batch and evaluation)
    4 personajudge (the package's __init__: the public API re-exported)
    4 personajudge.batch / bench / evaluation / serve / testing
    5 personajudge.cli
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {
    "core": "personajudge.core",
    "backends": "personajudge.backends",
    "preferences": "personajudge.preferences",
    "plugins": "personajudge.plugins",
    "personajudge": "personajudge",
}
LAYERS = [
    ("personajudge.core", 0),
    ("personajudge.backends", 1),
    ("personajudge.preferences", 1),
    ("personajudge.plugins", 2),
    ("personajudge.api", 3),
    ("personajudge.engine", 2.5),
    ("personajudge.batch", 4),
    ("personajudge.bench", 4),
    ("personajudge.evaluation", 4),
    ("personajudge.serve", 4),
    ("personajudge.distributed", 3.5),
    ("personajudge.testing", 4),
    ("personajudge.cli", 5),
    ("personajudge.__main__", 6),
    ("personajudge", 4),
]


def layer(module: str) -> tuple[str, int]:
    for prefix, n in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return prefix, n
    raise AssertionError(f"{module} is in no layer; add it to LAYERS")


def modules():
    for folder, pkg in FOLDERS.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            rel = f.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield f, ".".join([pkg, *parts]), f.name == "__init__.py"


def project_imports(path: Path, module: str, is_pkg: bool):
    """(line, imported module, at module level?) for every import of a project module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body} | {
        id(n)
        for n in ast.walk(tree)
        if isinstance(n, ast.If) and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING"
        for n in n.body
    }
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = base[: len(base) - node.level + 1]
                names = [".".join(stem + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            if name == "personajudge" or name.startswith("personajudge."):
                yield node.lineno, name, id(node) in top


ALL = list(modules())


@pytest.mark.parametrize("path,module,is_pkg", ALL, ids=[m for _, m, _ in ALL])
def test_imports_point_down_and_are_at_module_level(path, module, is_pkg):
    own_prefix, own = layer(module)
    for line, target, at_top in project_imports(path, module, is_pkg):
        where = f"{path.relative_to(ROOT)}:{line} imports {target}"
        assert at_top, f"{where} inside a function: project imports belong at module level"
        prefix, n = layer(target)
        if target == "personajudge" and own > 3:
            continue  # `from personajudge import __version__` from above the API
        assert n < own or prefix == own_prefix, f"{where}: layer {n} ({prefix}) is not below layer {own} ({own_prefix})"


def test_every_folder_has_a_layer():
    assert {layer(m)[0] for _, m, _ in ALL} >= {
        "personajudge.core",
        "personajudge.backends",
        "personajudge.preferences",
        "personajudge.plugins",
        "personajudge.api",
        "personajudge.cli",
        "personajudge.evaluation",
    }
