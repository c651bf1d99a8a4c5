"""``personajudge bench``: Persona-judge speed against plain decoding, side by side.

Everything runs in one process on one loaded model, the same prompt and the
same settings. Each method gets a warm-up run (all warm-ups first), then
``repeats`` timed runs with different seeds, interleaved: repeat 1 of every
method, then repeat 2 of every method, ... so a load that comes and goes on a
shared machine moves every method's median alike, and the ratios stay
comparable. The median tokens/s is reported. Peak memory is measured in fresh
subprocesses (one with a single view, one with K views), because a process's
peak RSS cannot be reset; each reads its own address space's high-water mark
(``VmHWM``), which, unlike ``ru_maxrss``, does not carry the bench's over.
"""

from __future__ import annotations

import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from personajudge.api import PersonaJudge, make_method
from personajudge.core.config import DecodingConfig, RunConfig, validation_message
from personajudge.core.errors import ConfigError, PersonaJudgeError, PersonaJudgeWarning
from personajudge.core.processes import dies_with_parent
from personajudge.plugins import get_method, preference_library
from personajudge.preferences import Preference, PreferenceSpec, build_views, reported

from .steps import device_sync, format_steps, step_costs

#: version 2: memory keys and figures in MiB (``*_mib``, they were mislabelled ``*_mb``); ``steps`` is the
#: loop's own step cycle (:mod:`personajudge.bench.steps`); ``settings`` records the schedule, roles,
#: encoder and system message; ``results[].tokens`` is always an integer
SCHEMA = "personajudge.bench/2"
DEFAULT_PROMPT = "Why is the sky blue?"
DEFAULT_PREFS = ["concise", "humor", "expert", "friendly", "vivid", "creative", "correct", "touching"]
ALL_METHODS = ["plain", "persona-judge", "persona-judge-base", "reference"]


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _peak_rss_mib() -> float:
    """This process's own peak RSS in MiB (2**20 bytes): ``VmHWM`` of ``/proc/self/status``.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: on Linux that high-water mark is the process's, not its
    address space's, and it carries over from the parent through fork and exec. A probe started by
    the bench (which already holds the model) would report at least the bench's own RSS, and every
    probe the same figure. ``VmHWM`` belongs to the address space, which exec replaces, so a fresh
    process starts from zero. Where there is no ``/proc`` (macOS), ``ru_maxrss`` is all there is
    (bytes there, KiB on Linux).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


def _current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


def _gpu_peak_mib() -> float | None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


Views = list[list[Preference]]


def bench_views(cfg: RunConfig, k: int | None = None, preferences: Sequence[str | Preference] | None = None) -> Views:
    """The K views the bench times, resolved (a typo fails here, before the model loads).

    ``cfg.views`` (``--view``) when given: those views, and ``k`` (``--views``) may only repeat
    their number. Otherwise one view per preference: ``preferences`` (the CLI's ``--prefer`` /
    ``--preferences-file`` objects, as the API takes them) or the config's, else the first ``k``
    (default 2) of :data:`DEFAULT_PREFS`. The preference objects also define names the views use.
    """
    prefs: list[PreferenceSpec] = list(preferences) if preferences is not None else list(cfg.preferences)
    lib = preference_library()
    if cfg.views:
        if k is not None and k != len(cfg.views):
            raise ConfigError(f"--views {k} does not match the {len(cfg.views)} --view groups given")
        return build_views(prefs, cfg.views, lib)
    k = 2 if k is None else k
    if k < 1:
        raise ConfigError(f"--views must be at least 1, got {k}")
    if not prefs:
        if k > len(DEFAULT_PREFS):  # the defaults are the bench's, not something the user gave
            raise ConfigError(
                f"--views {k} needs {k} preferences and none were given (the built-in defaults are "
                f"{len(DEFAULT_PREFS)}); give them with --prefer or --preferences-file"
            )
        prefs = list(DEFAULT_PREFS[:k])
    if len(prefs) < k:
        raise ConfigError(f"--views {k} needs at least {k} preferences, got {len(prefs)}")
    return build_views(prefs[:k], None, lib)


def _names(view: list[Preference]) -> list[str]:
    """A view's preferences as the table's label names them: by name, a free-text preference by its text."""
    return [p.description if p.source == "free text" else p.name for p in view]


def _reported(view: list[Preference]) -> list[str | dict[str, Any]]:
    """A view's preferences as ``settings.view_preferences`` reports them: as ``generate``'s settings do
    (:func:`~personajudge.preferences.reported`: a registered one by name, free text by its text, one a
    file defined or adjusted as its full table), so a config's ``views`` takes the list back and
    resolves each to the same prompt (a file's ``pirate`` is no built-in name; a file's ``concise``
    with its own examples is not the built-in one)."""
    lib = preference_library()
    return [reported(p, lib) for p in view]


def _label(view: list[Preference]) -> str:
    """A view in one string, its preferences joined by commas: a label for the table. Not something to
    feed back to ``--view`` when a free-text preference contains a comma (``--view`` splits there);
    ``settings.view_preferences`` keeps each preference whole."""
    return ",".join(_names(view))


def _multi_view(name: str) -> bool:
    """Whether ``name`` is a method whose rows mean something only with two views or more (with one it
    is plain sampling under another name)."""
    return name != "plain" and getattr(get_method(name), "min_views", 1) >= 2


def _method_options(cfg: RunConfig, methods: list[str]) -> dict[str, dict[str, Any]]:
    """The ``method_options`` each timed method gets: all of them for a method that takes every one,
    none for a method that takes none. Refused (before the model loads) when no method takes them, or
    when a method takes only some of them (which of them were meant for it is a guess). ``plain``
    (the backend's sampler, else the ``prompt`` method) takes none."""
    opts = dict(cfg.method_options)
    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    if not opts:
        return out
    takes: dict[str, list[str]] = {}
    for m in methods:
        cls = get_method("prompt" if m == "plain" else m)
        try:
            params = inspect.signature(cls).parameters.values()
        except (TypeError, ValueError):
            params = []  # type: ignore[assignment]
        takes[m] = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keys = ", ".join(sorted(opts))
    partial = [m for m in methods if set(opts) & set(takes[m]) and not set(opts) <= set(takes[m])]
    if partial:
        m = partial[0]
        raise ConfigError(
            f"--method-option {keys}: '{m}' takes only {', '.join(sorted(set(opts) & set(takes[m])))} of them; "
            "bench one method's options at a time"
        )
    full = [m for m in methods if set(opts) <= set(takes[m])]
    if not full:
        raise ConfigError(f"--method-option {keys}: none of the benched methods ({', '.join(methods)}) takes them")
    for m in full:
        make_method(cfg.model_copy(update={"method": m, "method_options": opts}))  # bad values: here, not later
        out[m] = opts
    return out


def _capped(d: DecodingConfig, max_new_tokens: int) -> DecodingConfig:
    """``d`` with another ``max_new_tokens``, validated like any config (``model_copy`` would not check
    it, and a 0 or negative cap would time a run of another length than the report says)."""
    try:
        return DecodingConfig.model_validate({**d.model_dump(by_alias=True), "max_new_tokens": max_new_tokens})
    except ValidationError as err:
        raise ConfigError(
            "reference_max_new_tokens: " + validation_message(err).removeprefix("max_new_tokens: ")
        ) from None


def run_bench(
    cfg: RunConfig,
    *,
    prompt: str = DEFAULT_PROMPT,
    views: int | None = None,
    repeats: int = 3,
    methods: list[str] | None = None,
    progress: bool = True,
    reference_max_new_tokens: int | None = None,
    steps: bool = True,
    backend: Any = None,
    preferences: Sequence[str | Preference] | None = None,
    ceiling_run: bool | None = None,
) -> dict[str, Any]:
    """Time each method; returns the JSON-able report (see :data:`SCHEMA`).

    The views are :func:`bench_views`'s: ``cfg.views`` when set (``views`` may only repeat their
    number), else ``views`` (default 2) of ``preferences`` (default: the config's, else
    :data:`DEFAULT_PREFS`), one each. ``settings.view_preferences`` lists each view's preferences as
    ``generate``'s settings report them (names; a free-text one by its text; a file's or a caller's as its
    full table), ``settings.preferences`` each view as one comma-joined label.

    The bench times a fixed number of tokens, so stop strings (``decoding.stop``) are refused: the
    backend's native sampler has none, and a run cut short would be compared with a full one.
    ``cfg.method_options`` go to the methods that take them (:func:`_method_options`); ``cfg.method``
    is not used (``methods`` names what is timed). With one view, the multi-view methods (persona-judge,
    reference, mod, ...) would time plain sampling under their names: they are skipped with a
    :class:`PersonaJudgeWarning`.

    ``backend``: an already loaded backend to time (then it is not closed
    here); by default the one ``cfg`` names is loaded, and closed at the end.

    With ``steps`` (and at least two views), the backend's step costs and the
    estimate they imply are measured too (:mod:`personajudge.bench.steps`), and so is the ceiling (one
    more persona-judge run per repeat, every draft accepted); ``ceiling_run=False`` leaves that run out
    (the GPU check's time budget has no room for it), ``None`` follows ``steps``.
    """
    from tqdm.auto import tqdm

    methods = methods or ALL_METHODS
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:
        raise ConfigError(f"methods: {', '.join(twice)} listed twice (each method is timed once per repeat)")
    if reference_max_new_tokens is not None:
        _capped(cfg.decoding, reference_max_new_tokens)  # refused before the model loads
        if reference_max_new_tokens > cfg.decoding.max_new_tokens:
            raise ConfigError(
                f"--reference-max-new-tokens {reference_max_new_tokens} is more than --max-new-tokens "
                f"{cfg.decoding.max_new_tokens}: it caps the reference's length, it cannot lengthen it"
            )
    unknown = [m for m in methods if m not in ALL_METHODS and m != "prompt"]
    if unknown:
        for m in unknown:
            get_method(m)  # raises with the registered names
    if cfg.decoding.stop:
        raise ConfigError(
            "the bench times a fixed number of tokens (the native plain sampler has no stop strings): drop --stop"
        )
    pviews = bench_views(cfg, views, preferences)
    views = len(pviews)
    if views == 1:
        skipped = [m for m in methods if _multi_view(m)]
        methods = [m for m in methods if m not in skipped]
        if not methods:
            raise ConfigError(
                f"with 1 view, {', '.join(skipped)} would be plain sampling under another name: bench --views 2 or more"
            )
        if skipped:
            warnings.warn(
                f"1 view: skipping {', '.join(skipped)} (with one view they are plain sampling)",
                PersonaJudgeWarning,
                stacklevel=2,
            )
    options = _method_options(cfg, methods)
    cfg = timed_config(cfg)
    t_load = time.perf_counter()
    pj = PersonaJudge(cfg, backend=backend)
    load_s = time.perf_counter() - t_load
    d = cfg.decoding
    base_seed = d.seed if d.seed is not None else 0
    rows: list[dict[str, Any]] = []
    # The ceiling: persona-judge's own loop (same K, schedule, roles, lambda, length) on K copies of the
    # first view, so every draft is accepted (p == q). A rejection only adds forwards for fewer tokens,
    # so this bounds the persona-judge row from above, measured the way the row is (see steps.py for why
    # isolated step costs do not).
    ceiling_on = (steps if ceiling_run is None else ceiling_run) and views >= 2
    same = [pviews[0]] * views
    # drawn only on a terminal (tqdm's disable=None), as batch mode's: redraws are noise in a log file
    total = (len(methods) + ceiling_on) * (repeats + 1)
    bar = tqdm(total=total, desc="bench", disable=None if progress else True, file=sys.stderr)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in methods}
    ceiling_runs: list[dict[str, Any]] = []
    try:
        # Repeat by repeat, every method in turn: the warm-ups (rep 0) first, then plain r1, pj r1, ...,
        # plain r2, pj r2, ...: side by side, so a load on a shared machine falls on every method alike.
        for rep in range(repeats + 1):
            seed = base_seed + rep
            for name in methods:
                c = cfg.model_copy(update={"method_options": options[name]})
                runs[name].append(_one(pj, c, name, prompt, pviews, seed, reference_max_new_tokens, make_method))
                bar.update(1)
            if ceiling_on:
                c = cfg.model_copy(update={"method_options": options.get("persona-judge", {})})
                ceiling_runs.append(_one(pj, c, "persona-judge", prompt, same, seed, None, make_method))
                bar.update(1)
        for name in methods:
            timed = runs[name][1:]
            tps = statistics.median(x["tokens_per_s"] for x in timed)
            acc = [x["acceptance_rate"] for x in timed if x["acceptance_rate"] is not None]
            rows.append(
                {
                    "method": name,
                    "tokens_per_s": tps,
                    "acceptance_rate": statistics.mean(acc) if acc else None,
                    # median_low: one run's count, an integer whatever the parity of --repeats
                    "tokens": statistics.median_low(x["tokens"] for x in timed),
                    "views": timed[0]["views"],
                    "runner": timed[0]["runner"],
                    "runs": timed,
                }
            )
        costs = _step_costs(pj, cfg, prompt, pviews, make_method) if steps and views >= 2 else None
    finally:
        bar.close()
        pj.close(keep_backend=backend is not None)  # the caller's backend stays loaded
    plain = next((r["tokens_per_s"] for r in rows if r["method"] == "plain"), None)
    for r in rows:
        r["ratio_to_plain"] = r["tokens_per_s"] / plain if plain else None
    ceiling = None
    if ceiling_on:
        timed = ceiling_runs[1:]
        acc = [x["acceptance_rate"] for x in timed if x["acceptance_rate"] is not None]
        tps = statistics.median(x["tokens_per_s"] for x in timed)
        ceiling = {
            "method": "persona-judge",
            "views": views,
            "view_preferences": [_reported(pviews[0])] * views,
            "schedule": d.schedule,
            "roles": d.roles or "alternate",
            "tokens_per_s": tps,
            "ratio_to_plain": tps / plain if plain else None,
            "acceptance_rate": statistics.mean(acc) if acc else None,
            "tokens": statistics.median_low(x["tokens"] for x in timed),
            "runs": timed,
        }
    pjr = next((r for r in rows if r["method"] == "persona-judge"), None)
    ref = next((r for r in rows if r["method"] == "reference"), None)
    over_ref = (pjr["tokens_per_s"] / ref["tokens_per_s"]) if pjr and ref else None
    return {
        "schema": SCHEMA,
        "machine": machine_info(),
        "backend": pj.backend.describe(),
        "settings": {
            "prompt": prompt,
            "preferences": [_label(v) for v in pviews],
            "view_preferences": [_reported(v) for v in pviews],
            "views": views,
            "method_options": {m: o for m, o in options.items() if o},
            "schedule": d.schedule,
            # None: each method's own (persona-judge alternates, persona-judge-base keeps them fixed)
            "roles": d.roles,
            "encoder": cfg.encoder,  # resolved: the bench times `auto` as `plain`
            "encoder_options": cfg.encoder_options,  # with stop: false, as timed
            "system": cfg.system,
            "repeat_lines": d.repeat_lines,  # 0: the repetition guard is off in every timed run
            "repeats": repeats,
            "lambda": d.lambda_,
            "temperature": d.temperature,
            "top_k": d.top_k,
            "top_p": d.top_p,
            "max_new_tokens": d.max_new_tokens,
            "reference_max_new_tokens": reference_max_new_tokens,
            "seed": base_seed,
        },
        "load_time_s": load_s,
        "results": rows,
        # persona-judge's tokens/s over the reference's; like for like only when both ran the same number of
        # tokens (the reference re-reads its whole context per token, so its tokens/s falls as it grows)
        "persona_judge_over_reference": over_ref,
        "persona_judge_over_reference_tokens": [pjr["tokens"], ref["tokens"]] if pjr and ref else None,
        "ceiling": ceiling,
        "steps": costs,
        "memory": {"peak_rss_mib_this_process": _peak_rss_mib(), "gpu_peak_mib": _gpu_peak_mib()},
    }


