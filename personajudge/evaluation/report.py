"""Reports of an evaluation run: Markdown, JSON and PNG plots, rebuilt from the JSONL files.

Questions answered, one table each:

1. **Win rate against the baseline** (the paper's Tables 2/4): per preference
   dimension, the share of prompts where a method's response is better than
   the baseline's (``prompt``) response to the same prompt and seed, in the
   dimension's direction; ties count half; 95% bootstrap interval over prompts.
2. **Mean scores** of each method per scorer, with 95% bootstrap intervals.
3. **Cost**: tokens, seconds per response, tokens/s, acceptance rate.
4. **Lambda sweep** (Table 3), when the run has several ``--lambdas``.
5. **Inference time vs. number of objectives** (Table 5), for ``--objectives`` runs.
6. **Paired differences**: each method minus ``base`` (when the run has it)
   and minus the baseline, per pointwise scorer, computed prompt by prompt on
   the same seed, with a 95% bootstrap interval over prompts. A win rate says
   how often a method moves a proxy; this says how far, in the proxy's units.
7. **Judge consistency**, for pairwise scorers: position-consistent verdicts,
   first-position choices, unparseable answers.

Intervals: percentile bootstrap (2000 resamples, numpy generator seeded with 0)
over prompts; with several seeds a prompt's value is first averaged over its
seeds. Cells with fewer than two prompts have no interval.

Undefined scores (NaN, stored as ``null``: Flesch of an empty response) are left out of means,
intervals, win rates and differences, and counted under the mean-scores table; a mean over fewer
prompts than its row's ``n`` shows its own (``[n = 3]``).
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from personajudge.core import files
from personajudge.core.errors import PersonaJudgeWarning

from .errors import EvalError
from .scorers import get_scorer_class
from .spec import FINGERPRINT_VERSION, EvalSpec, batch_mates, gen_key, row_fingerprint, variant_label
from .store import GENERATIONS, SCORES, load_rows, read_run_spec, write_json_atomic

BOOTSTRAP = 2000
#: below this many prompts a bootstrap interval is too rough to call a difference
MIN_N_BOLD = 10
PLOTS = {
    "winrate": "winrate.png",
    "scores": "scores.png",
    "lambda": "lambda_sweep.png",
    "objectives": "objectives_time.png",
}
#: every file :func:`write_report` writes into a run directory (the runner refuses a folder holding any
#: of them without a run.json: they would be replaced)
REPORT_FILES = ("report.json", "report.md", *PLOTS.values())
#: the plots' titles in report.json and report.md
PLOT_TITLES = {
    "win rates": PLOTS["winrate"],
    "score distributions": PLOTS["scores"],
    "lambda sweep": PLOTS["lambda"],
    "inference time vs objectives": PLOTS["objectives"],
}


# -- statistics ----------------------------------------------------------------------------------


def bootstrap_ci(
    values: list[float], *, seed: int = 0, n: int = BOOTSTRAP, level: float = 0.95
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean (None for fewer than two values)."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if len(x) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n, len(x)))].mean(axis=1)
    a = (1 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return float(lo), float(hi)


def summarize(per_prompt: list[float]) -> dict[str, Any]:
    vals = [v for v in per_prompt if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": None, "ci": None, "n": 0}
    return {"mean": float(np.mean(vals)), "ci": bootstrap_ci(vals), "n": len(vals)}


def _mean(vals: list[float]) -> float:
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


# -- data ----------------------------------------------------------------------------------------


class RunData:
    """The valid rows of a run directory, indexed."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.record, self.spec = read_run_spec(run_dir)
        spec = self.spec
        prompts = self.record.get("prompts", [])
        if not isinstance(prompts, list) or not all(
            isinstance(p, dict) and isinstance(p.get("id"), str) and isinstance(p.get("sha"), str) for p in prompts
        ):
            raise EvalError(
                f"{self.run_dir / 'run.json'}: 'prompts' must be a list of {{id, sha}} objects; "
                "rerun `personajudge eval` to rewrite it"
            )
        if not isinstance(self.record.get("scorer_hashes", {}), dict):
            raise EvalError(f"{self.run_dir / 'run.json'}: 'scorer_hashes' must be an object")
        dims = self.record.get("dimensions", [])
        if not isinstance(dims, list) or not all(
            isinstance(d, dict) and all(isinstance(d.get(k), str) for k in ("dimension", "scorer", "direction"))
            for d in dims
        ):
            raise EvalError(
                f"{self.run_dir / 'run.json'}: 'dimensions' must be a list of {{dimension, scorer, direction}} "
                "objects; rerun `personajudge eval` to rewrite it"
            )
        self.sha = {p["id"]: p["sha"] for p in prompts}
        self.prompt_ids = list(self.sha)
        gen_hash = self.record.get("generation_hash") or spec.generation_hash()
        scorer_hashes = self.record.get("scorer_hashes", {})
        # Version 2 fingerprints (spec.FINGERPRINT_VERSION) name the job and the batch; a run directory
        # written before them is read with the fingerprints it was written with.
        self.versioned = self.record.get("fingerprint") == FINGERPRINT_VERSION
        job_fps: Any = self.record.get("row_fingerprints") or {}
        if self.versioned and not (
            isinstance(job_fps, dict)
            and all(isinstance(v, dict) and all(isinstance(h, str) for h in v.values()) for v in job_fps.values())
        ):
            raise EvalError(f"{self.run_dir / 'run.json'}: 'row_fingerprints' must be an object of objects")
        shas = [self.sha[pid] for pid in self.prompt_ids]
        index = {pid: i for i, pid in enumerate(self.prompt_ids)}
        bs = spec.batch_size

        def expected_fp(row: dict) -> str | None:
            pid = row["prompt_id"]
            if not self.versioned:
                return f"{gen_hash}:{self.sha[pid]}"
            job = job_fps.get(row["experiment"], {}).get(row["method"])
            if job is None:
                return None
            mates = batch_mates(shas, index[pid], bs) if bs > 1 else None
            return row_fingerprint(gen_hash, self.sha[pid], job, mates)

        self.sweep = spec.sweep
        many = len(self.sweep) > 1
        exps = {e.name for e in spec.experiments}
        methods = set(spec.all_methods)
        raw_gens, raw_scores = load_rows(run_dir)
        self.gens: dict[str, dict] = {}
        self.failed = 0
        for row in raw_gens:
            pid = row["prompt_id"]  # load_rows: only rows whose fields have their types (store.ROW_TYPES)
            if pid not in self.sha or row.get("fp") != expected_fp(row):
                continue
            if (
                row.get("experiment") not in exps
                or row.get("method") not in methods
                or row.get("seed") not in spec.seeds
            ):
                continue
            lam = row.get("lambda")
            if lam is not None and lam not in self.sweep:
                continue
            if row["key"] in self.gens:
                continue
            row = dict(row)
            row["variant"] = variant_label(row["method"], lam, many)
            self.gens[row["key"]] = row
            self.failed += "error" in row
        self.pointwise: dict[tuple[str, str], float] = {}
        self.pairwise: dict[tuple[str, str, str], tuple[float, dict]] = {}
        self.kinds: dict[str, str] = {}
        self.baseline = spec.baseline
        # a baseline that uses λ has rows with one; compared at the generation's λ, or the sweep's first
        self._baseline_lam = any(r["method"] == spec.baseline and r["lambda"] is not None for r in self.gens.values())
        for row in raw_scores:
            g = self.gens.get(row["gen"])  # load_rows: gen and scorer are strings
            alias = row["scorer"]
            if g is None or "error" in g or alias not in scorer_hashes:
                continue
            fp = f"{g['fp']}:{scorer_hashes[alias]}"
            if row.get("kind") == "pairwise" and self.versioned:
                b = self.gens.get(self.baseline_key(g) or "")
                fp = f"{fp}@{b['fp']}" if b is not None else ""  # judged against this very baseline response
            if row.get("fp") != fp:
                continue
            self.kinds[alias] = row.get("kind", "pointwise")
            value = row.get("value")
            value = math.nan if value is None else float(value)
            if row.get("kind") == "pairwise":
                if row.get("baseline") != self.baseline_key(g):
                    continue  # a verdict against another baseline response (the run's --baseline changed)
                self.pairwise.setdefault(
                    (row["gen"], alias, row.get("dimension", "")), (value, row.get("details") or {})
                )
            else:
                self.pointwise.setdefault((row["gen"], alias), value)
        kind = {s.alias: self.kinds.get(s.alias) or _scorer_kind(s.name) for s in spec.scorers}
        self.pointwise_aliases = [a for a, k in kind.items() if k == "pointwise"]
        self.pairwise_aliases = [a for a, k in kind.items() if k == "pairwise"]
        # variants in the spec's method order, lambda order
        seen: dict[str, tuple[str, int | None]] = {}
        for m in spec.all_methods:
            lams = sorted({r["lambda"] for r in self.gens.values() if r["method"] == m and r["lambda"] is not None})
            for lam in lams or [None]:
                seen.setdefault(variant_label(m, lam, many), (m, lam))
        self.variants = seen

    def baseline_key(self, g: dict) -> str | None:
        """The key of the baseline generation that generation row ``g`` is compared with (the
        runner's :meth:`EvalSpec.baseline_key`, decided from the rows: no method plugin needed)."""
        if not self.baseline or g["method"] == self.baseline:
            return None
        lam = (g["lambda"] if g["lambda"] is not None else self.sweep[0]) if self._baseline_lam else None
        return gen_key(g["prompt_id"], g["experiment"], self.baseline, lam, g["seed"])

    def row(self, pid: str, exp: str, variant: str, seed: int) -> dict | None:
        m, lam = self.variants[variant]
        r = self.gens.get(gen_key(pid, exp, m, lam, seed))
        return None if r is None or "error" in r else r

    def baseline_row(self, r: dict) -> dict | None:
        """The baseline response that generation row ``r`` is compared with (None: none usable)."""
        key = self.baseline_key(r)
        b = self.gens.get(key) if key is not None else None
        return None if b is None or "error" in b else b


