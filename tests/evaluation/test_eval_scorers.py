"""Scorers: deterministic ones on known texts, the pairwise-judge protocol on stub judges, a tiny reward model."""

import math

import pytest

from personajudge.evaluation.errors import ScorerError
from personajudge.evaluation.scorers import PairItem, ScoringContext, get_scorer_class, make_scorer
from personajudge.evaluation.scorers.pairwise_judge import PairwiseJudgeScorer, a_first, parse_verdict

SIMPLE = "The cat sat on the mat. It was a good cat. We like it."
COMPLEX = ("Notwithstanding considerable epistemological disagreements, contemporary computational "
           "linguistics methodologies increasingly incorporate sophisticated probabilistic representations.")
FRIENDLY = "Thank you so much, my friend! I love your wonderful idea, it is great and fun."
HOSTILE = "This is a stupid, terrible idea. I hate it and you are an idiot."


def test_registered_scorers():
    from personajudge.plugins.manager import registry

    assert {"length", "flesch", "vader", "reward-model", "pairwise-judge"} <= set(registry("scorer").names())
    assert get_scorer_class("pairwise-judge").kind == "pairwise"
    assert get_scorer_class("length").kind == "pointwise"


def test_length_counts_words():
    s = make_scorer("length")
    assert s.score("q", "one two  three\nfour") == 4.0
    assert s.score("q", "") == 0.0
    assert s.score_many([("q", "a b"), ("q", "a")]) == [2.0, 1.0]


def test_flesch_orders_simple_below_complex():
    pytest.importorskip("textstat")
    s = make_scorer("flesch")
    simple, complex_ = s.score("q", SIMPLE), s.score("q", COMPLEX)
    assert simple < 5 < 15 < complex_
    assert math.isnan(s.score("q", "   "))
    assert s.score("q", SIMPLE) == simple  # deterministic


def test_vader_orders_friendly_above_hostile():
    pytest.importorskip("vaderSentiment")
    s = make_scorer("vader")
    friendly, hostile = s.score("q", FRIENDLY), s.score("q", HOSTILE)
    assert -1 <= hostile < 0 < friendly <= 1
    assert s.score("q", "") == 0.0


def test_scorer_options_are_validated():
    with pytest.raises(ScorerError, match="colour"):
        make_scorer("length", {"colour": 1})
    with pytest.raises(ScorerError, match="syllables"):
        make_scorer("flesch", {"syllables": "guess"})


# -- pairwise judge --------------------------------------------------------------------------------

def items(n=40):
    return [PairItem(prompt=f"q{i}", response_a="short" if i % 2 else "a much longer answer here",
                     response_b="a much longer answer here" if i % 2 else "short",
                     aspect="concise (Concise and to the point)", aspect_name="concise", key=f"k{i}")
            for i in range(n)]


def shorter_wins(text: str) -> str:
    r1 = text.split("[Response 1]\n")[1].split("\n\n")[0]
    r2 = text.split("[Response 2]\n")[1].split("\n\n")[0]
    return "1" if len(r1) < len(r2) else "2" if len(r2) < len(r1) else "0"


def test_parse_verdict():
    assert parse_verdict("2") == 2
    assert parse_verdict("Response 1 is better.") == 1
    assert parse_verdict("  0 (tie)") == 0
    assert parse_verdict("Answer: 3, then 12 and 2") == 2  # standalone digits only
    assert parse_verdict("0.5") is None and parse_verdict("") is None and parse_verdict("none") is None


def test_order_is_randomized_reproducibly():
    firsts = [a_first(7, f"k{i}") for i in range(200)]
    assert 70 < sum(firsts) < 130  # both orders occur
    assert firsts == [a_first(7, f"k{i}") for i in range(200)]  # same seed, same orders
    assert firsts != [a_first(8, f"k{i}") for i in range(200)]  # another seed, other orders
    seen = []
    judge = PairwiseJudgeScorer(judge_fn=lambda t: seen.append(t) or "0", seed=7, swap=False)
    judge.compare_many(items(20))
    shown_first = ["[Response 1]\nshort" in t for t in seen]
    a_is_short = [i % 2 == 1 for i in range(20)]
    assert [s == a for s, a in zip(shown_first, a_is_short)] == [a_first(7, f"k{i}") for i in range(20)]


def test_consistent_judge_wins_and_swap_agrees():
    judge = PairwiseJudgeScorer(judge_fn=shorter_wins, seed=1)
    out = judge.compare_many(items())
    for i, r in enumerate(out):
        assert r.value == (1.0 if i % 2 else 0.0)  # A wins exactly when A is the short one
        assert r.details["consistent"] is True and r.details["invalid"] == 0
        assert sorted(r.details["orders"]) == ["AB", "BA"]


def test_position_biased_judge_is_neutralized_by_swapping():
    always_first = PairwiseJudgeScorer(judge_fn=lambda t: "1", seed=3)
    out = always_first.compare_many(items())
    assert {r.value for r in out} == {0.5}
    assert not any(r.details["consistent"] for r in out)
    assert all(r.details["first_position_wins"] == 2 for r in out)
    # without swapping the same judge produces fake wins and losses, decided by the random order
    single = PairwiseJudgeScorer(judge_fn=lambda t: "1", seed=3, swap=False).compare_many(items())
    assert {r.value for r in single} == {0.0, 1.0}
    assert [r.value for r in single] == [float(a_first(3, f"k{i}")) for i in range(40)]