def _one(
    pj, cfg: RunConfig, name: str, prompt: str, views: Views, seed: int, ref_tokens, make_method
) -> dict[str, Any]:
    d = cfg.decoding
    if name == "plain":
        # The backend's own sampler on one preference-prompted view: the baseline to beat.
        c = cfg.model_copy(update={"method": "prompt", "preferences": [], "views": None})
        ctx = _encode(pj, c, prompt, views[:1], make_method)[1][0]
        device_sync()
        t0 = time.perf_counter()
        toks = pj.backend.native_generate(
            ctx, temperature=d.temperature, top_k=d.top_k, top_p=d.top_p, max_new_tokens=d.max_new_tokens, seed=seed
        )
        wall = time.perf_counter() - t0
        if toks is not None:
            return {
                "seed": seed,
                "tokens": len(toks),
                "wall_time_s": wall,
                "tokens_per_s": len(toks) / wall,
                "acceptance_rate": None,
                "views": 1,
                "runner": "native",
            }
        name_, run_views = "prompt", views[:1]  # no native sampler: the core's plain loop
    else:
        name_, run_views = name, views
    upd: dict[str, Any] = {"method": name_, "preferences": [], "views": None}
    dec = d.model_copy(update={"seed": seed})
    if name_ == "reference" and ref_tokens is not None:
        dec = _capped(dec, ref_tokens)
    c = cfg.model_copy(update={**upd, "decoding": dec})
    meth, contexts = _encode(pj, c, prompt, run_views, make_method)
    res = pj.decode(contexts, c, meth)
    s = res.stats
    return {
        "seed": seed,
        "tokens": s.tokens,
        "wall_time_s": s.wall_time_s,
        "tokens_per_s": s.tokens_per_s,
        "acceptance_rate": s.acceptance_rate,
        "views": s.views,
        "runner": "core",
    }


