"""Evaluation harness: measure, on your model and preferences, whether Persona-judge beats prompting.

Reproduces the paper's experiments -- win rates per preference dimension
(Tables 2/4), a lambda sweep (Table 3) and cost as objectives are added
(Table 5) -- with pluggable scorers, resumable runs and Markdown/JSON/PNG
reports.

    from personajudge.evaluation import EvalSpec, pair_experiment, run_eval

    spec = EvalSpec(methods=["prompt", "persona-judge"], limit=3,
                    experiments=[pair_experiment("concise,informative")],
                    scorers=[{"name": "length"}, {"name": "vader"}],
                    run={"backend": {"name": "llama-cpp"}, "decoding": {"max_new_tokens": 32}})
    result = run_eval(spec, "runs/small")
    print(result.report["markdown"])

CLI: ``personajudge eval`` and ``personajudge report`` (see :mod:`personajudge.cli.eval`).
"""

from .dataset import PSOUPS, PromptItem, builtin_prompts, load_prompts, read_prompts
from .dimensions import DEFAULT_DIMENSIONS, DimensionScorer
from .errors import DatasetError, EvalError, RunLockedError, RunMismatchError, ScorerError
from .report import build_report, write_report
from .runner import run_eval
from .spec import (
    EvalSpec,
    Experiment,
    ScorerSpec,
    build_experiments,
    name_experiments,
    objective_experiments,
    pair_experiment,
    views_experiment,
)

__all__ = [
    "PSOUPS",
    "PromptItem",
    "builtin_prompts",
    "load_prompts",
    "read_prompts",
    "DEFAULT_DIMENSIONS",
    "DimensionScorer",
    "DatasetError",
    "EvalError",
    "RunLockedError",
    "RunMismatchError",
    "ScorerError",
    "EvalSpec",
    "Experiment",
    "ScorerSpec",
    "objective_experiments",
    "build_experiments",
    "name_experiments",
    "pair_experiment",
    "views_experiment",
    "run_eval",
    "write_report",
    "build_report",
]
