"""What an evaluation run is: prompts x experiments x methods (x lambdas) x seeds, and its scorers.

Protocol (the paper's Tables 2 and 4, decided here and documented in the README):

- An **experiment** is one set of preference views, e.g. the pair
  ``concise,informative`` gives the views ``[concise]`` and ``[informative]``.
  Its **dimensions** are its preferences.
- Every method gets the same experiment. ``persona-judge`` and
  ``persona-judge-base`` prompt one view per group (draft and judge);
  single-view methods get all the experiment's preferences at once:
  ``prompt`` writes them all into one prompt (the paper's "preference
  prompting" baseline, which Persona-judge is compared against), ``base``
  ignores them.
- A method's **win rate** in a dimension is the share of prompts where its
  response is better in that dimension's direction than the baseline's
  (``prompt``) response to the same prompt with the same seed, ties counted
  half. For opposed pairs (concise vs. informative) the two dimensions' win
  rates sum to 100%: they show which way the method leans compared to
  prompting with both preferences.

Objectives (the paper's Table 5, cost as the number of objectives grows):
``--objectives A,B,C`` adds one experiment per k = 1..3 over the first k
objectives, split into two views the way the released code did: k = 1 puts A
in both views; k >= 2 puts objectives 1..k-1 in the first view (the draft
view of ``persona-judge-base``) and objective k in the second.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from personajudge.core.config import BackendConfig, DecodingConfig, RunConfig
from personajudge.core.methods import PersonaJudge
from personajudge.plugins import get_method, preference_library
from personajudge.preferences import Preference, resolve

from .dataset import PSOUPS
from .dimensions import DimensionScorer
from .errors import EvalError

#: The defaults of ``personajudge eval`` (a spec that keeps them needs no flag for them).
DEFAULT_PAIRS = ("concise,informative", "friendly,unfriendly")
DEFAULT_METHODS = "prompt,persona-judge"
DEFAULT_SCORERS = "length,flesch,vader"

SPEC_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Experiment(_Model):
    """One set of preference views (names from the library, or free-text descriptions)."""

    name: str
    views: list[list[str]]
    objectives: int | None = Field(None, description="k of an objectives experiment (Table 5).")

    @field_validator("views")
    @classmethod
    def _views(cls, v: list[list[str]]) -> list[list[str]]:
        if not v or any(not g for g in v):
            raise ValueError("every view needs at least one preference")
        for g in v:
            for p in g:
                if "|" in p or not p.strip():
                    raise ValueError(f"preference {p!r} must be non-empty and must not contain '|'")
        return v

    @property
    def preferences(self) -> list[str]:
        """The experiment's preferences, each once, in order."""
        out: list[str] = []
        for g in self.views:
            for p in g:
                if p not in out:
                    out.append(p)
        return out


def experiment_name(views: list[list[str]]) -> str:
    """``[[concise], [informative]]`` -> ``concise-vs-informative``; ``+`` joins a view's preferences."""
    return "-vs-".join("+".join(_short(p) for p in g) for g in views)


def _short(p: str) -> str:
    return p if len(p.split()) == 1 else Preference.free_text(p).name


def pair_experiment(spec: str) -> Experiment:
    """``A,B`` (or ``A+C,B``: a view carrying two preferences) -> an experiment with those views."""
    views = [[p.strip() for p in part.split("+") if p.strip()] for part in spec.split(",")]
    views = [v for v in views if v]
    if len(views) < 2:
        raise EvalError(f"--pair expects two comma-separated preferences (A,B), got {spec!r}")
    views = [[canonical(p) for p in v] for v in views]
    return Experiment(name=experiment_name(views), views=views)


def views_experiment(views: list[list[str]]) -> Experiment:
    views = [[canonical(p) for p in v] for v in views]
    return Experiment(name=experiment_name(views), views=views)