def _scorer_kind(name: str) -> str:
    try:
        return get_scorer_class(name).kind
    except Exception:  # an uninstalled plugin scorer: infer from the rows later
        return "pointwise"


# -- tables --------------------------------------------------------------------------------------


def win_rates(data: RunData) -> list[dict[str, Any]]:
    spec = data.spec
    dims = [d for d in data.record.get("dimensions", [])]
    names = spec.dimension_names
    out = []
    for exp in spec.experiments:
        for pref in exp.preferences:
            dim = names[pref]
            measures = [(d["scorer"], d["direction"]) for d in dims if d["dimension"] == dim]
            measures += [(a, "judge") for a in data.pairwise_aliases]
            for alias, direction in measures:
                for variant, (m, _lam) in data.variants.items():
                    if m == spec.baseline:
                        continue
                    per_prompt, wins, ties, losses = [], 0, 0, 0
                    for pid in data.prompt_ids:
                        outs = []
                        for seed in spec.seeds:
                            r = data.row(pid, exp.name, variant, seed)
                            b = data.baseline_row(r) if r is not None else None
                            if r is None or b is None:
                                continue
                            if direction == "judge":
                                got = data.pairwise.get((r["key"], alias, dim))
                                if got is None or math.isnan(got[0]):
                                    continue
                                o = got[0]
                            else:
                                a, c = data.pointwise.get((r["key"], alias)), data.pointwise.get((b["key"], alias))
                                if a is None or c is None or math.isnan(a) or math.isnan(c):
                                    continue
                                o = 0.5 if a == c else float((a < c) if direction == "lower" else (a > c))
                            outs.append(o)
                            wins += o > 0.5
                            ties += o == 0.5
                            losses += o < 0.5
                        if outs:
                            per_prompt.append(float(np.mean(outs)))
                    s = summarize(per_prompt)
                    out.append(
                        {
                            "experiment": exp.name,
                            "dimension": dim,
                            "scorer": alias,
                            "direction": direction,
                            "method": variant,
                            "baseline": spec.baseline,
                            "win_rate": s["mean"],
                            "ci": s["ci"],
                            "n_prompts": s["n"],
                            "wins": wins,
                            "ties": ties,
                            "losses": losses,
                        }
                    )
    return out


