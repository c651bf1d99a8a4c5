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
import numbers
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from personajudge.core.config import BackendConfig, DecodingConfig, RunConfig, TypedErrors, validation_message
from personajudge.core.errors import PersonaJudgeError
from personajudge.core.methods import PersonaJudge
from personajudge.plugins import get_method, preference_library
from personajudge.preferences import Preference, lookup, resolve, view_names

from .dataset import PSOUPS
from .dimensions import DimensionScorer
from .errors import EvalError

#: The defaults of ``personajudge eval`` (a spec that keeps them needs no flag for them).
DEFAULT_PAIRS = ("concise,informative", "friendly,unfriendly")
DEFAULT_METHODS = "prompt,persona-judge"
DEFAULT_SCORERS = "length,flesch,vader"

SPEC_VERSION = 1

#: The version of the rows' fingerprints (``run.json``'s ``fingerprint``). Version 2 covers the views'
#: full preference definitions, the method and its options, and (batched) the batch's prompts; rows of
#: an older run directory cannot be checked against them and are never reused.
FINGERPRINT_VERSION = 2


class _Model(BaseModel, metaclass=TypedErrors):
    """Built directly (``Experiment(...)`` in a script), a bad value is an :class:`EvalError` naming the
    field; nested in a spec, pydantic's error with its location (``experiments.0.views``)."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def typed_error(cls, err: Any, kwargs: dict[str, Any]) -> Exception:
        return EvalError(f"invalid {cls.__name__.lower()}: {validation_message(err)}")


def _exact_int(v: Any) -> Any:
    """An integer as given: a numpy integer exactly (pydantic's lax int goes through a float, which
    changes seeds above 2**53 and refuses a uint64), never ``true`` or ``"3"`` (as RunConfig)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"must be an integer, got {v!r:.40}")
    return int(v)


class Experiment(_Model):
    """One set of preference views (names from the library, or free-text descriptions)."""

    name: str
    views: list[list[str]]
    objectives: int | None = Field(None, description="k of an objectives experiment (Table 5).")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip() or "|" in v:  # the name is part of every row key, whose fields '|' separates
            raise ValueError(f"experiment name {v!r} must be non-empty and must not contain '|'")
        return v

    @field_validator("views")
    @classmethod
    def _views(cls, v: list[list[str]]) -> list[list[str]]:
        if not v or any(not g for g in v):
            raise ValueError("every view needs at least one preference")
        for g in v:
            for p in g:
                # '|' is fine in a description (as in `generate --prefer`): keys carry its slug, not its text
                if not p.strip():
                    raise ValueError(f"preference {p!r} must be non-empty")
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


def experiment_name(views: list[list[str]], names: dict[str, str] | None = None) -> str:
    """``[[concise], [informative]]`` -> ``concise-vs-informative``; ``+`` joins a view's preferences.

    ``names``: the dimension name of each preference (:func:`preference_names` of the whole run);
    default: the names these views give on their own."""
    names = names or preference_names(p for g in views for p in g)
    return "-vs-".join("+".join(names[p] for p in g) for g in views)


def _short(p: str) -> str:
    return p if len(p.split()) == 1 else Preference.free_text(p).name


def _named_in_library(slug: str) -> bool:
    """Whether a registered preference has the name (or alias) ``slug``."""
    try:
        return lookup(slug, preference_library()) is not None
    except PersonaJudgeError:
        return False


def preference_names(prefs: Iterable[str]) -> dict[str, str]:
    """The dimension name of each preference: a one-word preference (a library name) is its own name,
    a description gets a slug of it (``answer like a pirate`` -> ``answer-like-a-pirate``).

    A slug keeps only ASCII letters and digits and at most 40 characters, so two different
    descriptions can share one (``answer like a pirate!``; every description without ASCII letters
    is ``custom``). Each such slug then gets a suffix made from its description's hash, so every
    preference of a run keeps a dimension (win-rate column, judge verdict, row key) of its own;
    names that collide in no run stay as they always were. A description whose slug is the name of
    a registered preference (``Concise :)`` -> ``concise``) gets the suffix too, in every run: its
    experiment and dimension are never named like the built-in one's (whose default scorer and
    stored rows are another preference's).
    """
    prefs = list(dict.fromkeys(prefs))
    short = {p: _short(p) for p in prefs}
    count = Counter(short.values())
    out = {
        p: f"{n}-{hashlib.sha256(p.encode()).hexdigest()[:6]}"
        if n != p and (count[n] > 1 or _named_in_library(n))
        else n
        for p, n in short.items()
    }
    taken: dict[str, str] = {}
    for p, n in out.items():
        if n in taken:  # a six-hex-digit hash collision, or a one-word preference spelled like a suffixed slug
            raise EvalError(f"preferences {taken[n]!r} and {p!r} both get the dimension name {n!r}; reword one")
        taken[n] = p
    return out


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