def objective_experiments(spec: str) -> list[Experiment]:
    """``A,B,C`` -> experiments for 1, 2, 3 objectives (see the module docstring)."""
    objs = [canonical(p.strip()) for p in spec.split(",") if p.strip()]
    if not objs:
        raise EvalError(f"--objectives expects comma-separated preferences, got {spec!r}")
    if len(set(objs)) != len(objs):
        raise EvalError(f"--objectives {spec!r} names a preference twice")
    out = []
    for k in range(1, len(objs) + 1):
        views = [[objs[0]], [objs[0]]] if k == 1 else [objs[: k - 1], [objs[k - 1]]]
        out.append(Experiment(name=experiment_name(views), views=views, objectives=k))
    return out


def canonical(p: str) -> str:
    """A library name or alias -> its canonical name; free text stays as given (PreferenceError if unknown)."""
    pref = resolve(p, preference_library())
    return pref.name if pref.source != "free text" else pref.description


class ScorerSpec(_Model):
    """A scorer of the run: ``alias`` names it in tables and ``--dimension``; ``name`` is the registered scorer."""

    alias: str
    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _default_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and "alias" not in data and "name" in data:
            data = {**data, "alias": data["name"]}
        return data


class EvalSpec(_Model):
    """Everything that determines an evaluation run (stored in ``run.json``)."""

    version: int = SPEC_VERSION
    dataset: str = PSOUPS
    limit: int | None = Field(None, ge=1)
    methods: list[str]
    baseline: str | None = "prompt"
    experiments: list[Experiment]
    lambdas: list[int] = Field(default_factory=list, description="Empty: the run config's lambda.")
    seeds: list[int] = Field(default_factory=lambda: [0])
    scorers: list[ScorerSpec] = Field(default_factory=list)
    dimensions: list[DimensionScorer] = Field(default_factory=list)
    batch_size: int = Field(1, ge=1)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _check(self) -> EvalSpec:
        if not self.methods:
            raise ValueError("methods: give at least one method")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("methods: a method is listed twice")
        if not self.experiments:
            raise ValueError("experiments: give at least one --pair, --objectives or --view")
        names = [e.name for e in self.experiments]
        if len(set(names)) != len(names):
            raise ValueError(f"experiments: duplicate experiment {sorted(n for n in names if names.count(n) > 1)[0]}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: give distinct seeds")
        if any(lam < 1 for lam in self.lambdas) or len(set(self.lambdas)) != len(self.lambdas):
            raise ValueError("lambdas: give distinct positive window lengths")
        aliases = [s.alias for s in self.scorers]
        if len(set(aliases)) != len(aliases):
            raise ValueError("scorers: a scorer alias is used twice")
        return self

    # -- derived --------------------------------------------------------------------------------
    @property
    def all_methods(self) -> list[str]:
        """The methods to generate: the baseline is always among them."""
        ms = list(self.methods)
        if self.baseline and self.baseline not in ms:
            ms.insert(0, self.baseline)
        return ms

    @property
    def sweep(self) -> list[int]:
        return list(self.lambdas) or [self.run.decoding.lambda_]

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def generation_settings(self) -> dict[str, Any]:
        """What decides a generation besides its key (prompt, experiment, method, lambda, seed)."""
        run = self.run.model_dump(mode="json", by_alias=True)
        run.pop("method", None)
        run.pop("preferences", None)
        run.pop("views", None)
        run["decoding"].pop("seed", None)
        run["decoding"].pop("lambda", None)
        return {"run": run, "batch_size": self.batch_size}

    def generation_hash(self) -> str:
        return _hash(self.generation_settings())


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def uses_lambda(method: str) -> bool:
    """Whether the method's output depends on the draft window (it is swept by ``--lambdas``).

    True for the Persona-judge family (subclasses of the core's PersonaJudge
    method) and for any method class with ``uses_lambda = True``; other methods
    run once, with the run's ``--lambda``.
    """
    cls = get_method(method)
    flag = getattr(cls, "uses_lambda", None)  # a method plugin can say so explicitly
    if flag is not None:
        return bool(flag)
    return isinstance(cls, type) and issubclass(cls, PersonaJudge)


def gen_key(prompt_id: str, experiment: str, method: str, lam: int | None, seed: int) -> str:
    return f"{prompt_id}|{experiment}|{method}|{'-' if lam is None else lam}|{seed}"