def _step_costs(pj, cfg: RunConfig, prompt: str, views: Views, make_method) -> dict[str, Any]:
    """The step cycle of the ``persona-judge`` row (its K views, the run's schedule and roles) timed."""
    c = cfg.model_copy(update={"method": "persona-judge", "preferences": [], "views": None})
    meth, contexts = _encode(pj, c, prompt, views, make_method)
    d = cfg.decoding
    with pj.backend.open(len(contexts)) as session:
        return step_costs(
            session,
            contexts,
            lam=d.lambda_,
            schedule=d.schedule,
            roles=str(d.roles or getattr(meth, "roles", "alternate")),
        )


def timed_config(cfg: RunConfig) -> RunConfig:
    """The config every timed run (and memory probe) uses: a fixed number of tokens, so no stop strings
    implied by the prompt format and no repetition guard; and `auto` means the short `plain` prefixes
    (as in every recorded run), so numbers compare across versions (pass --encoder to time another).
    The views and method options travel per run, so they are emptied here."""
    return cfg.model_copy(
        update={
            "encoder": "plain" if cfg.encoder == "auto" else cfg.encoder,
            "encoder_options": {**cfg.encoder_options, "stop": False},
            "preferences": [],  # resolved: every run passes its views
            "views": None,
            "method_options": {},  # per method: each run gets its own
            "decoding": cfg.decoding.model_copy(update={"repeat_lines": 0}),
        }
    )