def _per_prompt(data: RunData, exp: str, variant: str, value) -> list[float]:
    out = []
    for pid in data.prompt_ids:
        vals = []
        for seed in data.spec.seeds:
            r = data.row(pid, exp, variant, seed)
            if r is not None:
                v = value(r)
                if v is not None and not math.isnan(v):
                    vals.append(v)
        if vals:
            out.append(float(np.mean(vals)))
    return out


COST_FIELDS = {
    "tokens": lambda r: r.get("n_tokens"),
    "seconds": lambda r: r.get("wall_time_s"),
    "tokens_per_s": lambda r: r.get("tokens_per_s"),
    "acceptance": lambda r: r.get("acceptance_rate"),
    "prefix_tokens": lambda r: float(np.mean(r["prompt_tokens"])) if r.get("prompt_tokens") else None,
}


def method_stats(data: RunData) -> list[dict[str, Any]]:
    out = []
    for exp in data.spec.experiments:
        for variant, (m, lam) in data.variants.items():
            n_rows = sum(
                1 for pid in data.prompt_ids for s in data.spec.seeds if data.row(pid, exp.name, variant, s) is not None
            )
            if not n_rows:
                continue
            entry: dict[str, Any] = {
                "experiment": exp.name,
                "objectives": exp.objectives,
                "method": variant,
                "base_method": m,
                "lambda": lam,
                "n_responses": n_rows,
                "scores": {},
                "cost": {},
            }
            rows = [r for pid in data.prompt_ids for s in data.spec.seeds if (r := data.row(pid, exp.name, variant, s))]
            for alias in data.pointwise_aliases:
                entry["scores"][alias] = summarize(
                    _per_prompt(data, exp.name, variant, lambda r, a=alias: data.pointwise.get((r["key"], a)))
                )
                values = [v for r in rows if (v := data.pointwise.get((r["key"], alias))) is not None]
                # responses scored, and of those the ones whose score is undefined (NaN: Flesch of an
                # empty response): left out of means and win rates, and counted in the report
                entry["scores"][alias]["scored"] = len(values)
                entry["scores"][alias]["undefined"] = sum(math.isnan(v) for v in values)
            for name, fn in COST_FIELDS.items():
                entry["cost"][name] = summarize(_per_prompt(data, exp.name, variant, fn))
            entry["n_prompts"] = max([entry["cost"]["tokens"]["n"]] + [0])
            out.append(entry)
    return out


def paired_differences(data: RunData, reference: str) -> list[dict[str, Any]]:
    """Each method minus ``reference`` per pointwise scorer: per prompt, the mean over seeds of
    (method's score − reference's score on the same prompt and seed); mean and bootstrap CI over prompts."""
    ref = [v for v, (m, _) in data.variants.items() if m == reference]
    if not ref:
        return []
    out = []
    for exp in data.spec.experiments:
        for variant, (m, _lam) in data.variants.items():
            if m == reference:
                continue
            for alias in data.pointwise_aliases:
                per_prompt = []
                for pid in data.prompt_ids:
                    diffs = []
                    for seed in data.spec.seeds:
                        r, b = data.row(pid, exp.name, variant, seed), data.row(pid, exp.name, ref[0], seed)
                        if r is None or b is None:
                            continue
                        a, c = data.pointwise.get((r["key"], alias)), data.pointwise.get((b["key"], alias))
                        if a is None or c is None or math.isnan(a) or math.isnan(c):
                            continue
                        diffs.append(a - c)
                    if diffs:
                        per_prompt.append(float(np.mean(diffs)))
                if per_prompt:
                    s = summarize(per_prompt)
                    out.append(
                        {
                            "experiment": exp.name,
                            "method": variant,
                            "reference": reference,
                            "scorer": alias,
                            "mean": s["mean"],
                            "ci": s["ci"],
                            "n_prompts": s["n"],
                        }
                    )
    return out