def _objective_list(e: Experiment) -> list[str]:
    """The ``--objectives`` list whose k-th step ``e`` is (its first k objectives)."""
    return [e.views[0][0]] if e.objectives == 1 else [*e.views[0], *e.views[1]]


def build_experiments(
    pairs: Sequence[str] = (),
    prefer: Sequence[str] | None = None,
    view: Sequence[str] | None = None,
    objectives: Sequence[str] = (),
) -> list[Experiment]:
    """The experiments of ``personajudge eval``'s flags, in this order: each ``--pair``, the
    ``--prefer`` experiment (one view per ``--prefer``), the ``--view`` experiment (one view per
    ``--view``), then each ``--objectives`` list's steps; the default pairs when there are none.

    Experiments are the same when their views are; each is kept once. A plain experiment whose
    views are also an objectives step (``--pair A,B --objectives A,B``) is that step, so it goes;
    objectives steps that two lists share (their first objective) are kept at their first place.
    Names are then given from the views with :func:`preference_names` of the whole run, so two
    different experiments never share a name (and never replace one another).
    """
    plain = [pair_experiment(p) for p in pairs]
    if prefer:
        plain.append(views_experiment([[p] for p in prefer]))
    if view:
        lib = preference_library()
        split = [view_names(v, lib) for v in view]  # generate --view's rule: a description keeps its commas
        for v, names in zip(view, split):
            if not names:
                raise EvalError(f"--view {v!r} names no preference; give one or more, comma-separated")
        plain.append(views_experiment(split))
    steps = [e for objs in objectives for e in objective_experiments(objs)]
    if not plain and not steps:
        plain = [pair_experiment(p) for p in DEFAULT_PAIRS]
    step_views = {json.dumps(e.views) for e in steps}
    seen: set[str] = set()
    kept = []
    for e in [*(e for e in plain if json.dumps(e.views) not in step_views), *steps]:
        if json.dumps(e.views) not in seen:
            seen.add(json.dumps(e.views))
            kept.append(e)
    return name_experiments(kept)


def name_experiments(experiments: Sequence[Experiment]) -> list[Experiment]:
    """``experiments`` named from their views with the dimension names of all of them together."""
    names = preference_names(p for e in experiments for p in e.preferences)
    return [e.model_copy(update={"name": experiment_name(e.views, names)}) for e in experiments]


