"""``personajudge bench``: Persona-judge speed against plain decoding, side by side."""

from __future__ import annotations

import argparse
import json
import sys

from personajudge.bench import ALL_METHODS, DEFAULT_PROMPT, bench_views, format_table, measure_memory, run_bench
from personajudge.core.config import RunConfig, check_seed_span
from personajudge.core.errors import ConfigError
from personajudge.core.files import OutputError, check_text

from .options import add_run_options, config_from_args, mark_refused, warn_unused_config_method


def cmd_bench(args: argparse.Namespace) -> int:
    if args.method is not None:  # bench times the methods of --methods; --method would be silently ignored
        raise ConfigError("bench times the methods --methods names; --method has no effect here: use --methods")
    if sys.stdout is None or sys.stdout.closed:  # `>&-`: refused before the model loads and the bench runs
        raise OutputError("standard output is closed: there is nowhere to print the report")
    if not args.prompt.strip():  # refused here, not after the model has loaded
        raise ConfigError("--prompt is empty")
    check_text(args.prompt, "--prompt", ConfigError)  # undecodable bytes in the argument hold surrogates
    cfg, prefs = config_from_args(args)
    if args.views is not None and args.views < 1:
        raise ConfigError("--views must be at least 1")
    _check_config_file(args, cfg)
    bench_views(cfg, args.views, prefs)  # --views against --view, before the model loads
    if args.repeats < 1:
        raise ConfigError("--repeats must be at least 1")
    seed = cfg.decoding.seed or 0
    # timed run r uses seed + r (the memory probe seed + 1)
    check_seed_span(seed, args.repeats + 1, f"--seed {seed} with --repeats {args.repeats}")
    if args.reference_max_new_tokens is not None and args.reference_max_new_tokens < 1:
        raise ConfigError(f"--reference-max-new-tokens must be at least 1, got {args.reference_max_new_tokens}")
    if args.reference_max_new_tokens is not None and args.reference_max_new_tokens > cfg.decoding.max_new_tokens:
        raise ConfigError(
            f"--reference-max-new-tokens {args.reference_max_new_tokens} is more than --max-new-tokens "
            f"{cfg.decoding.max_new_tokens}: it caps the reference's length, it cannot lengthen it"
        )
    methods = None
    if args.methods is not None:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if not methods:
            raise ConfigError(f"--methods names no method: {args.methods!r}")
        twice = sorted({m for m in methods if methods.count(m) > 1})
        if twice:  # each method is one row of the table; a repeat would only time it again
            raise ConfigError(f"--methods lists {', '.join(twice)} twice: {args.methods!r}")
    if args.reference_max_new_tokens is not None and "reference" not in (methods or ALL_METHODS):
        raise ConfigError(  # it caps only the reference's length: without that row it would change nothing
            f"--reference-max-new-tokens has no effect: --methods {args.methods} does not time the reference; "
            "add reference to --methods or drop the flag"
        )
    warn_unused_config_method(args, methods or ALL_METHODS, "bench", "timed")
    rep = run_bench(
        cfg,
        prompt=args.prompt,
        views=args.views,
        repeats=args.repeats,
        preferences=prefs,
        methods=methods,
        progress=not args.json,
        reference_max_new_tokens=args.reference_max_new_tokens,
        steps=not args.no_steps,
    )
    if not args.no_memory:
        rep["memory"].update(measure_memory(cfg, args.prompt, args.views, prefs))
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print(format_table(rep))
    return 0


def _check_config_file(args: argparse.Namespace, cfg: RunConfig) -> None:
    """What the bench refuses, said of where the value came from: a ``--config`` file's ``views`` or
    ``decoding.stop`` is named as the file's (``run_bench`` names the flags, which were not given)."""
    if args.config is None:
        return
    if cfg.views and not args.view and args.views is not None and args.views != len(cfg.views):
        raise ConfigError(
            f"--views {args.views} does not match the {len(cfg.views)} views of the config file {args.config}; "
            "drop --views to time them, or give the views with --prefer or --view"
        )
    if cfg.decoding.stop and args.stop is None:
        raise ConfigError(
            "the bench times a fixed number of tokens (the native plain sampler has no stop strings): "
            f"the config file {args.config} sets decoding.stop; bench with a file without it"
        )


def register(sub) -> None:
    p = sub.add_parser("bench", help="tokens/s of persona-judge vs plain decoding, side by side")
    add_run_options(
        p, seed_help="seed of each method's warm-up run; timed run r = 1..repeats uses seed + r (default 0)"
    )
    p.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help=f"the prompt every timed run decodes (default {DEFAULT_PROMPT!r})"
    )
    p.add_argument(
        "--views",
        type=int,
        default=None,
        help="number of views K, one preference each (default 2; with --view, the views given are timed)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method, after one warm-up (default 3)")
    p.add_argument(
        "--methods",
        metavar="A,B",
        help=f"comma-separated methods, each once (default {','.join(ALL_METHODS)}; any registered method "
        "can be added, e.g. prompt, mod, pad). --method-option goes to the methods that take it; --method "
        "and --stop are refused (the bench times a fixed number of tokens)",
    )
    p.add_argument(
        "--reference-max-new-tokens",
        type=int,
        dest="reference_max_new_tokens",
        metavar="N",
        help="cap the slow reference method's length at N tokens, 1 <= N <= --max-new-tokens (default: "
        "--max-new-tokens). Its tokens/s falls as its output grows (no KV cache), so a capped reference is "
        "faster per token than over the full length: the 'over reference' line then says it is not like for like",
    )
    p.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the peak-memory subprocesses (each generates what the timed runs do, seed + 1)",
    )
    p.add_argument(
        "--no-steps",
        action="store_true",
        dest="no_steps",
        help="skip timing the persona-judge loop's steps on the backend, and the measured ceiling run",
    )
    p.add_argument("--json", action="store_true", help="print the stable JSON report")
    mark_refused(
        p,
        {
            "method": "refused: bench times the methods --methods names",
            "stop": "refused: the bench times a fixed number of tokens",
        },
    )
    p.set_defaults(func=cmd_bench)
