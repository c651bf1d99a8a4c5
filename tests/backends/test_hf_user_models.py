"""The hf backend on a user's own model folder that is slightly off (audit findings A-G).

Each folder is the tiny random Llama of the other hf tests with one thing
changed the way users' folders differ from a hub model's: a pad token added
to the tokenizer without resizing the model, tokens added for a chat
template, weights missing, a small maximum context, no tokenizer files. Each
must either run as it should or fail with one line saying what is wrong and
what to do, never a traceback, a contract-level message or random weights.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from serve_helpers import running_server  # noqa: E402  (tests/helpers)
from tiny_hf import build_tiny  # noqa: E402

from personajudge.api import PersonaJudge  # noqa: E402
from personajudge.backends.hf import HFBackend  # noqa: E402
from personajudge.cli import main  # noqa: E402
from personajudge.core.config import BackendConfig  # noqa: E402
from personajudge.core.errors import (  # noqa: E402
    ContextLengthError,
    ModelLoadError,
    PersonaJudgeWarning,
    PromptTokenError,
)
from personajudge.testing.tokenizers import char_tokenizer  # noqa: E402

pytestmark = pytest.mark.hf

PREFS = ["concise", "humor"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("user-models") / "llama", "llama")


def variant(llama: str, tmp_path, name: str, tok=None):
    """A copy of the tiny Llama folder, its tokenizer replaced by ``tok`` when given."""
    d = tmp_path / name
    shutil.copytree(llama, d)
    if tok is not None:
        tok.save_pretrained(d)
    return d


def quiet_pj(model, **cfg) -> PersonaJudge:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PersonaJudgeWarning)
        return PersonaJudge(
            {"backend": {"name": "hf", "model": str(model), "device": "cpu", **cfg}, "preferences": PREFS}
        )


def one_line_exit_2(argv, capfd) -> str:
    code = main(argv)
    err = capfd.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------- A: pad id past the embedding


def test_a_pad_token_past_the_embedding_runs_padded_steps_like_an_in_range_pad(llama, tmp_path):
    """``add_special_tokens({"pad_token": "[PAD]"})`` without resizing gives pad id 256 on a 256-row
    model. The pad id only fills positions no row reads, so the runs must equal those on the same
    weights with the tokenizer's in-range pad: the two views' prompts differ in length (the first
    step is padded), and a two-prompt base batch pads the shorter row on every step."""
    tok = char_tokenizer(256)
    tok.add_special_tokens({"pad_token": "[PAD]"})
    assert tok.pad_token_id == 256
    addpad = variant(llama, tmp_path, "addpad", tok)
    kw = dict(seed=1, max_new_tokens=8, temperature=0.7)
    prompts = ["Why?", "Tell me a long story about an owl and a fox"]
    with quiet_pj(llama) as ok, quiet_pj(addpad) as padded, warnings.catch_warnings():
        warnings.simplefilter("ignore", PersonaJudgeWarning)  # base ignores the preferences
        want = ok.generate("Why is the sky blue?", **kw)
        got = padded.generate("Why is the sky blue?", **kw)
        assert got.stats.drafted > 0 and got.tokens == want.tokens
        rows = padded.generate_batch(prompts, method="base", **kw)
        assert [r.tokens for r in rows] == [r.tokens for r in ok.generate_batch(prompts, method="base", **kw)]
        assert 0 <= padded.backend.pad_token_id < padded.backend.tokenizer.vocab_size


# ----------------------------------------------------------------------------- B: missing weights


def test_b_a_checkpoint_missing_tensors_is_a_model_load_error_naming_them(llama, tmp_path, capfd):
    from safetensors.torch import load_file, save_file

    d = variant(llama, tmp_path, "missingw")
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.weight"], sd["model.norm.weight"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lacks 2 weight tensor\(s\)") as e:
        HFBackend(BackendConfig(name="hf", model=str(d)))
    assert "model.norm.weight" in str(e.value) and "model.layers.1.mlp.down_proj.weight" in str(e.value)
    assert str(d) in str(e.value) and "\n" not in str(e.value)
    capfd.readouterr()
    err = one_line_exit_2(["generate", "hi", "--backend", "hf", "--model", str(d), "-q"], capfd)
    assert "model.norm.weight" in err and "LOAD REPORT" not in err  # transformers' table kept off stderr


def test_b_an_encoder_checkpoint_loaded_as_a_causal_lm_is_refused(tmp_path):
    """A BERT encoder folder gets a randomly initialised LM head from AutoModelForCausalLM."""
    from transformers import BertConfig, BertModel

    d = tmp_path / "bert"
    cfg = BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    BertModel(cfg).save_pretrained(d)
    char_tokenizer(256).save_pretrained(d)
    with pytest.raises(ModelLoadError, match=r"lacks \d+ weight tensor\(s\) that BertLMHeadModel needs \(cls\."):
        HFBackend(BackendConfig(name="hf", model=str(d)))


def test_b_a_tensor_of_the_wrong_shape_is_named(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    d = variant(llama, tmp_path, "badshape")
    sd = load_file(d / "model.safetensors")
    sd["model.norm.weight"] = torch.ones(32)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"model\.norm\.weight: \(32,\) in the checkpoint, \(64,\) in the model"):
        HFBackend(BackendConfig(name="hf", model=str(d)))


def test_b_tied_and_complete_checkpoints_still_load(tmp_path):
    """The tiny Gemma 3 ties its LM head to the embedding (no ``lm_head.weight`` in the file): that is
    not a missing tensor, and loading it twice gives the same weights (none random)."""
    d = build_tiny(tmp_path / "gemma3", "gemma3")
    assert "lm_head.weight" not in json.dumps(list(_tensor_names(d)))
    a, b = (HFBackend(BackendConfig(name="hf", model=d)) for _ in range(2))
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name


def _tensor_names(folder):
    from safetensors import safe_open

    with safe_open(f"{folder}/model.safetensors", framework="pt") as f:
        return list(f.keys())


# ----------------------------------------------------------------------------- C: tokens past the embedding


@pytest.fixture(scope="module")
def addedtok(llama, tmp_path_factory):
    """ChatML special tokens added to the tokenizer (ids 256, 257) and used by its template; model not resized."""
    tok = char_tokenizer(256)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return variant(llama, tmp_path_factory.mktemp("addedtok"), "addedtok", tok)


def test_c_the_load_warns_once_naming_the_tokens_and_the_remedy(addedtok):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        HFBackend(BackendConfig(name="hf", model=str(addedtok))).close()
    ours = [str(x.message) for x in w if issubclass(x.category, PersonaJudgeWarning)]
    assert len(ours) == 1, ours
    assert "2 token id(s) past the model's 256 embedding rows" in ours[0]
    assert "'<|im_start|>', '<|im_end|>'" in ours[0] and "resize_token_embeddings" in ours[0]


def test_c_a_prompt_with_such_a_token_is_a_prompt_token_error_naming_it(addedtok):
    with quiet_pj(addedtok) as pj:
        with pytest.raises(PromptTokenError, match=r"token '<\|im_start\|>' \(id 256\).*no embedding"):
            pj.generate([{"role": "user", "content": "hi"}], seed=1, max_new_tokens=4)  # the template's token
        # the user's own "<|im_end|>" is text, not the token (special-token text in user input stays text)
        rows = pj.generate_batch(["hi", "a <|im_end|> b"], encoder="plain", seed=1, max_new_tokens=4)
        assert all(r.tokens for r in rows)
        assert pj.generate("hi", encoder="plain", seed=1, max_new_tokens=4).tokens  # prompts without it run


def test_c_a_jsonl_row_with_such_a_tokens_text_runs_it_as_text(addedtok, tmp_path, capfd):
    """A row's "<|im_start|>" is the user's text, encoded as text (not the token past the embedding)."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"prompt": "hello"}) + "\n" + json.dumps({"prompt": "x <|im_start|> y"}) + "\n")
    argv = ["generate", "--input", str(inp), "--output", str(out), "--backend", "hf", "--model", str(addedtok)]
    argv += ["--encoder", "plain", "--prefer", "concise", "--prefer", "humor", "--max-new-tokens", "4", "-q"]
    assert main(argv) == 0
    lines = capfd.readouterr().err.strip().splitlines()
    assert [x.split(":")[1] for x in lines] == [" warning"], lines  # the load's warning only
    assert len(out.read_text().splitlines()) == 2


