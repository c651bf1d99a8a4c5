"""``personajudge generate``: one prompt (streamed to the terminal) or a JSONL batch."""

from __future__ import annotations

import argparse
import sys
import warnings

from personajudge.api import PersonaJudge, _check_call
from personajudge.batch import JsonlBatch, local_executor, read_records, stdout_json
from personajudge.core.errors import ConfigError, PersonaJudgeError, PersonaJudgeWarning
from personajudge.core.files import OutputError, check_text, read_stream
from personajudge.core.processes import terminate_as_exit
from personajudge.distributed import ReplicaPool

from .options import add_run_options, config_from_args, file_path_arg
from .ray_options import add_ray_options, ray_options_from_args, replica_flags

DEFAULT_BATCH_SIZE = 8


def _stats_line(res) -> str:
    s = res.stats
    acc = f", acceptance {s.acceptance_rate:.2f}" if s.acceptance_rate is not None else ""
    return (
        f"[{s.method}] {s.tokens} tokens in {s.wall_time_s:.2f}s ({s.tokens_per_s:.1f} tok/s){acc}, "
        f"{s.views} view(s), seed {s.seed}, finish: {res.finish_reason}"
    )


def _generate_jsonl(args: argparse.Namespace) -> int:
    """``generate --input FILE.jsonl``: every prompt through generate_batch, one JSON line each.

    Resumable: rerunning the same command continues from ``<output>.partial`` (see personajudge.batch).
    With ``--ray`` the chunks run on Ray replicas and the driver writes the same files.
    """
    if args.prompt is not None:
        raise PersonaJudgeError("give either a prompt or --input FILE.jsonl, not both")
    if args.output in (None, "-"):  # refused, as they are without --input: they would silently do nothing
        for flag, given, why in (
            ("--overwrite", args.overwrite, "standard output replaces no file"),
            ("--force", args.force, "standard output keeps no partial file to resume"),
        ):
            if given:
                raise PersonaJudgeError(f"{flag} needs --output FILE ({why})")
    batch_size = DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size
    if batch_size < 1:
        raise PersonaJudgeError("--batch-size must be at least 1")
    if args.show_prompt:
        warnings.warn(
            "--show-prompt does nothing with --input (it shows one prompt's views); run one prompt to see them",
            PersonaJudgeWarning,
            stacklevel=2,
        )
    if args.json:
        warnings.warn(
            "--json does nothing with --input: every result is a JSON line already", PersonaJudgeWarning, stacklevel=2
        )
    ray_opts = ray_options_from_args(args)
    records = read_records(args.input)  # validated before the model loads
    cfg, prefs = config_from_args(args)
    _check_call(cfg, {"preferences": prefs})  # the method's checks of these views, before the model loads
    job = JsonlBatch(
        records,
        cfg,
        prefs,
        batch_size=batch_size,
        output=args.output,
        overwrite=args.overwrite,
        force=args.force,
        progress=not args.quiet,
        source=args.input,
    )
    with job:  # output paths and the partial file are checked before any model loads
        if ray_opts is None:
            # `kill PID`: exit 143 after the one line that says which rows are kept, as a --ray run does
            with terminate_as_exit(), PersonaJudge(cfg) as pj:
                job.run(local_executor(pj, prefs))
        else:
            with ReplicaPool(cfg, ray_opts, quiet=args.quiet) as pool:
                job.run(pool.executor(prefs))
                if not args.quiet and pool.overhead_line():
                    print(pool.overhead_line(), file=sys.stderr)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.input is not None:
        return _generate_jsonl(args)
    if args.output is not None:
        raise PersonaJudgeError("--output needs --input FILE.jsonl (a single result goes to stdout; see --json)")
    # refused, as --output is: each is about a batch, and one prompt would silently ignore it
    for flag, given, why in (
        ("--batch-size", args.batch_size is not None, "one prompt is decoded alone"),
        ("--overwrite", args.overwrite, "a single result goes to stdout"),
        ("--force", args.force, "it resumes a batch's partial file"),
    ):
        if given:
            raise PersonaJudgeError(f"{flag} needs --input FILE.jsonl ({why})")
    ray = (["--ray"] if args.ray is not None else []) + replica_flags(args)
    if ray:
        raise PersonaJudgeError(f"{', '.join(ray)} needs --input FILE.jsonl (one prompt runs in this process)")
    if args.prompt is None:
        raise PersonaJudgeError("give a prompt (or '-' to read it from stdin), or --input FILE.jsonl")
    if args.prompt == "-" and sys.stdin is None:  # `<&-`: Python leaves sys.stdin None
        raise ConfigError("standard input is closed; give the prompt as an argument, or pipe it in")
    if sys.stdout is None or sys.stdout.closed:  # `>&-`: refused before the model loads
        raise OutputError("standard output is closed: there is nowhere to print the result")
    # bytes, decoded here: invalid UTF-8 is one line naming the offset, before any model loads
    prompt = read_stream(sys.stdin.buffer, "standard input", ConfigError) if args.prompt == "-" else args.prompt
    if not prompt or not prompt.strip():
        raise PersonaJudgeError("the prompt is empty")
    check_text(prompt, "the prompt", ConfigError)  # an argument with undecodable bytes holds surrogates
    cfg, prefs = config_from_args(args)
    _check_call(cfg, {"preferences": prefs})  # the method's checks of these views, before the model loads
    # Text streams (flushed per committed token) to a terminal and to a pipe alike; --json prints one object.
    stream = not args.json
    on_text = _write_flushed if stream else None
    with PersonaJudge(cfg) as pj:
        if args.show_prompt:
            _show_prompts(pj, prompt, prefs)
        res = pj.generate(prompt, preferences=prefs, on_text=on_text)
    if args.json:
        print(stdout_json(res.as_dict()))  # \u escapes where stdout cannot encode the text
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        if not args.quiet:
            print(_stats_line(res), file=sys.stderr)
    return 0