def test_unparseable_answers_are_ties_and_counted():
    out = PairwiseJudgeScorer(judge_fn=lambda t: "I cannot decide", seed=0).compare(items(1)[0])
    assert out.value == 0.5 and out.details["invalid"] == 2 and out.details["consistent"] is False


def test_run_seed_is_used_when_no_seed_option():
    j = PairwiseJudgeScorer(judge_fn=shorter_wins)
    j.bind(ScoringContext(seed=11))
    assert j.plan(items(1)[0])[0] == a_first(11, "k0")


def test_template_must_have_both_responses():
    with pytest.raises(ScorerError, match="response_2"):
        PairwiseJudgeScorer(judge_fn=shorter_wins, template="{response_1} only")


def test_http_judge_needs_url_and_model(monkeypatch):
    monkeypatch.delenv("PERSONAJUDGE_JUDGE_BASE_URL", raising=False)
    monkeypatch.delenv("PERSONAJUDGE_JUDGE_MODEL", raising=False)
    with pytest.raises(ScorerError, match="base URL"):
        PairwiseJudgeScorer.validate({"judge": "http"})
    monkeypatch.setenv("PERSONAJUDGE_JUDGE_BASE_URL", "http://127.0.0.1:9/v1")
    with pytest.raises(ScorerError, match="model name"):
        PairwiseJudgeScorer.validate({})
    monkeypatch.setenv("PERSONAJUDGE_JUDGE_MODEL", "judge-model")
    opts = PairwiseJudgeScorer.validate({})
    assert (opts.judge, opts.base_url, opts.model) == ("http", "http://127.0.0.1:9/v1", "judge-model")
    cfg = PairwiseJudgeScorer.config_for(opts)["options"]
    assert "base_url" not in cfg and cfg["model"] == "judge-model"  # where it runs is not what it measures


def test_http_judge_unreachable_is_a_user_error(monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    j = PairwiseJudgeScorer(judge="http", base_url=f"http://127.0.0.1:{port}/v1", model="m", retries=1, timeout=5)
    with pytest.raises(ScorerError, match="cannot reach the judge endpoint"):
        j.compare(items(1)[0])


def test_backend_judge_on_the_toy_model():
    from personajudge.api import PersonaJudge

    pj = PersonaJudge({"backend": {"name": "toy"}})
    j = PairwiseJudgeScorer(judge="backend", max_tokens=4)
    j.bind(ScoringContext(seed=0, pj=pj))
    out = j.compare_many(items(3))
    assert all(r.value in (0.0, 0.25, 0.5, 0.75, 1.0) and len(r.details["answers"]) == 2 for r in out)
    assert [r.value for r in out] == [r.value for r in j.compare_many(items(3))]  # temperature 0


# -- reward model ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    path = tmp_path_factory.mktemp("tiny-rm")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [SIMPLE, COMPLEX, FRIENDLY, HOSTILE, "Human: Assistant: what why how tell me about"]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(fast), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                  num_labels=1, pad_token_id=fast.convert_tokens_to_ids("[EOS]"))
    transformers.GPT2ForSequenceClassification(cfg).save_pretrained(path)
    return str(path)


def test_reward_model_scores_are_deterministic_and_batching_invariant(tiny_reward_model):
    pairs = [("why", SIMPLE), ("tell me about", COMPLEX), ("how", FRIENDLY), ("what", HOSTILE), ("why", "ok")]
    one = make_scorer("reward-model", {"model": tiny_reward_model, "batch_size": 1})
    batched = make_scorer("reward-model", {"model": tiny_reward_model, "batch_size": 4})
    a = one.score_many(pairs)
    b = batched.score_many(pairs)
    assert len(a) == len(pairs) and all(isinstance(x, float) and math.isfinite(x) for x in a)
    assert b == pytest.approx(a, abs=1e-5)
    assert batched.score_many(pairs) == b  # deterministic
    assert one.score(*pairs[2]) == pytest.approx(a[2], abs=1e-6)
    assert len(set(round(x, 6) for x in a)) > 1  # the responses are told apart
    assert one.format("Q?", "A.") == "\n\nHuman: Q?\n\nAssistant: A."
    assert one.config_hash() == batched.config_hash()  # batch size does not change what it measures


def test_reward_model_errors(tiny_reward_model, tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(ScorerError, match="cannot load reward model"):
        make_scorer("reward-model", {"model": str(tmp_path / "missing")})
    with pytest.raises(ScorerError, match="out of range"):
        make_scorer("reward-model", {"model": tiny_reward_model, "index": 3}).score("q", "a")
    with pytest.raises(ScorerError, match="template"):
        make_scorer("reward-model", {"model": tiny_reward_model, "template": "{prompt} only"})


def test_reward_model_in_an_eval_run(tiny_reward_model, tmp_path):
    import json

    from personajudge.evaluation import EvalSpec, pair_experiment
    from personajudge.evaluation.runner import run_eval

    spec = EvalSpec(limit=2, methods=["prompt", "persona-judge"], experiments=[pair_experiment("helpful,harmless")],
                    scorers=[{"alias": "rm", "name": "reward-model", "options": {"model": tiny_reward_model}}],
                    dimensions=[{"dimension": "helpful", "scorer": "rm", "direction": "higher"}],
                    run={"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 12}})
    run_eval(spec, tmp_path / "run", progress=False)
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [(w["dimension"], w["scorer"], w["n_prompts"]) for w in rep["win_rates"]] == [("helpful", "rm", 2)]
    assert all(m["scores"]["rm"]["n"] == 2 for m in rep["methods"])
