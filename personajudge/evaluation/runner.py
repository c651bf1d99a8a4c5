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

Rows carry a fingerprint of what produced them (generation settings + prompt
text; + scorer options for scores; a pairwise verdict's key names the baseline generation it
was judged against), so a row is reused only where it would be reproduced. Interrupted at any instant -- Ctrl-C, an exception, SIGKILL -- the
same command continues where it stopped: finished rows are skipped, a torn
last line is dropped, nothing is duplicated.
"""

from __future__ import annotations

import datetime as _dt
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from personajudge.api import PersonaJudge, make_method
from personajudge.core.config import build_config
from personajudge.core.errors import ContextLengthError, PersonaJudgeError
from personajudge.core.files import os_error_text
from personajudge.distributed import RayOptions, ReplicaPool, Task
from personajudge.plugins import get_method, preference_library
from personajudge.preferences import resolve

from .dataset import PromptItem, load_prompts
from .dimensions import DimensionScorer, dimension_table
from .errors import EvalError, RunMismatchError
from .report import write_report
from .scorers import PairItem, PairwiseScorer, PointwiseScorer, ScoringContext, get_scorer_class
from .spec import EvalSpec, Experiment, command_from_spec, comparable, diff, gen_key, uses_lambda, variant_label
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
    cfg = build_config(spec.run.model_dump(by_alias=True), method=method)
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


def baseline_key(spec: EvalSpec, job: GenJob) -> str | None:
    return spec.baseline_key(job.prompt.id, job.experiment.name, job.method, job.lam, job.seed)


def resolved_dimensions(spec: EvalSpec) -> list[DimensionScorer]:
    return dimension_table(list(spec.dimensions), {s.alias: s.name for s in spec.scorers})


def validate_spec(spec: EvalSpec) -> dict[str, str]:
    """Check methods, scorers and dimensions before anything is loaded; returns scorer alias -> hash."""
    for m in spec.all_methods:
        get_method(m)
    hashes = {}
    for s in spec.scorers:
        cls = get_scorer_class(s.name)
        hashes[s.alias] = cls.config_hash_for(cls.validate(dict(s.options)))
    resolved_dimensions(spec)
    for pref, name in spec.dimension_names.items():
        aspect_of(pref, name)
    return hashes


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
        self.prompts = load_prompts(spec.dataset, spec.limit)
        self.scorer_hashes = validate_spec(spec)
        self.gen_hash = spec.generation_hash()

    # run.json -----------------------------------------------------------------------------------
    def _run_record(self) -> dict[str, Any]:
        return {"spec": self.spec.dump(), "prompts": [{"id": p.id, "sha": p.sha} for p in self.prompts]}

    def _check_run_file(self) -> dict[str, Any]:
        path = self.run_dir / RUN_FILE
        new = self._run_record()
        if not path.exists():
            return {**new, "created": _now()}
        try:
            old = read_run_file(self.run_dir)
        except EvalError as err:
            if not self.force:
                raise EvalError(
                    f"{err}; pass --force to replace it (rows of the JSONL files that are still valid are reused)"
                ) from None
            old = {}  # not a record of ours: replaced, as --force says
        changed = diff(
            {"spec": comparable(old.get("spec", {})), "prompts": old.get("prompts")},
            {"spec": comparable(new["spec"]), "prompts": new["prompts"]},
        )
        if changed and not self.force:
            shown = ", ".join(c.removeprefix("spec.") for c in changed[:6]) + (" ..." if len(changed) > 6 else "")
            raise RunMismatchError(
                f"{self.run_dir} holds a run with a different configuration (changed: {shown}); rerun the "
                f"original command, continue it with `personajudge eval --resume --run-dir {self.run_dir}`, "
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

    def _write_run_file(self, record: dict[str, Any]) -> None:
        record = dict(record)
        record.update(
            {
                "generation_hash": self.gen_hash,
                "scorer_hashes": self.scorer_hashes,
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
        return f"{self.gen_hash}:{job.prompt.sha}"

    def _load_model(self):
        if self.pj is None:
            self.pj = PersonaJudge(self.spec.run)
            self._own_pj = True
            try:  # one untimed call, so the first timed response does not pay for warm-up
                self.pj.generate("Hello.", preferences=[], views=None, method="base", max_new_tokens=2, seed=0)
            except PersonaJudgeError:
                pass
        return self.pj

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

    def _batches(self, pending: list[GenJob]) -> Iterable[list[GenJob]]:
        if self.spec.batch_size == 1:
            for j in pending:
                yield [j]
            return
        groups: dict[tuple, list[GenJob]] = {}
        for j in pending:  # same experiment/method/lambda/seed: one batched call over prompts
            groups.setdefault((j.experiment.name, j.method, j.lam, j.seed), []).append(j)
        for g in groups.values():
            for i in range(0, len(g), self.spec.batch_size):
                yield g[i : i + self.spec.batch_size]

    def generate(self, gens: JsonlStore, jobs: list[GenJob], result: RunResult) -> None:
        pending = [j for j in jobs if (j.key, self.gen_fp(j)) not in gens]
        result.reused = len(jobs) - len(pending)
        if not pending:
            return
        if self.ray is not None:
            return self._generate_ray(gens, pending, result)
        pj = self._load_model()
        from tqdm import tqdm

        bar = tqdm(
            total=len(pending),
            desc="generate",
            unit="gen",
            file=sys.stderr,
            disable=not self.progress,
            initial=0,
            dynamic_ncols=True,
        )
        try:
            for batch in self._batches(pending):
                bar.set_postfix_str(f"{batch[0].experiment.name} {batch[0].variant}", refresh=False)
                rows = [self._generate_one(pj, batch[0])] if len(batch) == 1 else self._generate_batch(pj, batch)
                for row in rows:
                    if gens.append(row):
                        result.generated += 1
                        result.failed += "error" in row
                        if self.on_generation is not None:
                            self.on_generation(row)
                bar.update(len(batch))
        finally:
            bar.close()

    def _generate_ray(self, gens: JsonlStore, pending: list[GenJob], result: RunResult) -> None:
        """The same batches as locally, run on Ray replicas; rows appended here as each batch comes back."""
        assert self.ray is not None  # called only with Ray options
        batches = list(self._batches(pending))
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
            disable=not self.progress,
            dynamic_ncols=True,
        )
        try:
            with ReplicaPool(self.spec.run, self.ray, warmup=True, quiet=not self.progress) as pool:
                self.model_info = pool.model
                for out in pool.run(tasks):
                    batch = batches[out.task.key]
                    n = len(batch) if out.batched else 1
                    for job, res in zip(batch, out.results):
                        row = self._row(job, error=res) if isinstance(res, str) else self._row(job, res, batch=n)
                        if gens.append(row):
                            result.generated += 1
                            result.failed += "error" in row
                            if self.on_generation is not None:
                                self.on_generation(row)
                    bar.update(len(batch))
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
                work = [w for w in work if (w[0], f"{self.gen_fp(w[1])}:{h}") not in scores]
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
                disable=not self.progress,
                dynamic_ncols=True,
            )
            chunk = 8 if cls.kind == "pairwise" else 32
            try:
                for i in range(0, len(work), chunk):
                    part = work[i : i + chunk]
                    values: list[tuple[float, dict[str, Any] | None]]
                    if cls.kind == "pairwise":
                        outs = cast(PairwiseScorer, scorer).compare_many([w[3] for w in part])  # by its kind
                        values = [(o.value, o.details) for o in outs]
                    else:
                        vals = cast(PointwiseScorer, scorer).score_many(
                            [(w[1].prompt.prompt, w[2]["text"]) for w in part]
                        )
                        values = [(v, None) for v in vals]
                    for (key, job, _row, item), (value, details) in zip(part, values):
                        srow: dict[str, Any] = {
                            "key": key,
                            "fp": f"{self.gen_fp(job)}:{h}",
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

    def _pairwise_work(self, alias: str, h: str, done: dict, scores: JsonlStore) -> list:
        """The verdicts still to get: one per (generation, dimension) against its baseline response.

        A verdict's key names the baseline generation it was judged against (``...@vs@BKEY``), so a
        run switched to another ``--baseline`` judges again instead of reusing verdicts on other
        responses. Rows written before the key named it (key without ``@vs@``) are reused when their
        ``baseline`` field is this baseline's key.
        """
        names = self.spec.dimension_names
        work = []
        for key, (job, row) in done.items():
            bkey = baseline_key(self.spec, job)
            if bkey is None or bkey not in done:
                continue
            base_row = done[bkey][1]
            fp = f"{self.gen_fp(job)}:{h}"
            for pref in job.experiment.preferences:
                dim, aspect = aspect_of(pref, names[pref])
                skey = f"{key}|{alias}|{dim}@vs@{bkey}"
                legacy = scores.get(f"{key}|{alias}|{dim}", fp)
                if (skey, fp) in scores or (legacy is not None and legacy.get("baseline") == bkey):
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
            finally:
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
