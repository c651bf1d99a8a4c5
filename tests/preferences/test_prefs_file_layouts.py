"""One preferences-file layout for every format: TOML keeps the list under ``preferences``; a JSON or
YAML file may be the list itself or hold it under ``preferences`` too, so a user who writes the TOML
layout in JSON (``{"preferences": [...]}``) is not told the file holds no preferences."""

import json

import pytest

from personajudge.core.errors import PreferenceError
from personajudge.preferences import load_file

ENTRIES = [{"name": "pirate", "description": "Talk like a pirate"}, "humor"]


def _write(tmp_path, name, data):
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps(data), encoding="utf-8")
    else:
        yaml = pytest.importorskip("yaml")
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["p.json", "p.yaml"])
@pytest.mark.parametrize("layout", ["list", "object"])
def test_json_and_yaml_take_the_list_itself_or_under_preferences(tmp_path, name, layout):
    path = _write(tmp_path, name, ENTRIES if layout == "list" else {"preferences": ENTRIES})
    prefs = load_file(path)
    assert [p.name for p in prefs] == ["pirate", "humor"]
    assert prefs[0].description == "Talk like a pirate"


@pytest.mark.parametrize("data", [{"prefs": ENTRIES}, {"preferences": []}, {"preferences": "humor"}, 3])
def test_an_object_without_a_list_under_preferences_says_both_layouts(tmp_path, data):
    with pytest.raises(PreferenceError, match="non-empty list of preferences, or an object with one under"):
        load_file(_write(tmp_path, "p.json", data))


def test_toml_still_needs_the_key(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('preferences = ["humor"]\n', encoding="utf-8")
    assert [p.name for p in load_file(path)] == ["humor"]
    path.write_text('other = ["humor"]\n', encoding="utf-8")
    with pytest.raises(PreferenceError, match="under the key 'preferences'$"):
        load_file(path)


def test_python_leaves_out_the_instruction_as_a_file_table_does(tmp_path):
    """``Preference(name=..., description=...)`` was a ``PreferenceError`` (instruction: Field required)
    where the same table in a file took the description as its instruction."""
    from personajudge import Preference

    made = Preference(name="pirate", description="Talk like a pirate")
    from_file = load_file(_write(tmp_path, "p.json", ENTRIES[:1]))[0]
    assert made.instruction == from_file.instruction == "Talk like a pirate"
    assert made.definition() == from_file.definition()
    assert Preference(name="pirate", description="Talk like a pirate", instruction="Arr!").instruction == "Arr!"
    with pytest.raises(PreferenceError, match="description: Field required"):
        Preference(name="pirate")