def experiment_flags(experiments: Sequence[Experiment]) -> list[str] | None:
    """The ``--pair`` / ``--prefer`` / ``--view`` / ``--objectives`` flags that :func:`build_experiments`
    turns into exactly ``experiments`` (names and order included); None when no flags do (a spec
    built through the API in an order or with names the command line cannot give)."""
    flags: list[str] = []
    phase = 0  # the command line builds pairs, then the --prefer experiment, then the --view one
    plain = [e for e in experiments if not e.objectives]
    for e in plain:
        prefs = e.preferences
        if phase == 0 and len(e.views) >= 2 and not any("," in p or "+" in p for p in prefs):
            flags += ["--pair", ",".join("+".join(v) for v in e.views)]
        elif phase < 1 and all(len(v) == 1 for v in e.views):
            flags += [x for v in e.views for x in ("--prefer", v[0])]
            phase = 1
        elif phase < 2 and all(view_names(",".join(v), preference_library()) == v for v in e.views):
            flags += [x for v in e.views for x in ("--view", ",".join(v))]
            phase = 2
        else:
            return None
    lists: list[list[str]] = []
    for e in experiments[len(plain) :]:
        if not e.objectives:
            return None  # a plain experiment after an objectives step
        objs = _objective_list(e)
        if lists and objs[:-1] == lists[-1]:
            lists[-1] = objs  # the next step of the same list
        else:
            lists.append(objs)  # a new list (its first steps are those of an earlier one)
    for objs in lists:
        if any("," in p for p in objs):
            return None
        flags += ["--objectives", ",".join(objs)]
    try:
        rebuilt = build_experiments(
            pairs=[flags[i + 1] for i in range(0, len(flags), 2) if flags[i] == "--pair"],
            prefer=[flags[i + 1] for i in range(0, len(flags), 2) if flags[i] == "--prefer"],
            view=[flags[i + 1] for i in range(0, len(flags), 2) if flags[i] == "--view"],
            objectives=[flags[i + 1] for i in range(0, len(flags), 2) if flags[i] == "--objectives"],
        )
    except (PersonaJudgeError, ValueError):
        return None
    if [e.model_dump() for e in rebuilt] != [e.model_dump() for e in experiments]:
        return None
    if [e.views for e in rebuilt] == [[[a], [b]] for a, b in (p.split(",") for p in DEFAULT_PAIRS)] and all(
        f == "--pair" for f in flags[::2]
    ):
        return []  # the default
    return flags


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