def test_c_the_server_answers_400_naming_the_prompt_field(addedtok, tmp_path):
    import httpx

    flags = ["--backend", "hf", "--model", str(addedtok), "--device", "cpu", "--threads", "1"]
    flags += ["--prefer", "concise", "--prefer", "humor"]
    with running_server(flags, tmp_path / "server.log") as (base, _):
        body = {"model": "persona-judge", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "messages" and err["code"] == "invalid_value" and "<|im_start|>" in err["message"]
        with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as s:
            assert s.status_code == 400  # before the stream starts
        r = httpx.post(base + "/v1/completions", json={"model": "persona-judge", "prompt": "<|im_end|>"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


# ----------------------------------------------------------------------------- D: the model's own maximum context


def test_d_a_prompt_past_the_models_maximum_is_not_told_to_raise_n_ctx(llama, tmp_path):
    d = variant(llama, tmp_path, "ctx32")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 32}))
    long = "Why is the sky blue? " * 3
    with quiet_pj(d) as pj, pytest.raises(ContextLengthError) as e:
        pj.generate(long, max_new_tokens=4)
    assert "the model holds at most 32 positions; shorten the prompt" in str(e.value)
    assert "--n-ctx" not in str(e.value)
    with quiet_pj(d, n_ctx=16) as pj, pytest.raises(ContextLengthError, match=r"\(--n-ctx, up to 32\)"):
        pj.generate(long, max_new_tokens=4)  # below the maximum a larger --n-ctx does help


