"""Evaluation harness on the toy backend: runs, reports, resuming, config mismatches, the CLI."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from personajudge.cli import main
from personajudge.evaluation import EvalSpec, load_prompts, objective_experiments, pair_experiment
from personajudge.evaluation.dataset import read_prompts
from personajudge.evaluation.errors import DatasetError, RunMismatchError
from personajudge.evaluation.runner import plan_generations, run_eval
from personajudge.evaluation.store import JsonlStore, read_rows

pytest.importorskip("textstat")
pytest.importorskip("vaderSentiment")
pytest.importorskip("matplotlib")

TOY = ["--backend", "toy"]
SMALL = [*TOY, "--limit", "3", "--max-new-tokens", "24", "--no-progress", "-q"]


def toy_spec(**kw) -> EvalSpec:
    base = dict(
        limit=3,
        methods=["prompt", "persona-judge"],
        experiments=[pair_experiment("concise,informative"), pair_experiment("friendly,unfriendly")],
        scorers=[
            {"alias": "length", "name": "length"},
            {"alias": "flesch", "name": "flesch"},
            {"alias": "vader", "name": "vader"},
        ],
        run={"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 24}},
    )
    base.update(kw)
    return EvalSpec.model_validate(base)


def final_tables(run_dir: Path) -> dict:
    """The parts of report.json that must not depend on how the run got there (no timings)."""
    rep = json.loads((run_dir / "report.json").read_text())
    return {
        "win_rates": rep["win_rates"],
        "scores": [(m["experiment"], m["method"], m["n_responses"], m["scores"]) for m in rep["methods"]],
        "tokens": [
            (m["experiment"], m["method"], m["cost"]["tokens"], m["cost"]["acceptance"]) for m in rep["methods"]
        ],
        "generations": rep["generations"],
    }


def texts(run_dir: Path) -> dict:
    rows, _ = read_rows(run_dir / "generations.jsonl")
    return {r["key"]: r["text"] for r in rows}


def assert_no_duplicates(run_dir: Path) -> None:
    for name in ("generations.jsonl", "scores.jsonl"):
        rows, bad = read_rows(run_dir / name)
        keys = [(r["key"], r["fp"]) for r in rows]
        assert len(keys) == len(set(keys)), f"duplicate rows in {name}"
        assert bad == 0


# -- a whole run ---------------------------------------------------------------------------------


def test_toy_run_writes_all_report_files(tmp_path):
    res = run_eval(toy_spec(), tmp_path / "run", progress=False)
    d = tmp_path / "run"
    for f in ("run.json", "generations.jsonl", "scores.jsonl", "report.md", "report.json", "winrate.png", "scores.png"):
        assert (d / f).is_file() and (d / f).stat().st_size > 0, f
    assert res.generated == 3 * 2 * 2 and res.reused == 0 and res.scored == 12 * 3
    rep = json.loads((d / "report.json").read_text())
    assert rep["generations"] == {"done": 12, "planned": 12, "failed": 0}
    dims = {(w["dimension"], w["scorer"], w["direction"]) for w in rep["win_rates"]}
    assert dims == {
        ("concise", "length", "lower"),
        ("informative", "length", "higher"),
        ("friendly", "vader", "higher"),
        ("unfriendly", "vader", "lower"),
    }
    for w in rep["win_rates"]:
        assert w["method"] == "persona-judge" and w["n_prompts"] == 3 and 0 <= w["win_rate"] <= 1
    # opposed dimensions measured by one scorer: win rates sum to 1
    wr = {w["dimension"]: w["win_rate"] for w in rep["win_rates"]}
    assert wr["concise"] + wr["informative"] == pytest.approx(1.0)
    md = (d / "report.md").read_text()
    assert "## Win rate against `prompt`" in md and "| `persona-judge` |" in md and "n = 3 prompts" in md
    assert "concise (length ↓)" in md and "![win rates](winrate.png)" in md
    assert "judge: pairwise judge verdict" not in md  # no pairwise judge ran: its legend was printed anyway
    assert (d / "winrate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_win_rates_match_a_hand_count(tmp_path):
    d = tmp_path / "run"
    run_eval(toy_spec(scorers=[{"alias": "length", "name": "length"}]), d, progress=False)
    gens, _ = read_rows(d / "generations.jsonl")
    by = {(r["prompt_id"], r["experiment"], r["method"]): len(r["text"].split()) for r in gens}
    outcomes = []
    for pid in ("0", "1", "2"):
        a, b = by[(pid, "concise-vs-informative", "persona-judge")], by[(pid, "concise-vs-informative", "prompt")]
        outcomes.append(0.5 if a == b else float(a < b))
    rep = json.loads((d / "report.json").read_text())
    concise = next(w for w in rep["win_rates"] if w["dimension"] == "concise")
    assert concise["win_rate"] == pytest.approx(sum(outcomes) / 3)
    assert concise["wins"] + concise["ties"] + concise["losses"] == 3


def test_lambda_sweep_and_objectives_tables(tmp_path):
    d = tmp_path / "run"
    spec = toy_spec(
        methods=["prompt", "persona-judge", "persona-judge-base"],
        lambdas=[1, 2, 4],
        experiments=[pair_experiment("concise,informative"), *objective_experiments("vivid,creative,touching")],
        scorers=[{"alias": "length", "name": "length"}],
        limit=2,
    )
    jobs = plan_generations(spec, load_prompts(limit=2))
    # prompt runs once; the two Persona-judge methods once per lambda
    assert len(jobs) == 2 * 4 * (1 + 2 * 3)
    assert {
        j.views == [["vivid"], ["vivid"]] for j in jobs if j.experiment.objectives == 1 and j.method == "persona-judge"
    } == {True}
    assert {tuple(map(tuple, j.views)) for j in jobs if j.experiment.objectives == 3 and j.method == "prompt"} == {
        (("vivid", "creative", "touching"),)
    }
    run_eval(spec, d, progress=False)
    md = (d / "report.md").read_text()
    assert "## Lambda sweep" in md and "## Inference time vs. number of objectives" in md
    assert "`persona-judge λ=2`" in md
    for f in ("lambda_sweep.png", "objectives_time.png"):
        assert (d / f).is_file()
    rep = json.loads((d / "report.json").read_text())
    obj = {(m["objectives"], m["method"]) for m in rep["methods"] if m["objectives"]}
    assert (3, "persona-judge λ=4") in obj and (1, "prompt") in obj


def test_report_command_regenerates_identical_files(tmp_path, capsys):
    d = tmp_path / "run"
    run_eval(toy_spec(), d, progress=False)
    md, js = (d / "report.md").read_text(), (d / "report.json").read_text()
    for f in ("report.md", "report.json", "winrate.png", "scores.png"):
        (d / f).unlink()
    assert main(["report", str(d)]) == 0
    out, err = capsys.readouterr()
    assert (d / "report.md").read_text() == md and (d / "report.json").read_text() == js
    assert out.startswith("# Persona-judge evaluation report") and "winrate.png" in err
    assert (d / "winrate.png").is_file() and (d / "scores.png").is_file()


# -- resuming ------------------------------------------------------------------------------------


class Boom(Exception):
    pass


def _stop_after(k):
    seen = []

    def hook(row):
        seen.append(row)
        if len(seen) == k:
            raise Boom

    return hook


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    ref = tmp_path / "ref"
    run_eval(toy_spec(), ref, progress=False)

    d = tmp_path / "run"
    with pytest.raises(Boom):  # killed after 5 generations
        run_eval(toy_spec(), d, progress=False, on_generation=_stop_after(5))
    assert len(read_rows(d / "generations.jsonl")[0]) == 5
    with pytest.raises(Boom):  # killed again while scoring
        run_eval(toy_spec(), d, progress=False, on_score=_stop_after(7))
    assert len(read_rows(d / "scores.jsonl")[0]) == 7
    # a torn write: half a row at the end of each file
    with open(d / "generations.jsonl", "a") as f:
        f.write('{"key": "2|friendly-vs-unfriendly|persona-judge|4|0", "fp": "x", "te')
    with open(d / "scores.jsonl", "a") as f:
        f.write('{"key": "0|concise')
    res = run_eval(toy_spec(), d, progress=False)
    assert res.reused == 12 and res.generated == 0 and res.scored == 36 - 7
    assert texts(d) == texts(ref)
    assert final_tables(d) == final_tables(ref)
    assert_no_duplicates(d)
    for name in ("generations.jsonl", "scores.jsonl"):
        assert (d / name).read_bytes().endswith(b"\n")
    # and once more: nothing left to do, nothing written
    size = (d / "generations.jsonl").stat().st_size, (d / "scores.jsonl").stat().st_size
    res = run_eval(toy_spec(), d, progress=False)
    assert (res.generated, res.scored) == (0, 0)
    assert size == ((d / "generations.jsonl").stat().st_size, (d / "scores.jsonl").stat().st_size)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from personajudge.cli import main
    from personajudge.evaluation import runner

    k, phase = int(sys.argv[1]), sys.argv[2]
    count = [0]
    def hook(row):
        count[0] += 1
        if count[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush of anything not yet written
    orig = runner.Runner.__init__
    def init(self, *a, **kw):
        kw["on_" + phase] = hook
        orig(self, *a, **kw)
    runner.Runner.__init__ = init
    sys.exit(main(sys.argv[3:]))
""")