class EvalSpec(_Model, metaclass=TypedErrors):
    """Everything that determines an evaluation run (stored in ``run.json``).

    Built directly, a bad value is an :class:`EvalError`, one line naming the field (as the CLI says it);
    ``model_validate`` keeps pydantic's error for the readers that name the file it came from."""

    @classmethod
    def typed_error(cls, err: Any, kwargs: dict[str, Any]) -> Exception:
        return EvalError(f"invalid evaluation: {validation_message(err)}")

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
    method_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Each method's options (method name -> options); a method not named here takes none.",
    )
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="before")
    @classmethod
    def _run_method_options(cls, data: Any) -> Any:
        """``run.method_options`` (a spec of an earlier version, or a config file's) went to every
        method of the run: kept so, as each method's own, which is what decided its rows. The run's
        own ``method_options`` is then empty (a method's options live in ``method_options``)."""
        if not isinstance(data, dict) or data.get("method_options"):
            return data
        run = data.get("run")
        opts = run.get("method_options") if isinstance(run, dict) else getattr(run, "method_options", None)
        if not opts or not isinstance(opts, dict):
            return data
        methods = data.get("methods")
        if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
            return data
        baseline = data.get("baseline", "prompt")
        every = [*([baseline] if isinstance(baseline, str) and baseline not in methods else []), *methods]
        run = (
            run.model_copy(update={"method_options": {}})
            if isinstance(run, RunConfig)
            else {**cast(dict, run), "method_options": {}}
        )
        return {**data, "run": run, "method_options": {m: dict(opts) for m in every}}

    @field_validator("limit", "batch_size", mode="before")
    @classmethod
    def _exact(cls, v: Any) -> Any:
        return v if v is None else _exact_int(v)

    @field_validator("seeds", "lambdas", mode="before")
    @classmethod
    def _exact_list(cls, v: Any) -> Any:
        if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):  # a numpy array of seeds
            v = v.tolist()
        return [_exact_int(x) for x in v] if isinstance(v, (list, tuple)) else v

    @model_validator(mode="after")
    def _options_of_run_methods(self) -> EvalSpec:
        if self.run.method_options:
            raise ValueError(
                "give method options per method, in method_options ({'mod': {'weights': [0.7, 0.3]}}), "
                "not in run.method_options"
            )
        stray = [m for m in self.method_options if m not in self.all_methods]
        if stray:
            raise ValueError(
                f"method_options names {stray[0]!r}, which is not one of the run's methods "
                f"({', '.join(self.all_methods)})"
            )
        return self

    # Each rule is a field's (not the model's), so its message names the field: ``methods: a method
    # is listed twice``, never pydantic's ``value:`` of a model-wide error.
    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one method")
        if len(set(v)) != len(v):
            raise ValueError(f"method {_first_twice(v)!r} is listed twice")
        return v

    @field_validator("experiments")
    @classmethod
    def _experiments(cls, v: list[Experiment]) -> list[Experiment]:
        if not v:
            raise ValueError("give at least one --pair, --objectives or --view")
        names = [e.name for e in v]
        if len(set(names)) != len(names):
            raise ValueError(
                f"two experiments are named {_first_twice(names)!r}; give them distinct names "
                "(personajudge.evaluation.name_experiments names experiments from their views)"
            )
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v):
            raise ValueError("give distinct seeds")
        if negative := [s for s in v if s < 0]:  # what RunConfig refuses, refused before run.json is written
            raise ValueError(f"seeds are 0 or more (got {negative[0]})")
        return v

    @field_validator("lambdas")
    @classmethod
    def _lambdas(cls, v: list[int]) -> list[int]:
        if any(lam < 1 for lam in v) or len(set(v)) != len(v):
            raise ValueError("give distinct positive window lengths")
        return v

    @field_validator("scorers")
    @classmethod
    def _scorers(cls, v: list[ScorerSpec]) -> list[ScorerSpec]:
        aliases = [s.alias for s in v]
        if len(set(aliases)) != len(aliases):
            raise ValueError(f"the scorer alias {_first_twice(aliases)!r} is used twice")
        return v

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

    @property
    def dimension_names(self) -> dict[str, str]:
        """Each preference of the run -> its dimension name (:func:`preference_names`)."""
        return preference_names(p for e in self.experiments for p in e.preferences)

    def baseline_key(self, prompt_id: str, experiment: str, method: str, lam: int | None, seed: int) -> str | None:
        """The generation key of the baseline response a generation is compared with (None: the
        baseline itself, or no baseline). A baseline that uses λ is taken at the generation's λ,
        or at the sweep's first for a method without one."""
        if not self.baseline or method == self.baseline:
            return None
        blam = None
        if uses_lambda(self.baseline):
            blam = lam if lam is not None else self.sweep[0]
        return gen_key(prompt_id, experiment, self.baseline, blam, seed)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def generation_settings(self) -> dict[str, Any]:
        """What decides every generation of the run besides its key (prompt, experiment, method,
        lambda, seed); what decides one method's generations in one experiment (the views' preference
        definitions, the method's options) is :meth:`job_settings`'s."""
        run = self.run.model_dump(mode="json", by_alias=True)
        run.pop("method", None)
        run.pop("preferences", None)
        run.pop("views", None)
        run.pop("method_options", None)
        run["decoding"].pop("seed", None)
        run["decoding"].pop("lambda", None)
        return {"run": run, "batch_size": self.batch_size}

    def generation_hash(self) -> str:
        return _hash(self.generation_settings())

    def job_settings(self, method: str, views: list[list[str]]) -> dict[str, Any]:
        """What decides ``method``'s generations for an experiment besides :meth:`generation_settings`:
        the method, its options, and the full definition of every preference of the views it gets
        (names, descriptions, instructions, weights, examples -- a reworded description or a
        plugin's changed preference is another row, though its slug or name is the same)."""
        lib = preference_library()
        return {
            "method": method,
            "method_options": self.method_options.get(method, {}),
            "views": [[resolve(p, lib).definition() for p in v] for v in views],
        }

    def method_config(self, method: str) -> RunConfig:
        """The run config that ``method`` generates with (its own options)."""
        return self.run.model_copy(
            update={"method": method, "method_options": dict(self.method_options.get(method, {}))}
        )


def _first_twice(items: list[str]) -> str:
    return next(x for i, x in enumerate(items) if x in items[:i])


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def job_hash(settings: dict[str, Any]) -> str:
    """The hash of :meth:`EvalSpec.job_settings` that a row's fingerprint carries."""
    return _hash(settings)


def batch_mates(shas: list[str], index: int, batch_size: int) -> list[str]:
    """The prompt hashes of the batch the ``index``-th prompt is generated in. Batches are cut from
    the run's whole prompt list (the same in an interrupted and an uninterrupted run), in chunks of
    ``batch_size``: batched rows on llama.cpp or transformers depend on their batch's other rows."""
    start = index - index % batch_size
    return shas[start : start + batch_size]


