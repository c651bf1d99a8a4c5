"""CLI subcommands ``personajudge eval`` and ``personajudge report``.

personajudge eval --run-dir runs/psoups --seed 0            # 50 P-Soups prompts, default pairs
personajudge eval --run-dir runs/small --limit 3 --max-new-tokens 32
personajudge eval --pair concise,informative --methods prompt,persona-judge,persona-judge-base
personajudge eval --lambdas 1,2,4,8 --pair vivid,creative
personajudge eval --objectives vivid,creative,touching --methods persona-judge --scorers length
personajudge report runs/psoups
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from personajudge.batch import writes_unicode
from personajudge.core.config import RunConfig, check_seed_span, load_config_file, validation_message
from personajudge.core.errors import PersonaJudgeError
from personajudge.core.processes import terminate_as_exit
from personajudge.evaluation.dimensions import parse_dimension
from personajudge.evaluation.errors import EvalError
from personajudge.evaluation.report import write_report
from personajudge.evaluation.runner import load_spec, run_eval
from personajudge.evaluation.spec import (
    DEFAULT_METHODS,
    DEFAULT_PAIRS,
    DEFAULT_SCORERS,
    EvalSpec,
    ScorerSpec,
    build_experiments,
    command_from_spec,
    comparable,
    diff,
    resume_command,
)
from personajudge.evaluation.store import RUN_FILE

from .options import (
    add_run_options,
    config_from_args,
    dir_path_arg,
    file_path_arg,
    mark_refused,
    warn_unused_config_method,
)
from .ray_options import add_ray_options, ray_options_from_args

DEFAULT_RUN_DIR = "runs/eval"


def _int_list(flag: str, text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise EvalError(f"{flag} expects comma-separated integers, got {text!r}") from None
    if not out:
        raise EvalError(f"{flag} expects comma-separated integers, got {text!r}")
    return out


def parse_scorers(text: str, options: list[str]):
    """``length,rm=reward-model`` + ``rm.model=PATH`` -> ScorerSpecs."""
    specs: list[ScorerSpec] = []
    if not text.replace(",", "").strip():  # `--scorers "$S"` with S unset: no scores, without a word
        raise EvalError(f"--scorers names no scorer ({text!r}); give scorer names, or none to score nothing")
    if text.strip().lower() != "none":
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            alias, _, name = item.partition("=")
            alias, name = alias.strip(), (name.strip() or alias.strip())
            if not alias or "|" in alias or "." in alias:
                raise EvalError(f"--scorers: bad scorer alias {alias!r} (no '|' or '.')")
            specs.append(ScorerSpec(alias=alias, name=name))
    by_alias = {s.alias: s for s in specs}
    for opt in options:
        target, eq, value = opt.partition("=")
        alias, dot, key = target.partition(".")
        if not eq or not dot or not key.strip():
            raise EvalError(f"--scorer-option expects ALIAS.KEY=VALUE, got {opt!r}")
        if alias.strip() not in by_alias:
            raise EvalError(
                f"--scorer-option {opt!r}: no scorer '{alias}' in --scorers ({', '.join(by_alias) or 'none'})"
            )
        try:
            parsed: Any = json.loads(value)
        except (ValueError, RecursionError):  # not JSON (or past Python's limits): the text itself
            parsed = value
        by_alias[alias.strip()].options[key.strip()] = parsed
    return specs


def parse_method_options(items: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``mod.weights=[0.7,0.3]`` -> ``{"mod": {"weights": [0.7, 0.3]}}``: each option belongs to one
    method of the run (every method of a run gets the same views and seeds, not the same options:
    ``prompt`` takes no ``weights``). A bare ``KEY=VALUE`` is the method's when the run has one."""
    out: dict[str, dict[str, Any]] = {}
    for opt in items:
        target, eq, value = opt.partition("=")
        method, dot, key = target.strip().rpartition(".") if "." in target else ("", "", target.strip())
        method, key = method.strip(), key.strip()
        if not eq or not key:
            raise EvalError(f"--method-option expects METHOD.KEY=VALUE, got {opt!r}")
        if not dot:
            if len(methods) != 1:
                raise EvalError(
                    f"--method-option {opt!r}: eval runs several methods ({', '.join(methods)}); say whose "
                    f"option it is: --method-option METHOD.{key}=VALUE (e.g. mod.weights=[0.7,0.3])"
                )
            method = methods[0]
        if method not in methods:
            raise EvalError(
                f"--method-option {opt!r}: '{method}' is not one of this run's methods ({', '.join(methods)})"
            )
        try:
            parsed: Any = json.loads(value)
        except (ValueError, RecursionError):  # not JSON: the text itself
            parsed = value
        out.setdefault(method, {})[key] = parsed
    return out