def _encode(pj, c: RunConfig, prompt: str, views: Views, make_method):
    """The method ``c`` names, and the token contexts it prompts for the user's ``views``."""
    meth = make_method(c)
    return meth, pj.encode_views(prompt, c, meth, views)


def memory_probe(cfg: RunConfig, prompt: str, views: int, groups: Views | None = None) -> dict[str, Any]:
    """Peak RSS of a fresh process that loads the model and generates with ``views`` views
    (the first ``views`` of ``groups``, default :func:`bench_views` of ``cfg``).

    It generates what the bench's timed runs generate: :func:`timed_config` of ``cfg`` (the same
    encoder, no stop strings, no repetition guard, the full ``max_new_tokens`` unless the model
    ends with EOS) with the first timed run's seed (``seed + 1``). One view runs the core's plain
    loop (the ``prompt`` method; the timed plain row uses the backend's native sampler, which no
    probe can share a process with), K views run ``persona-judge``. ``generated_tokens`` says how
    long the answer was."""
    groups = groups if groups is not None else bench_views(cfg.model_copy(update={"views": None}), max(views, 1))
    method = "prompt" if views == 1 else "persona-judge"
    cfg = timed_config(cfg)
    seed = (cfg.decoding.seed if cfg.decoding.seed is not None else 0) + 1
    with PersonaJudge(cfg) as pj:
        loaded = _current_rss_mib()
        during = [loaded]
        res = pj.generate(
            prompt,
            views=groups[:views],
            method=method,
            seed=seed,
            on_text=lambda _t: during.append(_current_rss_mib()),
        )
        gpu = _gpu_peak_mib()
    # The process peak is usually set while loading the weights; the growth
    # during generation is what the views themselves cost (KV caches, logits).
    return {
        "views": views,
        "peak_rss_mib": _peak_rss_mib(),
        "gpu_peak_mib": gpu,
        "rss_after_load_mib": loaded,
        "generation_rss_growth_mib": max(during) - loaded,
        "generated_tokens": res.stats.tokens,
        "seed": seed,
    }


