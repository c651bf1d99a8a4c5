"""Resumable evaluation runs.

A run directory holds:

- ``run.json``: the run's :class:`EvalSpec`, prompt ids and hashes, and the
  command that started it. Starting again with a different spec is an error
  (:class:`RunMismatchError`) unless ``force``: then ``run.json`` is replaced
  and every stored row still valid under the new settings is reused.
- ``generations.jsonl``: one row per (prompt id, experiment, method, lambda,
  seed), appended (flush + fsync) as soon as it is generated.
- ``scores.jsonl``: one row per (generation, scorer) -- and per dimension for
  pairwise scorers -- appended as soon as it is scored.
- ``report.md``, ``report.json`` and PNG plots, rebuilt from the JSONL files.

Rows carry a fingerprint of what produced them: the generation settings, the prompt
text, the full definitions of the preferences of the views the method got, the method and its
options, and, with ``batch_size`` > 1, the prompts of the row's batch (batches are cut from the
whole plan, so a resumed run batches exactly as an uninterrupted one); scores add the scorer's
options (for a pairwise judge: which judge, and the baseline response's fingerprint; its key names
the baseline generation). So a row is reused only where it would be reproduced. Rows of a run
directory written before fingerprints covered all of this (no ``fingerprint`` in ``run.json``) are
never reused: such a directory is refused unless ``force``, which regenerates them. Interrupted at
any instant -- Ctrl-C, an exception, SIGKILL -- the same command continues where it stopped:
finished rows are skipped, a torn last line is dropped, nothing is duplicated.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import numbers
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from personajudge.api import PersonaJudge, make_method
from personajudge.core.config import build_config
from personajudge.core.errors import ContextLengthError, PersonaJudgeError, PersonaJudgeWarning, PluginError
from personajudge.core.files import os_error_text
from personajudge.distributed import RayOptions, ReplicaPool, Task
from personajudge.plugins import get_method, preference_library
from personajudge.plugins.manager import guarded
from personajudge.preferences import resolve

from .dataset import PromptItem, load_prompts
from .dimensions import DimensionScorer, dimension_table
from .errors import EvalError, RunMismatchError
from .report import REPORT_FILES, write_report
from .scorers import PairItem, PairResult, PairwiseScorer, PointwiseScorer, ScoringContext, get_scorer_class
from .spec import (
    FINGERPRINT_VERSION,
    EvalSpec,
    Experiment,
    batch_mates,
    command_from_spec,
    comparable,
    diff,
    gen_key,
    job_hash,
    row_fingerprint,
    uses_lambda,
    variant_label,
)
from .store import (
    GENERATIONS,
    RUN_FILE,
    SCORES,
    JsonlStore,
    RunLock,
    load_rows,
    read_run_file,
    read_run_spec,
    write_json_atomic,
)


@dataclass
class GenJob:
    prompt: PromptItem
    experiment: Experiment
    method: str
    lam: int | None
    seed: int
    key: str
    variant: str
    views: list[list[str]]


@dataclass
class RunResult:
    run_dir: Path
    generated: int = 0
    reused: int = 0
    failed: int = 0
    scored: int = 0
    report: dict[str, Path] = field(default_factory=dict)


def _json_number(value: float) -> float | None:
    """A score as standard JSON: NaN (an undefined score, e.g. Flesch of an empty text) is ``null``
    (readers take ``null`` and, from older files, the non-standard ``NaN`` token as NaN)."""
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _backend_of(record: dict[str, Any]) -> Any:
    """The backend settings of a run.json record (or of one of its ``previous`` entries), if any."""
    spec = record.get("spec")
    run = spec.get("run") if isinstance(spec, dict) else None
    return run.get("backend") if isinstance(run, dict) else None


def _list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else []


def load_spec(run_dir: str | Path) -> EvalSpec:
    return read_run_spec(run_dir)[1]


def _normalized(spec: Any) -> Any:
    """A stored spec as this version dumps it (new fields at their defaults, a ``run.method_options``
    as each method's own), so an unchanged run is not taken for a changed one; as stored when it is
    no valid spec."""
    if not isinstance(spec, dict):
        return spec
    try:
        return EvalSpec.model_validate(spec).dump()
    except (ValueError, PersonaJudgeError):
        return spec


def judge_text(identity: dict[str, Any]) -> str:
    """A scorer's identity (:meth:`Scorer.identity_for`) in words: ``http judge judge-xl at URL``."""
    return ", ".join(f"{k} {v}" for k, v in identity.items() if v is not None)


# -- planning ------------------------------------------------------------------------------------


def aspect_of(pref: str, name: str) -> tuple[str, str]:
    """(dimension name, aspect text for a judge) of a preference whose dimension name is ``name``."""
    p = resolve(pref, preference_library())
    if p.source == "free text":
        return name, p.description
    return name, f"{p.name} ({p.description.rstrip('.')})"


def method_views(method: str, experiment: Experiment, spec: EvalSpec) -> list[list[str]]:
    """The views a method gets: multi-view methods the experiment's views, single-view methods all of
    the experiment's preferences at once (each once)."""
    cfg = build_config(spec.method_config(method).model_dump(by_alias=True))
    planned = make_method(cfg).plan([list(v) for v in experiment.views])
    return [experiment.preferences] if len(planned) == 1 else [list(v) for v in experiment.views]


def plan_generations(spec: EvalSpec, prompts: list[PromptItem]) -> list[GenJob]:
    """Every generation of the run, prompt-major (an interrupted run has whole prompts done)."""
    sweep = spec.sweep
    many = len(sweep) > 1
    lam_of = {m: (sweep if uses_lambda(m) else [None]) for m in spec.all_methods}
    views = {(m, e.name): method_views(m, e, spec) for m in spec.all_methods for e in spec.experiments}
    jobs = []
    for item in prompts:
        for exp in spec.experiments:
            for seed in spec.seeds:
                for m in spec.all_methods:
                    for lam in lam_of[m]:
                        jobs.append(
                            GenJob(
                                item,
                                exp,
                                m,
                                lam,
                                seed,
                                gen_key(item.id, exp.name, m, lam, seed),
                                variant_label(m, lam, many),
                                views[(m, exp.name)],
                            )
                        )
    return jobs


def job_fingerprints(spec: EvalSpec) -> dict[str, dict[str, str]]:
    """experiment -> method -> the hash of what decides that method's rows in that experiment
    (:meth:`EvalSpec.job_settings`); recorded in ``run.json`` so that the report checks rows without
    loading method plugins."""
    return {
        e.name: {m: job_hash(spec.job_settings(m, method_views(m, e, spec))) for m in spec.all_methods}
        for e in spec.experiments
    }


def baseline_key(spec: EvalSpec, job: GenJob) -> str | None:
    return spec.baseline_key(job.prompt.id, job.experiment.name, job.method, job.lam, job.seed)


def resolved_dimensions(spec: EvalSpec) -> list[DimensionScorer]:
    return dimension_table(
        list(spec.dimensions), {s.alias: s.name for s in spec.scorers}, spec.dimension_names.values()
    )


def validate_spec(spec: EvalSpec) -> dict[str, str]:
    """Check methods (with their options), scorers and dimensions before anything is loaded; returns
    scorer alias -> hash."""
    for m in spec.all_methods:
        get_method(m)
        make_method(build_config(spec.method_config(m).model_dump(by_alias=True)))  # a bad option, named
    hashes = {}
    for s in spec.scorers:
        cls = get_scorer_class(s.name)
        hashes[s.alias] = cls.config_hash_for(cls.validate(dict(s.options)))
    resolved_dimensions(spec)
    for pref, name in spec.dimension_names.items():
        aspect_of(pref, name)
    return hashes


def scorer_identities(spec: EvalSpec) -> dict[str, dict[str, Any]]:
    """alias -> what the scorer resolved to where its options leave it open (a pairwise judge's kind,
    model and endpoint, from the environment); only scorers that say (:meth:`Scorer.identity_for`)."""
    out = {}
    for s in spec.scorers:
        cls = get_scorer_class(s.name)
        ident = cls.identity_for(cls.validate(dict(s.options)))
        if ident:
            out[s.alias] = ident
    return out


#: Warnings of single generations that an evaluation gives by design: ``--objectives``' first step puts
#: its objective in both views, and ``base`` is the unpersonalized method. Advice to the user of one
#: ``generate`` call, which the user of ``eval`` cannot follow.
_BY_DESIGN = (r"views \d+ and \d+ carry the same preferences", r"method '.*' ignores preferences")


# -- the run -------------------------------------------------------------------------------------


def make_run_dir(run_dir: Path) -> None:
    """Create the run directory; a path that cannot be one (a file, a read-only or missing parent) is
    an :class:`EvalError` naming it, not an ``OSError`` traceback."""
    if run_dir.exists() and not run_dir.is_dir():
        raise EvalError(f"--run-dir {run_dir} is a file, not a directory; give a directory for the run")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EvalError(f"cannot create the run directory {run_dir}: {os_error_text(err)}") from None


class Runner:
    """Generates, scores and reports one run directory."""

    def __init__(
        self,
        spec: EvalSpec,
        run_dir: str | Path,
        *,
        force: bool = False,
        progress: bool = True,
        pj: Any = None,
        argv: list[str] | None = None,
        on_generation: Callable[[dict], None] | None = None,
        on_score: Callable[[dict], None] | None = None,
        ray: RayOptions | None = None,
    ):
        self.spec = spec
        self.ray = ray  # generate on Ray replicas (personajudge.distributed); rows are written here as locally
        self.model_info: dict | None = None
        self.run_dir = Path(run_dir)
        self.force = force
        self.progress = progress
        self.pj = pj
        self._own_pj = False
        self.argv = argv
        self.on_generation = on_generation
        self.on_score = on_score
        self._check_dataset_path()
        self.prompts = load_prompts(spec.dataset, spec.limit)
        self.scorer_hashes = validate_spec(spec)
        self.scorer_ids = scorer_identities(spec)
        self.gen_hash = spec.generation_hash()
        self.job_fps = job_fingerprints(spec)
        self._shas = [p.sha for p in self.prompts]
        self._index = {p.id: i for i, p in enumerate(self.prompts)}
        self._method_pjs: dict[str, Any] = {}
        if ray is not None and spec.method_options:
            raise EvalError(
                "--ray replicas generate with the run's own settings: method options "
                "(--method-option / EvalSpec.method_options) are not supported with --ray; run without --ray"
            )

    def _check_dataset_path(self) -> None:
        """A prompts file that is one of the files the run writes (``--dataset col/report.json --run-dir
        col``) would be replaced by the report or appended to, and the run never repeated: refused, even
        with ``force``."""
        dataset = Path(self.spec.dataset)
        if not dataset.is_file():  # a named dataset (psoups), or a path load_prompts reports on
            return
        where = dataset.resolve()
        for name in (RUN_FILE, GENERATIONS, SCORES, *REPORT_FILES):
            if where == (self.run_dir / name).resolve():
                raise EvalError(
                    f"the dataset {self.spec.dataset} is this run's own {name}, which the run writes; "
                    f"move it out of {self.run_dir}, or choose another --run-dir"
                )

    # run.json -----------------------------------------------------------------------------------
    def _run_record(self) -> dict[str, Any]:
        return {"spec": self.spec.dump(), "prompts": [{"id": p.id, "sha": p.sha} for p in self.prompts]}

    def _check_run_file(self) -> dict[str, Any]:
        path = self.run_dir / RUN_FILE
        new = self._run_record()
        if not path.exists():
            # a new run, unless the folder holds files a run appends to or replaces: someone else's
            # (before, their last line was cut as a torn row, rows were appended, a report.md replaced)
            held = [n for n in (GENERATIONS, SCORES, *REPORT_FILES) if (self.run_dir / n).exists()]
            if held and not self.force:
                raise EvalError(
                    f"{self.run_dir} holds {', '.join(held)} but no {RUN_FILE}: it is not a run directory, and "
                    "a run would append to or replace them; choose a new or empty --run-dir, or pass --force "
                    "to use this one"
                )
            return {**new, "created": _now()}
        try:
            old = read_run_file(self.run_dir)
        except EvalError as err:
            if not self.force:
                raise EvalError(
                    f"{err}; pass --force to replace it (rows of the JSONL files that are still valid are reused)"
                ) from None
            old = {}  # not a record of ours: replaced, as --force says
        gens_file = self.run_dir / GENERATIONS
        if (
            old.get("fingerprint") != FINGERPRINT_VERSION
            and gens_file.exists()
            and gens_file.stat().st_size
            and not self.force
        ):
            raise RunMismatchError(
                f"{self.run_dir} was written by an earlier persona-judge, whose row fingerprints do not cover "
                "the preferences' definitions, the methods' options and the batches, so none of its rows can "
                f"be reused safely; pass --force to regenerate them here (`personajudge report {self.run_dir}` "
                "still reports the stored rows), or use a new --run-dir"
            )
        changed = diff(
            {"spec": comparable(_normalized(old.get("spec", {}))), "prompts": old.get("prompts")},
            {"spec": comparable(new["spec"]), "prompts": new["prompts"]},
        )
        old_ids = old.get("scorer_identities")
        judges = []
        if isinstance(old_ids, dict):
            for alias, ident in self.scorer_ids.items():
                if alias in old_ids and old_ids[alias] != ident and "spec.scorers" not in changed:
                    was = judge_text(old_ids[alias]) if isinstance(old_ids[alias], dict) else str(old_ids[alias])
                    judges.append(f"scorer '{alias}' was {was}, now {judge_text(ident)}")
                    changed.append(f"scorer_identities.{alias}")
        if judges and not self.force:
            raise RunMismatchError(
                f"{self.run_dir} holds a run judged by another judge ({'; '.join(judges)}); set the judge "
                "as when the run started (PERSONAJUDGE_JUDGE_BASE_URL, PERSONAJUDGE_JUDGE_MODEL or "
                "--scorer-option), or pass --force to judge again with this one"
            )
        if changed and not self.force:
            shown = ", ".join(c.removeprefix("spec.") for c in changed[:6]) + (" ..." if len(changed) > 6 else "")
            # --resume reruns the stored configuration over the dataset file as it is now: no way back
            # to prompts that were edited since (it failed with this same message)
            back = (
                f"restore the dataset file {self.spec.dataset} as it was"
                if "prompts" in changed
                else f"rerun the original command, continue it with `personajudge eval --resume --run-dir {self.run_dir}`"
            )
            raise RunMismatchError(
                f"{self.run_dir} holds a run with a different configuration (changed: {shown}); {back}, "
                "or pass --force to switch this directory to the new configuration (rows that are still "
                "valid are reused)"
            )
        replaced = {"spec": old.get("spec"), "replaced": _now()}
        if "model" in old:
            replaced["model"] = old["model"]
        record = {
            **new,
            "created": old["created"] if isinstance(old.get("created"), str) else _now(),
            "previous": _list(old.get("previous")) + ([replaced] if changed else []),
        }
        # The model that produced the stored rows: a rerun that reuses every row loads no model, so
        # without this the report header would lose it. Taken from the latest record (this one or a
        # replaced one) with the same backend settings, which pick the model; a run switched to
        # another model gets none here, and describes the one it loads.
        backend = new["spec"]["run"]["backend"]
        for rec in [old, *reversed(record["previous"])]:
            if isinstance(rec, dict) and "model" in rec and _backend_of(rec) == backend:
                record["model"] = rec["model"]
                break
        return record

    def _discard_if_empty(self) -> None:
        """A new run that stops before its first row (a mistyped ``--model``, a Ctrl-C while the model loads)
        leaves no ``run.json``, as a batch leaves no partial file: its record would make the corrected
        command "a different configuration", refused without ``--force``. A run with any row is kept."""
        files = [self.run_dir / n for n in (GENERATIONS, SCORES)]
        if any(p.exists() and p.stat().st_size for p in files):
            return
        for p in (*files, self.run_dir / RUN_FILE):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def _write_run_file(self, record: dict[str, Any]) -> None:
        record = dict(record)
        record.update(
            {
                "fingerprint": FINGERPRINT_VERSION,
                "generation_hash": self.gen_hash,
                "row_fingerprints": self.job_fps,
                "batch_size": self.spec.batch_size,
                "scorer_hashes": self.scorer_hashes,
                "scorer_identities": self.scorer_ids,
                "dimensions": [d.model_dump() for d in resolved_dimensions(self.spec)],
                "updated": _now(),
            }
        )
        if self.argv is not None:
            record["command"] = self.argv
        else:
            record["command"] = command_from_spec(self.spec, str(self.run_dir))
        write_json_atomic(self.run_dir / RUN_FILE, record)

    # generation ---------------------------------------------------------------------------------
    def gen_fp(self, job: GenJob) -> str:
        bs = self.spec.batch_size
        mates = batch_mates(self._shas, self._index[job.prompt.id], bs) if bs > 1 else None
        return row_fingerprint(self.gen_hash, job.prompt.sha, self.job_fps[job.experiment.name][job.method], mates)

    def score_fp(self, job: GenJob, h: str, base: GenJob | None = None) -> str:
        """A score row's fingerprint: its generation's and the scorer's; a pairwise verdict also the
        baseline response's (a verdict on another baseline response is another verdict)."""
        fp = f"{self.gen_fp(job)}:{h}"
        return fp if base is None else f"{fp}@{self.gen_fp(base)}"

    def _load_model(self):
        if self.pj is None:
            self.pj = PersonaJudge(self.spec.run)
            self._own_pj = True
            try:  # one untimed call, so the first timed response does not pay for warm-up
                self.pj.generate("Hello.", preferences=[], views=None, method="base", max_new_tokens=2, seed=0)
            except PersonaJudgeError:
                pass
        return self.pj

    def _pj_for(self, method: str):
        """The model that generates ``method``'s rows: the loaded one, or for a method with options one
        that shares its backend (method options are a run's setting, not a call's)."""
        pj = self._load_model()
        if not self.spec.method_options.get(method):
            return pj
        if method not in self._method_pjs:
            self._method_pjs[method] = PersonaJudge(self.spec.method_config(method), backend=pj.backend)
        return self._method_pjs[method]

    def _row(self, job: GenJob, res: Any = None, error: str | None = None, batch: int = 1) -> dict[str, Any]:
        row: dict[str, Any] = {
            "key": job.key,
            "fp": self.gen_fp(job),
            "prompt_id": job.prompt.id,
            "experiment": job.experiment.name,
            "method": job.method,
            "lambda": job.lam,
            "seed": job.seed,
            "variant": job.variant,
        }
        if error is not None:
            row.update({"error": error, "text": ""})
        else:
            st = res.stats
            row.update(
                {
                    "text": res.text,
                    "n_tokens": len(res.tokens),
                    "finish_reason": res.finish_reason,
                    "wall_time_s": st.wall_time_s / batch,
                    "tokens_per_s": st.tokens_per_s * batch,
                    "acceptance_rate": st.acceptance_rate,
                    "drafted": st.drafted,
                    "accepted": st.accepted,
                    "prompt_tokens": list(st.prompt_tokens),
                    "views": st.views,
                    "batch": batch,
                }
            )
        row["created"] = _now()
        return row

    def _generate_one(self, pj, job: GenJob) -> dict[str, Any]:
        kw: dict[str, Any] = {"seed": job.seed}
        if job.lam is not None:
            kw["lam"] = job.lam
        try:
            res = pj.generate(job.prompt.prompt, views=job.views, method=job.method, **kw)
        except ContextLengthError as err:
            return self._row(job, error=str(err))
        return self._row(job, res)

    def _generate_batch(self, pj, jobs: list[GenJob]) -> list[dict[str, Any]]:
        j0 = jobs[0]
        kw: dict[str, Any] = {}
        if j0.lam is not None:
            kw["lam"] = j0.lam
        try:
            results = pj.generate_batch(
                [j.prompt.prompt for j in jobs], views=j0.views, method=j0.method, seeds=[j.seed for j in jobs], **kw
            )
        except ContextLengthError:
            return [self._generate_one(pj, j) for j in jobs]  # find the one that does not fit
        return [self._row(j, r, batch=len(jobs)) for j, r in zip(jobs, results)]

    def _batches(self, jobs: list[GenJob], pending: list[GenJob]) -> Iterable[list[GenJob]]:
        """The batches that hold a pending job, cut from the whole plan ``jobs`` (same experiment,
        method, λ and seed; prompts in order, ``batch_size`` at a time; see :func:`batch_mates`), so
        an interrupted run's batches are those of an uninterrupted one. A batch is generated whole:
        its rows that are already stored come out the same, and are not written twice."""
        if self.spec.batch_size == 1:
            for j in pending:
                yield [j]
            return
        todo = {id(j) for j in pending}
        groups: dict[tuple, list[GenJob]] = {}
        for j in jobs:  # same experiment/method/lambda/seed: one batched call over prompts
            groups.setdefault((j.experiment.name, j.method, j.lam, j.seed), []).append(j)
        for g in groups.values():
            for i in range(0, len(g), self.spec.batch_size):
                batch = g[i : i + self.spec.batch_size]
                if any(id(j) in todo for j in batch):
                    yield batch

    def generate(self, gens: JsonlStore, jobs: list[GenJob], result: RunResult) -> None:
        pending = [j for j in jobs if (j.key, self.gen_fp(j)) not in gens]
        result.reused = len(jobs) - len(pending)
        if not pending:
            return
        with warnings.catch_warnings():
            for pattern in _BY_DESIGN:
                warnings.filterwarnings("ignore", message=pattern, category=PersonaJudgeWarning)
            if self.ray is not None:
                return self._generate_ray(gens, jobs, pending, result)
            self._generate_local(gens, jobs, pending, result)

    def _generate_local(self, gens: JsonlStore, jobs: list[GenJob], pending: list[GenJob], result: RunResult) -> None:
        from tqdm import tqdm

        bar = tqdm(
            total=len(pending),
            desc="generate",
            unit="gen",
            file=sys.stderr,
            disable=None if self.progress else True,  # drawn only on a terminal
            initial=0,
            dynamic_ncols=True,
        )
        try:
            for batch in self._batches(jobs, pending):
                bar.set_postfix_str(f"{batch[0].experiment.name} {batch[0].variant}", refresh=False)
                pj = self._pj_for(batch[0].method)
                rows = [self._generate_one(pj, batch[0])] if len(batch) == 1 else self._generate_batch(pj, batch)
                new = 0
                for row in rows:
                    if gens.append(row):
                        new += 1
                        result.generated += 1
                        result.failed += "error" in row
                        if self.on_generation is not None:
                            self.on_generation(row)
                bar.update(new)
        finally:
            bar.close()

    def _generate_ray(self, gens: JsonlStore, jobs: list[GenJob], pending: list[GenJob], result: RunResult) -> None:
        """The same batches as locally, run on Ray replicas; rows appended here as each batch comes back."""
        assert self.ray is not None  # called only with Ray options
        batches = list(self._batches(jobs, pending))
        tasks = []
        for i, batch in enumerate(batches):
            j0 = batch[0]
            opts: dict[str, Any] = {"views": j0.views, "method": j0.method}
            if j0.lam is not None:
                opts["lam"] = j0.lam
            tasks.append(
                Task(
                    i,
                    [j.prompt.prompt for j in batch],
                    [j.seed for j in batch],
                    opts,
                    single=len(batch) == 1,
                    isolate_context_errors=True,
                )
            )
        from tqdm import tqdm

        bar = tqdm(
            total=len(pending),
            desc="generate",
            unit="gen",
            file=sys.stderr,
            disable=None if self.progress else True,  # drawn only on a terminal
            dynamic_ncols=True,
        )
        try:
            with ReplicaPool(self.spec.run, self.ray, warmup=True, quiet=not self.progress) as pool:
                self.model_info = pool.model
                for out in pool.run(tasks):
                    batch = batches[out.task.key]
                    n = len(batch) if out.batched else 1
                    new = 0
                    for job, res in zip(batch, out.results):
                        row = self._row(job, error=res) if isinstance(res, str) else self._row(job, res, batch=n)
                        if gens.append(row):
                            new += 1
                            result.generated += 1
                            result.failed += "error" in row
                            if self.on_generation is not None:
                                self.on_generation(row)
                    bar.update(new)
                if self.progress and pool.overhead_line():
                    print(pool.overhead_line(), file=sys.stderr)
        finally:
            bar.close()

    # scoring ------------------------------------------------------------------------------------
    def score(self, gens: JsonlStore, scores: JsonlStore, jobs: list[GenJob], result: RunResult) -> None:
        done = {}
        for j in jobs:
            row = gens.get(j.key, self.gen_fp(j))
            if row is not None and "error" not in row:
                done[j.key] = (j, row)
        context = ScoringContext(seed=self.spec.seeds[0], pj=self.pj, run_config=self.spec.run)
        for sspec in self.spec.scorers:
            cls = get_scorer_class(sspec.name)
            h = self.scorer_hashes[sspec.alias]
            if cls.kind == "pairwise":
                work = self._pairwise_work(sspec.alias, h, done, scores)
            else:
                work = [(f"{k}|{sspec.alias}", j, row, None) for k, (j, row) in done.items()]
                work = [w for w in work if (w[0], self.score_fp(w[1], h)) not in scores]
            if not work:
                continue
            scorer = cls(**sspec.options)
            if (
                cls.kind == "pairwise"
                and self.pj is None
                and getattr(scorer.options, "judge", None) == "backend"
                and getattr(scorer.options, "backend", None) is None
                and getattr(scorer.options, "model", None) is None
            ):
                context.pj = self._load_model()  # the run's own model judges; load it once for both
            scorer.bind(context)
            from tqdm import tqdm

            bar = tqdm(
                total=len(work),
                desc=f"score {sspec.alias}",
                unit="row",
                file=sys.stderr,
                disable=None if self.progress else True,  # drawn only on a terminal
                dynamic_ncols=True,
            )
            chunk = 8 if cls.kind == "pairwise" else 32
            try:
                for i in range(0, len(work), chunk):
                    part = work[i : i + chunk]
                    values = self._values(sspec.name, scorer, part)
                    for (key, job, _row, item), (value, details) in zip(part, values):
                        base = None
                        if item is not None:
                            bkey = baseline_key(self.spec, job)
                            base = done[bkey][0] if bkey is not None else None
                        srow: dict[str, Any] = {
                            "key": key,
                            "fp": self.score_fp(job, h, base),
                            "gen": job.key,
                            "scorer": sspec.alias,
                            "kind": cls.kind,
                            "value": _json_number(value),
                        }
                        if item is not None:
                            srow["dimension"] = item.aspect_name
                            srow["baseline"] = baseline_key(self.spec, job)
                            srow["details"] = details
                        srow["created"] = _now()
                        if scores.append(srow):
                            result.scored += 1
                            if self.on_score is not None:
                                self.on_score(srow)
                    bar.update(len(part))
            finally:
                bar.close()
                scorer.close()

    def _values(self, name: str, scorer: Any, part: list) -> list[tuple[float, dict[str, Any] | None]]:
        """The scorer's values for ``part``, checked: a plugin scorer that raises, returns another
        number of values than it was given, or a value that is no number (a verdict that is no
        :class:`PairResult`) is one :class:`PluginError` line naming it, never a traceback or a row
        silently left out. A built-in's exception is a bug and keeps its traceback."""
        if scorer.kind == "pairwise":
            items = [w[3] for w in part]
            outs = guarded(
                "scorer", name, scorer, ".compare_many raised", lambda: cast(PairwiseScorer, scorer).compare_many(items)
            )
        else:
            pairs = [(w[1].prompt.prompt, w[2]["text"]) for w in part]
            outs = guarded(
                "scorer", name, scorer, ".score_many raised", lambda: cast(PointwiseScorer, scorer).score_many(pairs)
            )
        what = "compare_many" if scorer.kind == "pairwise" else "score_many"
        try:
            outs = list(outs)
        except TypeError:
            raise PluginError(
                f"scorer '{name}'.{what} returned {type(outs).__name__}, not a list of {len(part)} values"
            ) from None
        if len(outs) != len(part):
            raise PluginError(f"scorer '{name}'.{what} returned {len(outs)} values for {len(part)} responses")
        values: list[tuple[float, dict[str, Any] | None]] = []
        for i, got in enumerate(outs):
            details = None
            out: Any = got
            if scorer.kind == "pairwise":
                if not isinstance(got, PairResult) or (got.details is not None and not isinstance(got.details, dict)):
                    raise PluginError(
                        f"scorer '{name}'.{what} returned {type(got).__name__} {got!r:.40} for item {i + 1}, "
                        "not a PairResult"
                    )
                out, details = got.value, got.details
            if isinstance(out, bool) or not isinstance(out, numbers.Real):
                raise PluginError(
                    f"scorer '{name}'.{what} returned {type(out).__name__} {out!r:.40} for item {i + 1}, "
                    "not a number (NaN marks an undefined score)"
                )
            values.append((float(out), details))
        return values

    def _pairwise_work(self, alias: str, h: str, done: dict, scores: JsonlStore) -> list:
        """The verdicts still to get: one per (generation, dimension) against its baseline response.

        A verdict's key names the baseline generation it was judged against (``...@vs@BKEY``), and its
        fingerprint that generation's fingerprint, so a run switched to another ``--baseline``, or
        whose baseline response changed, judges again instead of reusing verdicts on other responses.
        """
        names = self.spec.dimension_names
        work = []
        for key, (job, row) in done.items():
            bkey = baseline_key(self.spec, job)
            if bkey is None or bkey not in done:
                continue
            base_job, base_row = done[bkey]
            fp = self.score_fp(job, h, base_job)
            for pref in job.experiment.preferences:
                dim, aspect = aspect_of(pref, names[pref])
                skey = f"{key}|{alias}|{dim}@vs@{bkey}"
                if (skey, fp) in scores:
                    continue
                item = PairItem(
                    prompt=job.prompt.prompt,
                    response_a=row["text"],
                    response_b=base_row["text"],
                    aspect=aspect,
                    aspect_name=dim,
                    key=skey,
                )
                work.append((skey, job, row, item))
        return work

    # all ------------------------------------------------------------------------------------------
    def run(self, *, report: bool = True) -> RunResult:
        make_run_dir(self.run_dir)
        result = RunResult(self.run_dir)
        with RunLock(self.run_dir):
            fresh = not (self.run_dir / RUN_FILE).exists()
            record = self._check_run_file()
            jobs = plan_generations(self.spec, self.prompts)
            record["planned_generations"] = len(jobs)
            self._write_run_file(record)
            try:
                with JsonlStore(self.run_dir / GENERATIONS) as gens, JsonlStore(self.run_dir / SCORES) as scores:
                    self.generate(gens, jobs, result)
                    model = None  # the model loaded this time describes itself (a kept record may be older)
                    if self.pj is not None:
                        try:
                            model = self.pj.backend.describe()
                        except Exception:  # describe is informative only
                            pass
                    elif self.model_info is not None:  # --ray: from a replica
                        model = self.model_info
                    if model is not None and record.get("model") != model:
                        record["model"] = model
                        self._write_run_file(record)
                    self.score(gens, scores, jobs, result)
            except BaseException:
                if fresh:
                    self._discard_if_empty()
                raise
            finally:
                for mpj in self._method_pjs.values():
                    mpj.close(keep_backend=True)
                self._method_pjs.clear()
                if self._own_pj and self.pj is not None:
                    self.pj.close()
                    self.pj = None
            if report:
                result.report = write_report(self.run_dir)
        return result


def run_eval(
    spec: EvalSpec,
    run_dir: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    pj: Any = None,
    argv: list[str] | None = None,
    report: bool = True,
    on_generation: Callable[[dict], None] | None = None,
    on_score: Callable[[dict], None] | None = None,
    ray: RayOptions | None = None,
) -> RunResult:
    """Run (or continue) the evaluation ``spec`` in ``run_dir`` and write its report.

    ``pj``: an already loaded :class:`PersonaJudge` to generate with (default:
    load ``spec.run``'s backend). ``on_generation`` / ``on_score`` are called
    after each row is durably written (progress hooks; tests use them to
    interrupt a run). ``ray``: generate on Ray replicas instead of in this process (same rows).
    """
    return Runner(
        spec,
        run_dir,
        force=force,
        progress=progress,
        pj=pj,
        argv=argv,
        on_generation=on_generation,
        on_score=on_score,
        ray=ray,
    ).run(report=report)


__all__ = ["run_eval", "Runner", "RunResult", "GenJob", "plan_generations", "load_spec", "read_run_file", "load_rows"]