def _write_flushed(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _show_prompts(pj: PersonaJudge, prompt: str, prefs) -> None:
    """Each view's rendered context on stderr, framed, before generating."""
    with warnings.catch_warnings():  # generate() says the same right after
        warnings.simplefilter("ignore")
        cfg, meth, views = pj._prepare(prefs, None, None, {})
    settings = pj.settings(cfg, views, meth)
    rendered = pj.render_views(prompt, cfg, meth, views)
    planned = meth.plan(views)
    print(f"# method {cfg.method}, encoder {settings['encoder']}, {len(rendered)} view(s)", file=sys.stderr)
    for i, ((text, _), view) in enumerate(zip(rendered, planned)):
        names = ", ".join(p.name for p in view) or "no preference"
        print(f"# --- view {i} ({names}) ---\n{text}\n# --- end of view {i} ---", file=sys.stderr)


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate one response, or one per line of a JSONL file (--input)")
    g.add_argument("prompt", nargs="?", help="the prompt ('-' reads it from stdin); omit it with --input")
    add_run_options(g)
    g.add_argument("--json", action="store_true", help="print one JSON object with text, tokens and stats")
    g.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="nothing on stderr but warnings and errors: no stats line (one prompt), no progress bar and no "
        "'resuming' note (--input)",
    )
    g.add_argument(
        "--show-prompt",
        action="store_true",
        dest="show_prompt",
        help="print each view's rendered context (on stderr) before generating",
    )
    b = g.add_argument_group("batch (JSONL)")
    b.add_argument(
        "--input",
        metavar="FILE.jsonl",
        type=file_path_arg,
        help='one JSON object per line: {"prompt": str or chat messages, "id"?, "seed"?}',
    )
    b.add_argument(
        "--output",
        metavar="FILE.jsonl",
        type=file_path_arg,
        help="results, one JSON line per prompt (default: stdout); never the input file",
    )
    b.add_argument(
        "--batch-size",
        type=int,
        default=None,
        dest="batch_size",
        help=f"prompts decoded together as one batch (default {DEFAULT_BATCH_SIZE})",
    )
    b.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    b.add_argument(
        "--force",
        action="store_true",
        help="resume from a partial file made with other settings: rows that still match are kept, "
        "the rest are generated again",
    )
    add_ray_options(g)
    g.set_defaults(func=cmd_generate)