def variant_label(method: str, lam: int | None, sweep: bool) -> str:
    return f"{method} λ={lam}" if (sweep and lam is not None) else method


def diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two spec dumps."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        name = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(diff(a, b, name + "."))
        elif a != b:
            out.append(name)
    return out


def command_from_spec(spec, run_dir: str) -> list[str]:
    """A ``personajudge eval`` command line that reproduces ``spec`` (non-default flags only).

    ``method_options`` and ``encoder_options`` have no flags; a spec using them
    is reproduced with ``--resume`` on its run directory (or a ``--config`` file).
    """
    cmd = ["personajudge", "eval"]
    run = spec.run
    b, bd = run.backend, BackendConfig()
    val: object  # the flags' values are of several types; each is only compared and printed
    default: object
    for flag, val, default in (
        ("--backend", b.name, bd.name),
        ("--model", b.model, None),
        ("--device", b.device, None),
        ("--dtype", b.dtype, None),
        ("--threads", b.threads, None),
        ("--n-ctx", b.n_ctx, None),
        ("--n-gpu-layers", b.n_gpu_layers, None),
    ):
        if val != default:
            cmd += [flag, str(val)]
    for k, v in b.options.items():
        cmd += ["--backend-option", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    if run.encoder != "auto":
        cmd += ["--encoder", run.encoder]
    if run.system:
        cmd += ["--system", run.system]
    d, dd = run.decoding, DecodingConfig()
    for flag, val, default in (
        ("--temperature", d.temperature, dd.temperature),
        ("--top-k", d.top_k, dd.top_k),
        ("--top-p", d.top_p, dd.top_p),
        ("--max-new-tokens", d.max_new_tokens, dd.max_new_tokens),
        ("--roles", d.roles, None),
        ("--schedule", d.schedule, dd.schedule),
    ):
        if val != default:
            cmd += [flag, str(val)]
    if not spec.lambdas and d.lambda_ != dd.lambda_:
        cmd += ["--lambda", str(d.lambda_)]
    for s in d.stop:
        cmd += ["--stop", s]
    if spec.dataset != "psoups-koala-50":
        cmd += ["--dataset", spec.dataset]
    if spec.limit is not None:
        cmd += ["--limit", str(spec.limit)]
    if ",".join(spec.methods) != DEFAULT_METHODS:
        cmd += ["--methods", ",".join(spec.methods)]
    if spec.baseline != "prompt":
        cmd += ["--baseline", spec.baseline or "none"]
    pairs = [e for e in spec.experiments if not e.objectives]
    if [",".join("+".join(v) for v in e.views) for e in pairs] != list(DEFAULT_PAIRS) or len(pairs) != len(
        spec.experiments
    ):
        for e in pairs:
            cmd += ["--pair", ",".join("+".join(v) for v in e.views)]
    groups: list[list[str]] = []
    for e in spec.experiments:
        if e.objectives == 1:
            groups.append([e.views[0][0]])
        elif e.objectives and groups:
            groups[-1] = e.views[0] + e.views[1]
    for g in groups:
        cmd += ["--objectives", ",".join(g)]
    scorers = ",".join(s.name if s.alias == s.name else f"{s.alias}={s.name}" for s in spec.scorers) or "none"
    if scorers != DEFAULT_SCORERS:
        cmd += ["--scorers", scorers]
    for s in spec.scorers:
        for k, v in s.options.items():
            cmd += ["--scorer-option", f"{s.alias}.{k}={v if isinstance(v, str) else json.dumps(v)}"]
    for dim in spec.dimensions:
        cmd += ["--dimension", f"{dim.dimension}={dim.scorer}:{dim.direction}"]
    if spec.lambdas:
        cmd += ["--lambdas", ",".join(map(str, spec.lambdas))]
    cmd += ["--seed", str(spec.seeds[0])]
    if len(spec.seeds) > 1:
        cmd += ["--samples", str(len(spec.seeds))]
    if spec.batch_size != 1:
        cmd += ["--batch-size", str(spec.batch_size)]
    cmd += ["--run-dir", str(run_dir)]
    return cmd