def measure_memory(
    cfg: RunConfig, prompt: str, views: int | None = None, preferences: Sequence[str | Preference] | None = None
) -> dict[str, Any]:
    """Peak memory of a fresh process with one view and with the bench's K views (:func:`bench_views`)."""
    groups = bench_views(cfg, views, preferences)
    views = len(groups)
    # the views travel resolved: a preferences file's preferences are in no config
    groups_json = json.dumps([[p.model_dump(mode="json") for p in v] for v in groups])
    out = {}
    for k in sorted({1, views}):  # one probe when K is 1
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "personajudge.bench",
                "--probe",
                str(k),
                f"--prompt={prompt}",  # one item: a prompt that starts with "-" is still its value
                f"--config-json={cfg.model_dump_json(by_alias=True)}",
                f"--views-json={groups_json}",
            ],
            capture_output=True,
            text=True,
            timeout=1800,
            preexec_fn=dies_with_parent(),  # a bench killed by a signal leaves no probe running
        )
        if proc.returncode != 0:
            said = (proc.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
            raise PersonaJudgeError(
                f"the memory probe (a fresh process with {k} view(s)) exited with status {proc.returncode}: {said}"
            )
        out[k] = json.loads(proc.stdout.strip().splitlines()[-1])
    one, many = out[1], out[views]
    if views == 1:  # nothing to compare
        res = {
            "peak_rss_mib_1_view": one["peak_rss_mib"],
            "generation_rss_growth_mib_1_view": one["generation_rss_growth_mib"],
            "generated_tokens_1_view": one.get("generated_tokens"),
        }
        if one["gpu_peak_mib"]:
            res["gpu_peak_mib_1_view"] = one["gpu_peak_mib"]
        return res
    res = {
        "peak_rss_mib_1_view": one["peak_rss_mib"],
        f"peak_rss_mib_{views}_views": many["peak_rss_mib"],
        "rss_ratio": many["peak_rss_mib"] / one["peak_rss_mib"],
        "generation_rss_growth_mib_1_view": one["generation_rss_growth_mib"],
        f"generation_rss_growth_mib_{views}_views": many["generation_rss_growth_mib"],
        "generated_tokens_1_view": one.get("generated_tokens"),
        f"generated_tokens_{views}_views": many.get("generated_tokens"),
    }
    if one["gpu_peak_mib"]:
        res.update(
            {
                "gpu_peak_mib_1_view": one["gpu_peak_mib"],
                f"gpu_peak_mib_{views}_views": many["gpu_peak_mib"],
                "gpu_ratio": many["gpu_peak_mib"] / one["gpu_peak_mib"],
            }
        )
    return res


def _probe_tokens(mem: dict[str, Any], k: int) -> str:
    """How long the memory probes' answers were (MiB throughout: 2**20 bytes)."""
    n = [mem.get("generated_tokens_1_view")] + ([mem.get(f"generated_tokens_{k}_views")] if k > 1 else [])
    if any(x is None for x in n):
        return ""
    return f" (probes generated {' and '.join(map(str, n))} tokens)"


def format_table(rep: dict[str, Any]) -> str:
    s = rep["settings"]
    lines = [
        f"backend: {json.dumps(rep['backend'])}",
        f"machine: {rep['machine'].get('cpu', rep['machine']['processor'])}, {rep['machine']['cpus']} CPUs"
        + (f", GPU {rep['machine']['gpu']}" if rep["machine"].get("gpu") else ""),
        f"settings: {s['max_new_tokens']} new tokens, lambda {s['lambda']}, T {s['temperature']}, "
        f"top-k {s['top_k']}, top-p {s['top_p']}, {s['views']} views {s['preferences']}, "
        f"median of {s['repeats']} after a warm-up, repeats interleaved",
        f"schedule {s.get('schedule')}, roles {s.get('roles') or 'each method its own'}, encoder {s.get('encoder')}"
        + (f", system {json.dumps(s['system'])}" if s.get("system") else "")
        + ", no stop strings, no repetition guard",
    ]
    if s.get("method_options"):
        lines.append("method options: " + "; ".join(f"{m} {json.dumps(o)}" for m, o in s["method_options"].items()))
    lines += [
        "",
        f"| {'method':<20} | {'tokens/s':>9} | {'x plain':>7} | {'acceptance':>10} | {'tokens':>6} | runner |",
        f"|{'-' * 22}|{'-' * 11}|{'-' * 9}|{'-' * 12}|{'-' * 8}|--------|",
    ]
    for r in rep["results"]:
        acc = f"{r['acceptance_rate']:.2f}" if r["acceptance_rate"] is not None else "-"
        ratio = f"{r['ratio_to_plain']:.2f}" if r["ratio_to_plain"] is not None else "-"
        lines.append(
            f"| {r['method']:<20} | {r['tokens_per_s']:>9.1f} | {ratio:>7} | {acc:>10} | "
            f"{r['tokens']:>6.0f} | {r['runner']:<6} |"
        )
    if rep.get("persona_judge_over_reference"):
        ratio = rep["persona_judge_over_reference"]
        n_pj, n_ref = rep.get("persona_judge_over_reference_tokens") or (None, None)
        if n_pj == n_ref:
            lines.append(f"\npersona-judge over reference (no KV cache): {ratio:.1f}x")
        else:  # not like for like: say so on the line itself
            lines.append(
                f"\npersona-judge over reference (no KV cache): {ratio:.1f}x, NOT like for like: persona-judge "
                f"over {n_pj} tokens, the reference over {n_ref} (--reference-max-new-tokens); the reference's "
                "tokens/s falls as its output grows"
                + (", so over equal lengths the ratio would be higher" if (n_ref or 0) < (n_pj or 0) else "")
            )
    if rep.get("ceiling"):
        cl = rep["ceiling"]
        of_plain = f" = {cl['ratio_to_plain']:.2f} of plain" if cl["ratio_to_plain"] is not None else ""
        acc = f"{cl['acceptance_rate']:.2f}" if cl["acceptance_rate"] is not None else "-"
        lines.append(
            f"persona-judge ceiling (its loop with all {cl['views']} views the first one's prompt, so every "
            f"draft is accepted: acceptance {acc}; median of {len(cl['runs'])}): {cl['tokens_per_s']:.1f} tokens/s"
            + of_plain
            + f", over {cl['tokens']} tokens"  # a ceiling cut short by an EOS is no ceiling: say its length
        )
    if rep.get("steps"):
        lines.append(format_steps(rep["steps"]))
    mem = rep.get("memory", {})
    if "rss_ratio" not in mem and "peak_rss_mib_1_view" in mem:
        lines.append(
            f"peak RSS: 1 view {mem['peak_rss_mib_1_view']:.0f} MiB; growth while generating: "
            f"{mem['generation_rss_growth_mib_1_view']:.1f} MiB" + _probe_tokens(mem, s["views"])
        )
    if "rss_ratio" in mem:
        k = s["views"]
        lines.append(
            f"peak RSS: 1 view {mem['peak_rss_mib_1_view']:.0f} MiB, {k} views "
            f"{mem[f'peak_rss_mib_{k}_views']:.0f} MiB (ratio {mem['rss_ratio']:.2f}); growth while "
            f"generating: 1 view {mem['generation_rss_growth_mib_1_view']:.1f} MiB, {k} views "
            f"{mem[f'generation_rss_growth_mib_{k}_views']:.1f} MiB" + _probe_tokens(mem, k)
        )
    if "gpu_ratio" in mem:
        k = s["views"]
        lines.append(
            f"peak GPU memory: 1 view {mem['gpu_peak_mib_1_view']:.0f} MiB, {k} views "
            f"{mem[f'gpu_peak_mib_{k}_views']:.0f} MiB (ratio {mem['gpu_ratio']:.2f})"
        )
    return "\n".join(lines)