def spec_from_args(args: argparse.Namespace):
    if args.method:
        raise EvalError("eval compares several methods: use --methods A,B (not --method)")
    if args.preferences_file:
        raise EvalError("eval takes its preferences from --pair / --objectives / --view, not --preferences-file")
    if args.config is not None:
        data = load_config_file(args.config)
        given = [k for k in ("preferences", "views") if data.get(k)]
        if given:
            raise EvalError(
                f"eval takes its preferences from --pair / --prefer / --view / --objectives, not a --config "
                f"file's {' and '.join(given)} ({args.config}); remove them from the file and give them as flags"
            )
    run, _ = config_from_args(
        argparse.Namespace(
            **{
                **vars(args),
                "prefer": None,
                "preferences_file": None,
                "view": None,
                "seed": None,
                "method_option": [],
            }
        )
    )
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    baseline = None if args.baseline.strip().lower() in ("", "none") else args.baseline.strip()
    every = [*([baseline] if baseline and baseline not in methods else []), *methods]
    method_options = parse_method_options(args.method_option, every)
    warn_unused_config_method(args, every, "eval", "compared")
    if run.method_options:  # a --config file's: options of the file's method
        if run.method not in every:
            raise EvalError(
                f"the --config file's method_options are options of its method '{run.method}', which this "
                f"run does not compare ({', '.join(every)}); give them as --method-option METHOD.KEY=VALUE"
            )
        method_options[run.method] = {**run.method_options, **method_options.get(run.method, {})}
    # a --config file's method, views and seed decide nothing here (spec.methods, experiments, seeds
    # do): left at their defaults, so the reproduce command, which has no flags for them, gives this spec
    seed_of_config = run.decoding.seed
    run = run.model_copy(
        update={
            "views": None,
            "preferences": [],
            "method": RunConfig.model_fields["method"].default,
            "method_options": {},
            "decoding": run.decoding.model_copy(update={"seed": None}),
        }
    )
    # --seed, else the config file's decoding.seed, else 0: an evaluation is always reproducible
    seed = args.seed if args.seed is not None else (seed_of_config if seed_of_config is not None else 0)
    if args.samples < 1:
        raise EvalError("--samples must be at least 1")
    if args.batch_size < 1:
        raise EvalError("--batch-size must be at least 1")
    check_seed_span(seed, args.samples, f"--seed {seed} with --samples {args.samples}", EvalError)
    try:
        experiments = build_experiments(
            pairs=args.pair or [], prefer=args.prefer, view=args.view, objectives=args.objectives or []
        )
        return EvalSpec(
            # absolute: `--resume` from another folder reads the same file
            dataset=os.path.abspath(args.dataset) if args.dataset else "psoups-koala-50",
            limit=args.limit,
            methods=methods,
            baseline=baseline,
            experiments=experiments,
            lambdas=_int_list("--lambdas", args.lambdas) if args.lambdas is not None else [],
            seeds=[seed + i for i in range(args.samples)],
            scorers=parse_scorers(args.scorers, args.scorer_option),
            dimensions=[parse_dimension(d) for d in args.dimension],
            batch_size=args.batch_size,
            method_options=method_options,
            run=run,
        )
    except ValueError as err:  # pydantic
        raise EvalError(f"invalid evaluation: {validation_message(err)}") from None


class _CheckParser(argparse.ArgumentParser):
    """A parser that says nothing: a flag it refuses is an :class:`EvalError` (see :func:`reproduce_command`)."""

    def error(self, message: str) -> NoReturn:
        raise EvalError(message)


def reproduce_command(spec: EvalSpec, run_dir: str) -> list[str]:
    """The command that the report shows as reproducing the run: :func:`command_from_spec`, parsed
    back here and kept only when it gives this very spec; else ``--resume`` on the run directory,
    which always does (a hand-written ``--config`` file can hold settings no flag gives)."""
    cmd = command_from_spec(spec, run_dir)
    if "--resume" in cmd:
        return cmd
    parser = _CheckParser(prog="personajudge")
    register(parser.add_subparsers(dest="command", parser_class=_CheckParser))
    try:
        again = spec_from_args(parser.parse_args(cmd[1:]))
    except PersonaJudgeError:
        return resume_command(run_dir)
    return cmd if not diff(comparable(again.dump()), comparable(spec.dump())) else resume_command(run_dir)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.resume:
        if not (Path(args.run_dir) / "run.json").exists():
            raise EvalError(f"--resume: {args.run_dir} holds no run to continue (no run.json)")
        spec = load_spec(args.run_dir)
    else:
        spec = spec_from_args(args)
    ray_opts = ray_options_from_args(args)
    try:
        with terminate_as_exit():  # `kill PID`: exit 143, and the run's rows are kept as after a Ctrl-C
            res = run_eval(
                spec,
                args.run_dir,
                force=args.force,
                progress=not args.no_progress,
                report=not args.no_report,
                ray=ray_opts,
                argv=reproduce_command(spec, args.run_dir),
            )
    except (KeyboardInterrupt, SystemExit) as err:
        if (Path(args.run_dir) / RUN_FILE).exists():  # a run stopped before its first row leaves none
            how = "interrupted" if isinstance(err, KeyboardInterrupt) else "stopped"
            print(
                f"personajudge: {how}; finished rows are saved in {args.run_dir}: run the same command "
                f"(or `personajudge eval --resume --run-dir {args.run_dir}`) to continue",
                file=sys.stderr,
            )
        raise
    print(
        f"personajudge: {res.generated} generated, {res.reused} reused, {res.failed} failed, "
        f"{res.scored} scores in {res.run_dir}",
        file=sys.stderr,
    )
    if res.report:
        print(f"personajudge: report: {res.report['markdown']}", file=sys.stderr)
        if not args.quiet:
            print(res.report["markdown"].read_text(encoding="utf-8"))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    out = write_report(args.run_dir, plots=not args.no_plots)
    if not args.quiet:
        text = out["json" if args.json else "markdown"].read_text(encoding="utf-8")
        if args.json and not writes_unicode(sys.stdout):  # as \uXXXX escapes: the same JSON, nothing lost
            text = json.dumps(json.loads(text), indent=2, ensure_ascii=True)
        print(text)
    print("personajudge: wrote " + ", ".join(str(p) for p in out.values()), file=sys.stderr)
    return 0