def judge_stats(data: RunData) -> list[dict[str, Any]]:
    out = []
    for alias in data.pairwise_aliases:
        items = [d for (g, a, dim), (v, d) in data.pairwise.items() if a == alias]
        if not items:
            continue
        cons = [d["consistent"] for d in items if "consistent" in d]
        answers = sum(len(d.get("answers", [])) for d in items)
        out.append(
            {
                "scorer": alias,
                "comparisons": len(items),
                "consistent": (sum(cons) / len(cons)) if cons else None,
                "first_position": (sum(d.get("first_position_wins", 0) for d in items) / answers) if answers else None,
                "invalid": (sum(d.get("invalid", 0) for d in items) / answers) if answers else None,
            }
        )
    return out


def build_report(run_dir: str | Path, data: RunData | None = None) -> dict[str, Any]:
    """The report's numbers (what ``report.json`` holds)."""
    data = data or RunData(run_dir)
    spec = data.spec
    planned = data.record.get("planned_generations")
    report = {
        "run_dir": str(Path(run_dir)),
        "model": data.record.get("model"),
        "spec": data.record["spec"],
        "command": data.record.get("command"),
        "prompts": len(data.prompt_ids),
        "generations": {"done": len(data.gens), "planned": planned, "failed": data.failed},
        "baseline": spec.baseline,
        "scorers": {s.alias: s.name for s in spec.scorers},
        "scorer_identities": {
            a: i
            for a, i in (data.record.get("scorer_identities") or {}).items()
            if a in {s.alias for s in spec.scorers}
        }
        if isinstance(data.record.get("scorer_identities"), dict)
        else {},
        "dimensions": data.record.get("dimensions", []),
        "win_rates": win_rates(data) if spec.baseline else [],
        "methods": method_stats(data),
        "judges": judge_stats(data),
        "differences": [
            d
            for r in dict.fromkeys(x for x in ("base", spec.baseline) if x in spec.all_methods)
            for d in paired_differences(data, r)
        ],
        "lambda_sweep": len(spec.sweep) > 1,
        "objectives": any(e.objectives for e in spec.experiments),
    }
    return report


# -- markdown ------------------------------------------------------------------------------------