@pytest.mark.parametrize("k, phase", [(3, "generation"), (10, "score")])
def test_sigkilled_run_resumes_to_the_same_table(tmp_path, k, phase, capsys):
    argv = ["eval", *SMALL, "--pair", "concise,informative", "--pair", "friendly,unfriendly"]
    ref = tmp_path / "ref"
    assert main([*argv, "--run-dir", str(ref)]) == 0
    d = tmp_path / "run"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(k), phase, *argv, "--run-dir", str(d)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (d / "report.md").exists()
    assert main([*argv, "--run-dir", str(d)]) == 0
    assert texts(d) == texts(ref)
    assert final_tables(d) == final_tables(ref)
    assert_no_duplicates(d)


def test_changed_config_exits_2_unless_force(tmp_path, capsys):
    d = str(tmp_path / "run")
    argv = ["eval", *SMALL, "--run-dir", d, "--pair", "concise,informative"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv[:-2], "--pair", "friendly,unfriendly", "--max-new-tokens", "12"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different configuration" in err
    assert "experiments" in err and "decoding.max_new_tokens" in err and "--force" in err
    with pytest.raises(RunMismatchError):
        run_eval(toy_spec(), d, progress=False)
    # --resume continues with the stored config, whatever the other flags say
    assert main(["eval", "--resume", "--run-dir", d, "--no-progress", "-q"]) == 0
    # --force switches the directory to the new config and reuses what is still valid
    assert main([*argv, "--limit", "4", "--force"]) == 0
    rep = json.loads((Path(d) / "report.json").read_text())
    assert rep["generations"]["done"] == 8 and rep["prompts"] == 4
    run = json.loads((Path(d) / "run.json").read_text())
    assert run["spec"]["limit"] == 4 and len(run["previous"]) == 1
    assert run["command"][:2] == ["personajudge", "eval"] and "--limit" in run["command"]


def test_reproduce_command_rebuilds_the_same_spec(tmp_path, capsys):
    d = tmp_path / "run"
    argv = [
        "eval",
        *SMALL,
        "--run-dir",
        str(d),
        "--pair",
        "concise+friendly,informative",
        "--methods",
        "persona-judge-base,persona-judge",
        "--scorers",
        "len=length",
        "--dimension",
        "concise=len:lower",
        "--lambdas",
        "2,3",
        "--samples",
        "2",
        "--seed",
        "5",
        "--temperature",
        "0.5",
    ]
    assert main(argv) == 0
    run = json.loads((d / "run.json").read_text())
    cmd = run["command"]
    assert cmd[0] == "personajudge"
    # the stored command, run again, is the same configuration: nothing to do
    capsys.readouterr()
    assert main([*cmd[1:], "--no-progress", "-q"]) == 0
    assert "0 generated, " in capsys.readouterr().err
    md = (d / "report.md").read_text()
    assert "2 seeds" in md and "concise (len ↓)" in md


@pytest.mark.parametrize(("flag", "seeds"), [([], [7, 8]), (["--seed", "3"], [3, 4])])
def test_the_config_files_seed_is_the_first_sample_seed_unless_seed_is_given(flag, seeds, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("[decoding]\nseed = 7\n")
    d = tmp_path / "run"
    argv = ["eval", *SMALL, "--limit", "2", "--run-dir", str(d), "--config", str(cfg), "--samples", "2", *flag]
    assert main([*argv, "--methods", "prompt", "--scorers", "len=length"]) == 0
    assert json.loads((d / "run.json").read_text())["spec"]["seeds"] == seeds
    assert {r["seed"] for r in read_rows(d / "generations.jsonl")[0]} == set(seeds)


# -- the store -----------------------------------------------------------------------------------


def test_jsonl_store_repairs_torn_tail_and_refuses_duplicates(tmp_path):
    p = tmp_path / "x.jsonl"
    with JsonlStore(p) as s:
        assert s.append({"key": "a", "fp": "1", "v": 1})
        assert s.append({"key": "a", "fp": "2", "v": 2})  # same key, other settings: another row
        assert not s.append({"key": "a", "fp": "1", "v": 3})
    p.write_bytes(p.read_bytes() + b'{"key": "b", "fp": "1", "v"')
    rows, bad = read_rows(p)
    assert [r["v"] for r in rows] == [1, 2] and bad == 0
    with JsonlStore(p) as s:
        assert not p.read_bytes().endswith(b'"v"')
        assert s.append({"key": "b", "fp": "1", "v": 4})
    assert [r["v"] for r in read_rows(p)[0]] == [1, 2, 4]


# -- datasets and the CLI ------------------------------------------------------------------------


def test_builtin_prompts_and_jsonl(tmp_path):
    items = load_prompts()
    assert len(items) == 50 and items[0].id == "0" and "TCP/IP" in items[0].prompt
    assert "\nMicrosoft" in items[8].prompt  # the file's literal \\n escapes are newlines
    assert len(load_prompts(limit=3)) == 3
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "first"}\n\n{"id": "x", "prompt": "second", "extra": 1}\n')
    assert [(i.id, i.prompt) for i in read_prompts(p)] == [("0", "first"), ("x", "second")]
    for text, needle in (
        ('{"text": "no prompt"}\n', "missing or empty 'prompt'"),
        ('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": 1}\n', "duplicate id"),
        ('{"prompt": "a"\n', "not valid JSON"),
        ("", "no prompts"),
    ):
        p.write_text(text)
        with pytest.raises(DatasetError, match=needle):
            read_prompts(p)


def test_eval_on_a_jsonl_dataset(tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": f"Tell me about topic {i}."}) + "\n" for i in range(2))
    )
    d = tmp_path / "run"
    assert (
        main(
            [
                "eval",
                *TOY,
                "--dataset",
                str(data),
                "--max-new-tokens",
                "8",
                "--run-dir",
                str(d),
                "--no-progress",
                "--pair",
                "friendly,unfriendly",
                "--scorers",
                "vader",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "2 prompts" in out and "friendly (vader ↑)" in out
    rows, _ = read_rows(d / "generations.jsonl")
    assert {r["prompt_id"] for r in rows} == {"q0", "q1"}


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--methods", "prompt,magic"], "unknown method 'magic'"),
        (["--scorers", "length,nope"], "unknown scorer 'nope'"),
        (["--scorer-option", "rm.model=x"], "no scorer 'rm'"),
        (["--scorer-option", "length"], "ALIAS.KEY=VALUE"),
        (["--scorers", "reward-model"], "needs a model"),
        (["--scorers", "length", "--scorer-option", "length.colour=1"], "colour"),
        (["--dimension", "concise=rm:lower"], "not one of this run's scorers"),
        (["--dimension", "concise=length:up"], "higher' or 'lower"),
        (["--pair", "concise"], "two comma-separated"),
        (["--pair", "concize,informative"], "did you mean concise"),
        (["--lambdas", "2,x"], "comma-separated integers"),
        (["--lambdas", "0,2"], "lambdas"),
        (["--method", "prompt"], "use --methods"),
        (["--dataset", "/nonexistent.jsonl"], "dataset file not found"),
        (["--limit", "0"], "limit"),
        (["--objectives", "vivid,vivid"], "twice"),
        (["--scorers", "pairwise-judge", "--scorer-option", "pairwise-judge.judge=http"], "base URL"),
    ],
)
def test_eval_user_mistakes_exit_2_with_one_line(extra, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PERSONAJUDGE_JUDGE_BASE_URL", raising=False)
    code = main(["eval", *SMALL, "--run-dir", str(tmp_path / "r"), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and needle in err, err


def test_report_on_a_directory_without_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not an evaluation run directory" in capsys.readouterr().err


def test_third_party_scorer_through_the_hook(tmp_path):
    from personajudge.evaluation.scorers import PointwiseScorer
    from personajudge.plugins import register_plugin, unregister_plugin
    from personajudge.plugins.hookspecs import hookimpl

    class Exclaim(PointwiseScorer):
        name = "letters-e"
        description = "Count of the letter e."

        def score(self, prompt, response):
            return float(response.count("e"))

    class Plugin:
        @hookimpl
        def register_scorers(self, register):
            register(Exclaim)

    plugin = Plugin()
    register_plugin(plugin, name="test-letters")
    try:
        d = tmp_path / "run"
        run_eval(
            toy_spec(
                scorers=[{"alias": "e", "name": "letters-e"}],
                dimensions=[{"dimension": "friendly", "scorer": "e", "direction": "higher"}],
            ),
            d,
            progress=False,
        )
        rep = json.loads((d / "report.json").read_text())
        assert [(w["dimension"], w["scorer"]) for w in rep["win_rates"]] == [("friendly", "e")]
        assert "`e`" in (d / "report.md").read_text()
    finally:
        unregister_plugin(plugin)


def test_batched_generation_rows(tmp_path):
    d = tmp_path / "run"
    run_eval(toy_spec(batch_size=2, scorers=[]), d, progress=False)
    rows, _ = read_rows(d / "generations.jsonl")
    assert len(rows) == 12 and {r["batch"] for r in rows} == {1, 2}


def test_cli_help_lists_eval_and_report(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "eval" in out and "report" in out
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    for flag in ("--pair", "--objectives", "--scorers", "--lambdas", "--run-dir", "--force", "--resume", "--limit"):
        assert flag in out


def test_package_files_are_importable_without_optional_dependencies():
    code = textwrap.dedent("""
        import sys
        for m in ("textstat", "vaderSentiment", "matplotlib", "torch", "transformers"):
            sys.modules[m] = None  # make the import fail
        from personajudge.plugins.manager import registry
        names = registry("scorer").names()
        assert names == ["flesch", "length", "pairwise-judge", "reward-model", "vader"], names
        from personajudge.cli import main
        code = main(["eval", "--backend", "toy", "--limit", "1", "--scorers", "flesch", "--run-dir", sys.argv[1]])
        assert code == 2
    """)
    env = {**os.environ}
    proc = subprocess.run([sys.executable, "-c", code, "/nonexistent/run"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert 'pip install -e ".[eval]" in your persona-judge clone' in proc.stderr


def test_example_evaluate_small_on_the_toy_backend(tmp_path):
    root = Path(__file__).resolve().parents[2]
    d = tmp_path / "example"
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "evaluate_small.py"), "--backend", "toy", "--run-dir", str(d)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"report: {d / 'report.md'}" in proc.stdout and "| `persona-judge` |" in proc.stdout
    assert (d / "report.json").is_file() and (d / "scores.png").is_file()


def test_a_second_process_on_the_same_run_dir_is_refused(tmp_path):
    from personajudge.evaluation.errors import RunLockedError
    from personajudge.evaluation.store import RunLock

    d = tmp_path / "run"
    d.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from personajudge.evaluation.store import RunLock
        with RunLock(Path({str(d)!r})):
            print("locked", flush=True)
            time.sleep(30)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match="another evaluation"):
            run_eval(toy_spec(), d, progress=False)
    finally:
        holder.kill()
        holder.wait()
    with RunLock(d):  # released when the holder died
        pass