def register(sub: Any) -> None:
    """Add ``eval`` and ``report`` to the ``personajudge`` parser."""
    p = sub.add_parser(
        "eval",
        help="evaluate methods on prompts with scorers (resumable; writes a report)",
        description="Generate with each method for every prompt x experiment x seed, score, and "
        "write report.md / report.json / PNG plots. Rows are appended as they are "
        "produced: rerun the same command to continue an interrupted run.",
    )
    add_run_options(
        p,
        seed_help="seed of the first sample; --samples N uses seeds SEED..SEED+N-1 (default: the config's decoding.seed, else 0)",
    )
    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--dataset",
        type=file_path_arg,
        metavar="FILE",
        help="JSONL (or JSON list) with a 'prompt' field and optional 'id' (default: the 50 P-Soups prompts)",
    )
    g.add_argument("--limit", type=int, metavar="N", help="only the first N prompts")
    g.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        metavar="A,B",
        help=f"methods to compare (any registered method; default {DEFAULT_METHODS})",
    )
    g.add_argument(
        "--baseline",
        default="prompt",
        metavar="METHOD",
        help="method the win rates compare against; always generated ('none': no win rates; default prompt)",
    )
    g.add_argument(
        "--pair",
        action="append",
        metavar="A,B",
        help="an experiment whose two views are preferences A and B (repeatable; 'A+C,B' puts two in "
        "one view); default: " + " and ".join(DEFAULT_PAIRS),
    )
    g.add_argument(
        "--objectives",
        action="append",
        metavar="A,B,C",
        help="experiments with 1, 2, 3, ... objectives for the cost table (Table 5)",
    )
    g.add_argument(
        "--scorers",
        default=DEFAULT_SCORERS,
        metavar="NAME|ALIAS=NAME,...",
        help=f"scorers (default {DEFAULT_SCORERS}; also reward-model, pairwise-judge; 'none')",
    )
    g.add_argument(
        "--scorer-option",
        action="append",
        default=[],
        metavar="ALIAS.KEY=VALUE",
        help="a scorer option (repeatable), e.g. rm.model=PATH; VALUE is parsed as JSON when it can be",
    )
    g.add_argument(
        "--dimension",
        action="append",
        default=[],
        metavar="NAME=SCORER:higher|lower",
        help="measure dimension NAME with scorer alias SCORER in that direction (repeatable)",
    )
    g.add_argument("--lambdas", metavar="L1,L2,...", help="draft windows to sweep (Table 3); default: --lambda")
    g.add_argument(
        "--samples",
        type=int,
        default=1,
        metavar="N",
        help="generations per prompt, with seeds --seed, --seed+1, ... (default 1)",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=1,
        metavar="N",
        help="prompts per batched generate call (default 1: per-response timings stay exact)",
    )
    g.add_argument(
        "--run-dir",
        default=DEFAULT_RUN_DIR,
        metavar="DIR",
        type=dir_path_arg,
        help=f"run directory (default {DEFAULT_RUN_DIR})",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir with its stored configuration (other run flags are ignored)",
    )
    g.add_argument(
        "--force",
        action="store_true",
        help="reuse --run-dir although it was started with another configuration (still-valid rows are kept)",
    )
    g.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("-q", "--quiet", action="store_true", help="do not print the report")
    add_ray_options(p)
    mark_refused(
        p,
        {
            "method": "refused: eval compares the methods --methods names",
            "preferences_file": "refused: eval takes its preferences from --pair / --objectives / --view",
            "method_option": "an option of one method of the run, METHOD.KEY=VALUE (repeatable), e.g. "
            "mod.weights=[0.7,0.3] or pad.weight=2; VALUE is parsed as JSON when it can be",
        },
    )
    p.set_defaults(func=cmd_eval)

    r = sub.add_parser("report", help="rebuild an evaluation run's report (Markdown, JSON, PNG) from its JSONL files")
    r.add_argument("run_dir", metavar="RUN_DIR", type=dir_path_arg)
    r.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    r.add_argument("--json", action="store_true", help="print report.json instead of report.md")
    r.add_argument("-q", "--quiet", action="store_true", help="only write the files")
    r.set_defaults(func=cmd_report)