def _num(x: float | None, digits: int | None = None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if digits is None:
        ax = abs(x)
        digits = 0 if ax >= 100 else 1 if ax >= 10 else 2
    return f"{x:.{digits}f}"


def _interval(lo: str, hi: str) -> str:
    """``0.10–0.60``, but ``-3.40 to -1.20``: an en dash beside a minus sign is hard to read."""
    return f"{lo} to {hi}" if lo.startswith("-") or hi.startswith("-") else f"{lo}–{hi}"


def _with_ci(s: dict[str, Any], digits: int | None = None) -> str:
    if s.get("mean") is None:
        return "–"
    out = _num(s["mean"], digits)
    if s.get("ci"):
        out += f" ({_interval(_num(s['ci'][0], digits), _num(s['ci'][1], digits))})"
    return out


def _score_cell(s: dict[str, Any], n_row: int, *, ci: bool = True) -> str:
    """A mean score, with its own number of prompts where that is not the row's ``n`` (prompts
    whose every score is undefined are not in it)."""
    out = _with_ci(s) if ci else _num(s.get("mean"))
    if s.get("mean") is not None and s.get("n") != n_row:
        out += f" [n = {s.get('n')}]"
    return out


def _undefined_note(report: dict[str, Any], aliases: list[str]) -> list[str]:
    """A line per scorer with undefined (NaN) scores: how many, of how many scored responses."""
    lines = []
    for a in aliases:
        undefined = sum(m["scores"][a].get("undefined", 0) for m in report["methods"] if a in m["scores"])
        scored = sum(m["scores"][a].get("scored", 0) for m in report["methods"] if a in m["scores"])
        if undefined:
            lines.append(
                f"`{a}`: {undefined} of {scored} scored responses have no defined score (NaN, e.g. an empty "
                "response); they are left out of its means, intervals, win rates and differences."
            )
    return [" ".join(lines), ""] if lines else []


def _pct(s: dict[str, Any]) -> str:
    if s.get("win_rate") is None:
        return "–"
    out = f"{100 * s['win_rate']:.0f}%"
    if s.get("ci"):
        lo, hi = s["ci"]
        out += f" ({100 * lo:.0f}–{100 * hi:.0f})"
        if (lo > 0.5 or hi < 0.5) and s.get("n_prompts", 0) >= MIN_N_BOLD:
            out = f"**{out}**"
    return out


def _diff(x: dict[str, Any] | None, n_row: int | None = None) -> str:
    """A paired difference with its interval, signed, bold when the interval excludes 0; with its
    own number of prompts where that is not the row's ``n``."""
    if x is None or x.get("mean") is None:
        return "–"
    m = x["mean"]
    digits = 1 if max([abs(m), *(abs(c) for c in (x.get("ci") or ()))]) >= 1 else 2
    out = f"{m:+.{digits}f}"
    if x.get("ci"):
        lo, hi = x["ci"]
        out += f" ({lo:+.{digits}f} to {hi:+.{digits}f})"
        if (lo > 0 or hi < 0) and x.get("n_prompts", 0) >= MIN_N_BOLD:
            out = f"**{out}**"
    if n_row is not None and x.get("n_prompts") != n_row:
        out += f" [n = {x.get('n_prompts')}]"
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _arrow(direction: str) -> str:
    return {"higher": "↑", "lower": "↓", "judge": "judge"}[direction]


def _words(identity: Any) -> str:
    """A scorer's recorded identity (a pairwise judge's kind, model, endpoint) in words."""
    if not isinstance(identity, dict):
        return str(identity)
    return ", ".join(f"{k} {v}" for k, v in identity.items() if v is not None)


def _shell_quote(args: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in args)


def render_markdown(report: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    spec = EvalSpec.model_validate(report["spec"])
    d = spec.run.decoding
    model = report.get("model") or {}
    model_txt = model.get("model") or spec.run.backend.model or "default model"
    lines = ["# Persona-judge evaluation report", ""]
    info = [
        [
            "model",
            f"{model_txt} (backend {spec.run.backend.name}{', ' + model['device'] if model.get('device') else ''})",
        ],
        ["dataset", f"{spec.dataset}, {report['prompts']} prompts"],
        ["experiments", ", ".join(f"`{e.name}`" for e in spec.experiments)],
        *(
            [["preferences", "; ".join(f"`{n}`: {p}" for p, n in described.items())]]
            if (described := {p: n for p, n in spec.dimension_names.items() if n != p})
            else []
        ),
        [
            "methods",
            ", ".join(f"`{m}`" for m in spec.all_methods) + (f"; baseline `{spec.baseline}`" if spec.baseline else ""),
        ],
        [
            "decoding",
            f"temperature {d.temperature}, top-k {d.top_k}, top-p {d.top_p}, "
            f"λ {', '.join(map(str, spec.sweep))}, max {d.max_new_tokens} new tokens, encoder {spec.run.encoder}",
        ],
        ["seeds", ", ".join(map(str, spec.seeds))],
        [
            "scorers",
            ", ".join(f"`{a}`" + (f" ({n})" if a != n else "") for a, n in report["scorers"].items()) or "none",
        ],
        *(
            [["judge" if len(judges) == 1 else "judges", "; ".join(f"`{a}`: {_words(i)}" for a, i in judges.items())]]
            if (judges := report.get("scorer_identities") or {})
            else []
        ),
        [
            "generations",
            f"{report['generations']['done']} of {report['generations']['planned']} done"
            + (
                f", {report['generations']['failed']} failed (context too long)"
                if report["generations"]["failed"]
                else ""
            ),
        ],
    ]
    if report.get("command"):
        info.append(["reproduce", f"`{_shell_quote(report['command'])}`"])
    lines += [_table(["run", ""], info), ""]

    n_seeds = len(spec.seeds)
    seeds_txt = f" × {n_seeds} seeds (averaged per prompt)" if n_seeds > 1 else ""
    # 1. win rates
    wr = report["win_rates"]
    if spec.baseline:
        lines += [
            f"## Win rate against `{spec.baseline}`",
            "",
            f"Share of prompts where the method's response beats the `{spec.baseline}` response to the same "
            "prompt and seed in the dimension's direction (↑ higher is better, ↓ lower is better"
            # the judge's legend only where a pairwise judge measured a dimension
            + (", judge: pairwise judge verdict" if any(w["direction"] == "judge" for w in wr) else "")
            + "); ties count half. 50% = no difference. In parentheses: 95% bootstrap "
            f"interval over prompts; **bold** when it excludes 50% (and n ≥ {MIN_N_BOLD}).",
            "",
        ]
        if not wr:
            lines += [
                "No dimension of this run has a scorer: add `--scorers` (e.g. `length`, `vader`, "
                "`pairwise-judge`) or `--dimension NAME=SCORER:higher|lower`.",
                "",
            ]
        else:
            cols: list[tuple[str, str, str, str]] = []
            for w in wr:
                c = (w["experiment"], w["dimension"], w["scorer"], w["direction"])
                if c not in cols:
                    cols.append(c)
            dim_count = defaultdict(set)
            for e, dm, _, _ in cols:
                dim_count[dm].add(e)
            header = ["method"]
            for e, dm, sc, dr in cols:
                label = f"{dm} ({sc} {_arrow(dr)})" if dr != "judge" else f"{dm} ({sc})"
                if len(dim_count[dm]) > 1:
                    label = f"{label} in `{e}`"
                header.append(label)
            by = {(w["experiment"], w["dimension"], w["scorer"], w["direction"], w["method"]): w for w in wr}
            methods = [m for m in dict.fromkeys(w["method"] for w in wr)]
            ns = {w["n_prompts"] for w in wr}
            # one n for the table, or each cell's own beside it ([n = k], as the mean scores mark theirs)
            rows = [
                [f"`{m}`"]
                + [
                    (_pct(by[c + (m,)]) + ("" if len(ns) == 1 else f" [n = {by[c + (m,)]['n_prompts']}]"))
                    if c + (m,) in by
                    else "–"
                    for c in cols
                ]
                for m in methods
            ]
            lines += [_table(header, rows), ""]
            lines += [
                f"n = {ns.pop()} prompts{seeds_txt} per cell."
                if len(ns) == 1
                else f"[n = k]: the cell's number of prompts{seeds_txt}.",
                "",
            ]

    # 2. mean scores
    ms = report["methods"]
    aliases = [a for a in report["scorers"] if ms and a in ms[0]["scores"]]
    if aliases:
        lines += ["## Mean scores", "", "Mean per response, with a 95% bootstrap interval over prompts.", ""]
        header = ["experiment", "method", "n"] + [f"`{a}`" for a in aliases]
        rows = [
            [f"`{m['experiment']}`", f"`{m['method']}`", str(m["n_prompts"])]
            + [_score_cell(m["scores"][a], m["n_prompts"]) for a in aliases]
            for m in ms
        ]
        lines += [_table(header, rows), ""]
        if any(
            m["scores"][a]["mean"] is not None and m["scores"][a]["n"] != m["n_prompts"] for m in ms for a in aliases
        ):
            lines += ["n: prompts with a response; [n = …]: prompts with a defined score, where fewer.", ""]
        lines += _undefined_note(report, aliases)

    # 3. cost
    if ms:
        lines += [
            "## Cost",
            "",
            "Mean per response: new tokens, decoding seconds, tokens per second, and the "
            "share of drafted tokens the judge view accepted (Persona-judge methods).",
            "",
        ]
        header = ["experiment", "method", "n", "tokens", "s/response", "tokens/s", "acceptance"]
        rows = [
            [
                f"`{m['experiment']}`",
                f"`{m['method']}`",
                str(m["n_prompts"]),
                _num(m["cost"]["tokens"]["mean"]),
                _num(m["cost"]["seconds"]["mean"], 3),
                _num(m["cost"]["tokens_per_s"]["mean"], 1),
                _num(m["cost"]["acceptance"]["mean"], 2),
            ]
            for m in ms
        ]
        lines += [_table(header, rows), ""]

    # 4. lambda sweep
    if report["lambda_sweep"]:
        sweep = [m for m in ms if m["lambda"] is not None]
        lines += [
            "## Lambda sweep",
            "",
            "Draft window λ against acceptance, speed and scores (the paper's Table 3).",
            "",
        ]
        header = ["experiment", "method", "λ", "n", "acceptance", "tokens/s", "s/response"] + [
            f"`{a}`" for a in aliases
        ]
        rows = [
            [
                f"`{m['experiment']}`",
                f"`{m['base_method']}`",
                str(m["lambda"]),
                str(m["n_prompts"]),
                _with_ci(m["cost"]["acceptance"], 2),
                _num(m["cost"]["tokens_per_s"]["mean"], 1),
                _num(m["cost"]["seconds"]["mean"], 3),
            ]
            + [_score_cell(m["scores"][a], m["n_prompts"], ci=False) for a in aliases]
            for m in sweep
        ]  # experiment, method, then λ: the spec's order
        lines += [_table(header, rows), ""]

    # 5. objectives
    if report["objectives"]:
        obj = [m for m in ms if m["objectives"]]
        order = list(dict.fromkeys(m["method"] for m in obj))
        lines += [
            "## Inference time vs. number of objectives",
            "",
            "Views carrying 1, 2, 3, ... combined preferences (the paper's Table 5): mean decoding seconds "
            "per response with a 95% interval, speed, and the mean prompt length of the views in tokens.",
            "",
        ]
        header = ["objectives", "views", "method", "n", "s/response", "tokens/s", "prefix tokens"]
        rows = [
            [
                str(m["objectives"]),
                f"`{m['experiment']}`",
                f"`{m['method']}`",
                str(m["n_prompts"]),
                _with_ci(m["cost"]["seconds"], 3),
                _num(m["cost"]["tokens_per_s"]["mean"], 1),
                _num(m["cost"]["prefix_tokens"]["mean"], 0),
            ]
            for m in sorted(obj, key=lambda m: (order.index(m["method"]), m["objectives"]))
        ]
        lines += [_table(header, rows), ""]

    # 6. paired differences
    diffs = report.get("differences") or []
    for ref in dict.fromkeys(x["reference"] for x in diffs):
        rows_d = [x for x in diffs if x["reference"] == ref]
        cols_d = list(dict.fromkeys(x["scorer"] for x in rows_d))
        lines += [
            f"## Method minus `{ref}`",
            "",
            f"Mean over prompts of (method's score − `{ref}`'s score on the same prompt and seed), in each "
            f"scorer's units, with a 95% bootstrap interval over prompts; **bold** when it excludes 0 (and "
            f"n ≥ {MIN_N_BOLD}).",
            "",
        ]
        by_d = {(x["experiment"], x["method"], x["scorer"]): x for x in rows_d}
        keys = list(dict.fromkeys((x["experiment"], x["method"]) for x in rows_d))
        n_of = {k: max(by_d[k + (c,)]["n_prompts"] for c in cols_d if k + (c,) in by_d) for k in keys}
        rows = [
            [f"`{e}`", f"`{m}`", str(n_of[(e, m)])] + [_diff(by_d.get((e, m, c)), n_of[(e, m)]) for c in cols_d]
            for e, m in keys
        ]
        lines += [_table(["experiment", "method", "n"] + [f"`{c}`" for c in cols_d], rows), ""]

    # 7. judges
    if report["judges"]:
        lines += [
            "## Judge consistency",
            "",
            "Pairwise judge verdicts: share that stayed the same when the two "
            "responses swapped places, share of answers choosing the first position (0.5 = no position "
            "bias), and share of answers with no 0/1/2 (counted as ties).",
            "",
        ]
        rows = [
            [
                f"`{j['scorer']}`",
                str(j["comparisons"]),
                _num(j["consistent"], 2),
                _num(j["first_position"], 2),
                _num(j["invalid"], 2),
            ]
            for j in report["judges"]
        ]
        lines += [_table(["scorer", "comparisons", "consistent", "first position", "invalid"], rows), ""]

    if plots:
        lines += ["## Plots", ""]
        for name, file in plots.items():
            lines += [f"![{name}]({file})", ""]
    elif report.get("plots_kept"):
        why = report.get("plots_skipped", "`--no-plots`")
        lines += [
            "## Plots",
            "",
            f"Not redrawn for this report ({why}); the plots of an earlier report are left as they were "
            "and may show older numbers: " + ", ".join(f"`{f}`" for f in report["plots_kept"].values()) + ".",
            "",
        ]
    elif report.get("plots_skipped"):
        lines += ["## Plots", "", f"None drawn: {report['plots_skipped']}.", ""]
    lines += ["Rebuild this report with `personajudge report " + report["run_dir"] + "`.", ""]
    return "\n".join(lines)


# -- plots ---------------------------------------------------------------------------------------


def write_plots(report: dict[str, Any], data: RunData, out_dir: Path) -> dict[str, str]:
    """PNG plots (matplotlib, no pyplot state); {} when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return {}
    drawn: dict[str, str] = {}
    ms = report["methods"]

    wr = [w for w in report["win_rates"] if w["win_rate"] is not None]
    if wr:
        cols = list(dict.fromkeys((w["experiment"], w["dimension"], w["scorer"]) for w in wr))
        methods = list(dict.fromkeys(w["method"] for w in wr))
        by = {(w["experiment"], w["dimension"], w["scorer"], w["method"]): w for w in wr}
        fig = Figure(figsize=(max(6, 1.4 * len(cols) * max(1, len(methods)) ** 0.5 + 2), 4.2))
        ax = fig.subplots()
        width = 0.8 / len(methods)
        x = np.arange(len(cols))
        for i, m in enumerate(methods):
            vals, lo, hi = [], [], []
            for c in cols:
                w = by.get(c + (m,))
                v = 100 * w["win_rate"] if w and w["win_rate"] is not None else np.nan
                vals.append(v)
                ci = w.get("ci") if w else None
                lo.append(v - 100 * ci[0] if ci else 0)
                hi.append(100 * ci[1] - v if ci else 0)
            bars = ax.bar(x + (i - (len(methods) - 1) / 2) * width, vals, width, yerr=[lo, hi], capsize=3, label=m)
            ax.bar_label(
                bars,
                labels=["" if np.isnan(v) else f"{v:.0f}" for v in vals],
                fontsize=7,
                label_type="center",
                color="white",
            )
        ax.axhline(50, color="black", linewidth=0.8, linestyle="--")
        exps: dict[str, set[str]] = {}
        for e, d, _ in cols:
            exps.setdefault(d, set()).add(e)
        ax.set_xticks(x, [f"{d}\n({s})" + (f"\n{e}" if len(exps[d]) > 1 else "") for e, d, s in cols], fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel(f"win rate vs {report['baseline']} (%)")
        ns = sorted({w["n_prompts"] for w in wr})
        ax.set_title(f"Win rate per preference dimension (95% CI; n = {', '.join(map(str, ns))} prompts)", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save(fig, out_dir / PLOTS["winrate"])
        drawn["win rates"] = PLOTS["winrate"]

    aliases = [a for a in data.pointwise_aliases if any(m["scores"].get(a, {}).get("n") for m in ms)]
    if aliases:
        fig = Figure(figsize=(max(6, 0.9 * len(ms) + 2), 3.2 * len(aliases)))
        axes = fig.subplots(len(aliases), 1, squeeze=False)[:, 0]
        for ax, a in zip(axes, aliases):
            series, labels = [], []
            for m in ms:
                vals = [
                    data.pointwise.get((r["key"], a))
                    for r in data.gens.values()
                    if r["experiment"] == m["experiment"] and r["variant"] == m["method"] and "error" not in r
                ]
                vals = [v for v in vals if v is not None and not math.isnan(v)]
                if vals:
                    series.append(vals)
                    labels.append(f"{m['method']}\n{m['experiment']}")
            if series:
                ax.boxplot(series, showmeans=True)
                ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
            name = report["scorers"][a]
            ax.set_title(a if a == name else f"{a} ({name})", fontsize=10)
        fig.tight_layout()
        _save(fig, out_dir / PLOTS["scores"])
        drawn["score distributions"] = PLOTS["scores"]

    sweep = [m for m in ms if m["lambda"] is not None]
    if report["lambda_sweep"] and sweep:
        fig = Figure(figsize=(9, 3.6))
        ax1, ax2 = fig.subplots(1, 2)
        for key in dict.fromkeys((m["experiment"], m["base_method"]) for m in sweep):
            pts = sorted(
                (m["lambda"], m["cost"]["acceptance"]["mean"], m["cost"]["tokens_per_s"]["mean"])
                for m in sweep
                if (m["experiment"], m["base_method"]) == key
            )
            lams = [p[0] for p in pts]
            ax1.plot(lams, [p[1] if p[1] is not None else np.nan for p in pts], marker="o", label=f"{key[1]} {key[0]}")
            ax2.plot(lams, [p[2] if p[2] is not None else np.nan for p in pts], marker="o", label=f"{key[1]} {key[0]}")
        all_lams = sorted({m["lambda"] for m in sweep})
        for ax in (ax1, ax2):
            ax.set_xticks(all_lams)
            ax.set_xlabel("λ (draft window)")
        ax1.set_ylabel("acceptance rate")
        ax2.set_ylabel("tokens/s")
        ax1.legend(fontsize=7)
        fig.suptitle("Lambda sweep")
        fig.tight_layout()
        _save(fig, out_dir / PLOTS["lambda"])
        drawn["lambda sweep"] = PLOTS["lambda"]

    obj = [m for m in ms if m["objectives"]]
    if report["objectives"] and obj:
        fig = Figure(figsize=(6, 3.8))
        ax = fig.subplots()
        for meth in dict.fromkeys(m["method"] for m in obj):
            # by k only: several experiments may share a k (two --objectives lists), and the stats dicts do not order
            obj_pts = sorted(
                ((m["objectives"], m["cost"]["seconds"]) for m in obj if m["method"] == meth), key=lambda p: p[0]
            )
            ks = [p[0] for p in obj_pts]
            ys = [p[1]["mean"] if p[1]["mean"] is not None else np.nan for p in obj_pts]
            err = [
                [y - p[1]["ci"][0] if p[1]["ci"] else 0 for y, p in zip(ys, obj_pts)],
                [p[1]["ci"][1] - y if p[1]["ci"] else 0 for y, p in zip(ys, obj_pts)],
            ]
            ax.errorbar(ks, ys, yerr=err, marker="o", capsize=3, label=meth)
        ax.set_xlabel("number of objectives")
        ax.set_ylabel("seconds per response")
        ax.set_xticks(sorted({m["objectives"] for m in obj}))
        ax.set_title("Inference time vs. number of objectives")
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save(fig, out_dir / PLOTS["objectives"])
        drawn["inference time vs objectives"] = PLOTS["objectives"]
    return drawn


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _plots_written_before(run_dir: Path) -> set[str]:
    """The plot files the previous ``report.json`` of this run lists (drawn, or kept from an earlier
    report): the only files a new report may remove (a file the user put there under the same name
    is not ours to delete)."""
    try:
        old = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return set()
    out: set[str] = set()
    for field in ("plots", "plots_kept"):
        listed = old.get(field) if isinstance(old, dict) else None
        if isinstance(listed, dict):
            out |= {f for f in listed.values() if isinstance(f, str) and f in PLOTS.values()}
    return out


def _matplotlib_works() -> bool:
    """Whether :func:`write_plots` can draw: matplotlib (the ``eval`` extra) imports."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return False
    return True


def _save(fig: Any, path: Path) -> None:
    """``fig.savefig`` to ``path`` atomically; an unwritable run directory is an :class:`EvalError`."""
    with files.atomic_write(path, "wb", what="report file", error=EvalError) as f:
        fig.savefig(f, format="png", dpi=110)


#: why a report asked for plots draws none when matplotlib is missing (report.md, report.json, the warning)
NO_MATPLOTLIB = 'matplotlib is not installed; run: pip install -e ".[eval]" in your persona-judge clone'


def write_report(run_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and the PNG plots into ``run_dir``; returns their paths.

    ``plots=False`` draws no plot and leaves the PNG files of an earlier report as they are (they
    may show older numbers, so ``report.md`` does not show them; ``report.json`` lists them under
    ``plots_kept``, ``plots`` being what this report drew). A report with plots removes the plots of
    earlier reports that no longer apply. A run directory that cannot be written is an :class:`EvalError`.
    Without matplotlib a report asked for plots does what ``plots=False`` does and says so in one
    :class:`PersonaJudgeWarning` (and under ``plots_skipped``): the earlier plots were drawn from these
    rows too, so deleting them would lose results that cannot be redrawn here.
    """
    run_dir = Path(run_dir)
    data = RunData(run_dir)  # a directory that is not a readable run is refused before anything is touched
    report = build_report(run_dir, data)
    before = _plots_written_before(run_dir)
    if plots and not _matplotlib_works():
        plots = False
        report["plots_skipped"] = NO_MATPLOTLIB
    drawn = write_plots(report, data, run_dir) if plots else {}
    report["plots"] = drawn
    if plots:
        for stale in before - set(drawn.values()):
            try:  # a plot of ours that no longer applies must not linger
                (run_dir / stale).unlink(missing_ok=True)
            except OSError as err:
                raise EvalError(f"cannot remove the old plot {run_dir / stale}: {files.os_error_text(err)}") from None
    else:
        report["plots_kept"] = {
            title: file for title, file in PLOT_TITLES.items() if file in before and (run_dir / file).is_file()
        }
        if "plots_skipped" in report:
            kept = ", ".join(report["plots_kept"].values())
            kept = f"; the earlier report's {kept} are kept and may show older numbers" if kept else ""
            warnings.warn(f"plots skipped: {NO_MATPLOTLIB}{kept}", PersonaJudgeWarning, stacklevel=2)
    out = {"json": run_dir / "report.json", "markdown": run_dir / "report.md"}
    write_json_atomic(out["json"], _jsonable(report))
    md = render_markdown(report, drawn)
    files.write_text_atomic(out["markdown"], md, what="report file", error=EvalError)
    for name, file in drawn.items():
        out[name] = run_dir / file
    return out


__all__ = [
    "build_report",
    "render_markdown",
    "write_report",
    "write_plots",
    "bootstrap_ci",
    "paired_differences",
    "RunData",
    "GENERATIONS",
    "SCORES",
]