def row_fingerprint(gen_hash: str, sha: str, job: str, mates: list[str] | None) -> str:
    """A generation row's fingerprint: the run's generation settings, the prompt text, the job's
    views/method/options (:func:`job_hash`) and, when batched, the hash of its batch's prompts."""
    fp = f"{gen_hash}:{sha}:{job}"
    return fp if not mates or len(mates) < 2 else f"{fp}:b{_hash(mates)}"


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


def resume_command(run_dir: str) -> list[str]:
    """The command that continues (or repeats) the run stored in ``run_dir``, whatever its spec."""
    return ["personajudge", "eval", "--resume", "--run-dir", str(run_dir)]


def _option_text(v: Any) -> str:
    """A ``KEY=VALUE`` flag's VALUE that the command line parses back to ``v`` (it reads JSON when it
    can: a string that looks like JSON, ``"2"``, is written quoted)."""
    if isinstance(v, str):
        try:
            json.loads(v)
        except (ValueError, RecursionError):
            return v
    return json.dumps(v)


def command_from_spec(spec: EvalSpec, run_dir: str) -> list[str]:
    """A ``personajudge eval`` command line that reproduces ``spec`` (non-default flags only).

    Settings that no flag can give (``encoder_options``, ``decoding.repeat_lines``, or experiments
    named or ordered in a way the command line does not make them) give
    :func:`resume_command` instead, which repeats the run from its ``run.json``.
    """
    run = spec.run
    d, dd = run.decoding, DecodingConfig()
    experiment_args = experiment_flags(spec.experiments)
    consecutive = spec.seeds == list(range(spec.seeds[0], spec.seeds[0] + len(spec.seeds)))  # --samples
    if run.encoder_options or d.repeat_lines != dd.repeat_lines or experiment_args is None or not consecutive:
        return resume_command(run_dir)
    cmd = ["personajudge", "eval"]
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
        cmd += ["--backend-option", f"{k}={_option_text(v)}"]
    for m, opts in spec.method_options.items():
        for k, v in opts.items():
            cmd += ["--method-option", f"{m}.{k}={_option_text(v)}"]
    if run.encoder != "auto":
        cmd += ["--encoder", run.encoder]
    if run.system:
        cmd += ["--system", run.system]
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
    for stop in d.stop:
        cmd += ["--stop", stop]
    if spec.dataset != PSOUPS:
        cmd += ["--dataset", spec.dataset]
    if spec.limit is not None:
        cmd += ["--limit", str(spec.limit)]
    if ",".join(spec.methods) != DEFAULT_METHODS:
        cmd += ["--methods", ",".join(spec.methods)]
    if spec.baseline != "prompt":
        cmd += ["--baseline", spec.baseline or "none"]
    cmd += experiment_args
    scorers = ",".join(s.name if s.alias == s.name else f"{s.alias}={s.name}" for s in spec.scorers) or "none"
    if scorers != DEFAULT_SCORERS:
        cmd += ["--scorers", scorers]
    for sc in spec.scorers:
        for k, v in sc.options.items():
            cmd += ["--scorer-option", f"{sc.alias}.{k}={_option_text(v)}"]
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


#: settings of ``spec.run`` that decide nothing in an evaluation: each generation gets its method,
#: views and seed from the spec (``methods``, ``experiments``, ``seeds``), so a change in them is no
#: change of the run (a ``--config`` file's ``decoding.seed`` is the first seed, nothing more)
IGNORED_RUN_FIELDS = ("method", "preferences", "views", "decoding.seed")


def comparable(dump: Any) -> Any:
    """A spec dump without :data:`IGNORED_RUN_FIELDS` (what two runs are compared on)."""
    out = json.loads(json.dumps(dump))
    run = out.get("run") if isinstance(out, dict) else None
    if isinstance(run, dict):
        for name in IGNORED_RUN_FIELDS:
            *parents, leaf = name.split(".")
            table: Any = run
            for part in parents:
                table = table.get(part) if isinstance(table, dict) else None
            if isinstance(table, dict):
                table.pop(leaf, None)
    return out