# ----------------------------------------------------------------------------- E: no tokenizer files


def test_e_a_folder_without_tokenizer_files_says_so(llama, tmp_path, capfd):
    d = tmp_path / "notok"
    d.mkdir()
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(f"{llama}/{f}", d)
    with pytest.raises(ModelLoadError, match=r"has no tokenizer \(no tokenizer\.json, tokenizer_config\.json"):
        HFBackend(BackendConfig(name="hf", model=str(d)))
    err = one_line_exit_2(["generate", "hi", "--backend", "hf", "--model", str(d)], capfd)
    assert str(d) in err and "sentencepiece" not in err


# ----------------------------------------------------------------------------- G: greedy native_generate


def test_g_greedy_native_generate_prints_no_generation_flag_notice(llama):
    """A fresh interpreter (transformers logs the notice once per process), the model's own
    generation_config carrying sampling fields as hub models' do; greedy output must still be
    transformers' greedy decoding (the first token is the argmax of a full forward)."""
    code = (
        "import torch\n"
        "from personajudge.backends.hf import HFBackend\n"
        "from personajudge.core.config import BackendConfig\n"
        f"b = HFBackend(BackendConfig(name='hf', model={llama!r}, threads=1))\n"
        "b.model.generation_config.top_k = 20; b.model.generation_config.temperature = 0.6\n"
        "ids = b.tokenizer.encode('hello')\n"
        "out = b.native_generate(ids, temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=4, seed=1)\n"
        "b.native_generate(ids, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=4, seed=1)\n"
        "with torch.inference_mode():\n"
        "    first = int(b.model(torch.tensor([ids])).logits[0, -1].argmax())\n"
        "assert out and out[0] == first, (out, first)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "generation flags" not in r.stderr, r.stderr


# ----------------------------------------------------------------------------- D: a hub revision on a local folder


def test_d_a_revision_given_for_a_local_folder_is_named_in_a_warning(llama):
    """``--backend-option revision=...`` with a local folder ran without a word while ``settings`` reported
    the revision as applied (transformers ignores it for a folder)."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        HFBackend(BackendConfig(name="hf", model=str(llama), options={"revision": "v2"})).close()
    said = [str(x.message) for x in w if issubclass(x.category, PersonaJudgeWarning) and "revision" in str(x.message)]
    assert said == [f"backend.options.revision='v2' picks a hub revision; the local model {llama} has none: ignored"]
    with warnings.catch_warnings(record=True) as w:  # control: no revision, no such warning
        warnings.simplefilter("always")
        HFBackend(BackendConfig(name="hf", model=str(llama))).close()
    assert not [x for x in w if "revision" in str(x.message)]
