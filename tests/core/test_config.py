import pytest

from personajudge.core.config import build_config, load_config_file
from personajudge.core.errors import ConfigError


def test_defaults_are_the_papers():
    c = build_config()
    d = c.decoding
    assert (d.lambda_, d.temperature, d.top_k, d.top_p, d.max_new_tokens) == (4, 0.7, 20, 0.9, 128)
    assert c.method == "persona-judge" and c.backend.name == "llama-cpp"


def test_toml_file_and_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text(
        'method = "persona-judge-base"\npreferences = ["concise", "humor"]\n'
        '[backend]\nname = "toy"\nthreads = 2\n[decoding]\nlambda = 3\ntop_k = 5\nstop = ["\\n\\n"]\n'
    )
    c = build_config(load_config_file(f), **{"decoding.top_k": 7, "decoding.seed": None})
    assert c.method == "persona-judge-base" and c.backend.name == "toy" and c.backend.threads == 2
    assert c.decoding.lambda_ == 3 and c.decoding.top_k == 7 and c.decoding.stop == ["\n\n"]
    assert c.preferences == ["concise", "humor"]


@pytest.mark.parametrize(
    "data, field",
    [
        ({"decoding": {"lambda": 0}}, "decoding.lambda"),
        ({"decoding": {"top_p": 1.5}}, "decoding.top_p"),
        ({"decoding": {"temperature": -1}}, "decoding.temperature"),
        ({"decoding": {"max_new_tokens": 0}}, "decoding.max_new_tokens"),
        ({"decoding": {"stop": [""]}}, "decoding.stop"),
        ({"backend": {"threads": 0}}, "backend.threads"),
        ({"backend": {"nmae": "toy"}}, "backend: unknown setting 'nmae'; did you mean name?"),
        ({"views": [["concise"], []]}, "views"),
        ({"views": [[" "]]}, "views"),
        ({"method": " "}, "method"),
        # lone surrogates reach the tokenizer (a bare UnicodeEncodeError) or invalid-UTF-8 JSON output
        ({"system": "be nice \udcff"}, "system: the system message is not valid Unicode: a lone surrogate U+DCFF"),
        ({"decoding": {"stop": ["ok", "\ud800"]}}, "decoding.stop: stop string 2 is not valid Unicode"),
    ],
)
def test_invalid_values_name_the_field(data, field):
    with pytest.raises(ConfigError) as e:
        build_config(data)
    msg = str(e.value)
    assert field in msg and "\n" not in msg


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("method = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config_file(bad)


def test_an_empty_view_is_named_as_the_views_field():
    with pytest.raises(ConfigError, match=r"^invalid config: views: every view needs at least one preference$"):
        build_config({"views": [["concise"], []]})


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"views": [["concise"], [3]]}, "views: entry [1][0] must be a preference name or description (text) or"),
        ({"preferences": ["concise", None]}, "preferences: entry [1] must be a preference name or description"),
    ],
)
def test_an_entry_that_is_neither_text_nor_a_table_is_named_once(data, says):
    """Not pydantic's message per branch of ``str | dict`` (``views.1.0.str: ...; views.1.0.dict[str,any]: ...``)."""
    with pytest.raises(ConfigError) as err:
        build_config(data)
    assert says in str(err.value) and ".str" not in str(err.value) and "dict[" not in str(err.value), str(err.value)


def test_preference_objects_in_the_config_are_their_tables():
    """``preferences=[Preference(...)]`` worked in a call but the config refused the same object ("must be a
    preference name ... or a preference table"): it is now the table a preferences file would hold, and a
    run with it is the run with that table, token for token."""
    import personajudge as pj

    pirate = pj.Preference(
        name="pirate", description="Talk like a pirate.", weight=2.0, examples=[{"q": "Hi?", "a": "Arr, hi."}]
    )
    table = {
        "name": "pirate",
        "description": "Talk like a pirate.",
        "instruction": "Talk like a pirate.",
        "weight": 2.0,
        "examples": [{"q": "Hi?", "a": "Arr, hi."}],
    }
    given = [pirate, "humor"]
    cfg = build_config({"preferences": given, "views": [[pirate], ["humor"]]})
    assert cfg.preferences == [table, "humor"] and cfg.views == [[table], ["humor"]]
    assert given == [pirate, "humor"]  # the caller's list is left as it was
    base = {"backend": {"name": "toy"}, "encoder": "exemplar", "decoding": {"max_new_tokens": 6, "seed": 3}}
    with pj.PersonaJudge({**base, "preferences": [pirate, "humor"]}) as m:
        with_object = m.generate("hi")
    with pj.PersonaJudge({**base, "preferences": [table, "humor"]}) as m:
        with_table = m.generate("hi")
    assert with_object.tokens == with_table.tokens and with_object.settings == with_table.settings
