"""``personajudge generate``: one prompt (streamed to the terminal) or a JSONL batch."""

from __future__ import annotations

import argparse
import json
import sys

from personajudge.api import PersonaJudge
from personajudge.batch import read_records, run_jsonl
from personajudge.core.errors import PersonaJudgeError

from .options import add_run_options, config_from_args


def _stats_line(res) -> str:
    s = res.stats
    acc = f", acceptance {s.acceptance_rate:.2f}" if s.acceptance_rate is not None else ""
    return (f"[{s.method}] {s.tokens} tokens in {s.wall_time_s:.2f}s ({s.tokens_per_s:.1f} tok/s){acc}, "
            f"{s.views} view(s), seed {s.seed}, finish: {res.finish_reason}")


def _generate_jsonl(args: argparse.Namespace) -> int:
    """``generate --input FILE.jsonl``: every prompt through generate_batch, one JSON line each."""
    if args.prompt is not None:
        raise PersonaJudgeError("give either a prompt or --input FILE.jsonl, not both")
    if args.batch_size < 1:
        raise PersonaJudgeError("--batch-size must be at least 1")
    records = read_records(args.input)  # validated before the model loads
    cfg, prefs = config_from_args(args)
    with PersonaJudge(cfg) as pj:
        run_jsonl(pj, records, preferences=prefs, batch_size=args.batch_size, output=args.output,
                  overwrite=args.overwrite, progress=not args.quiet)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.input is not None:
        return _generate_jsonl(args)
    if args.output is not None:
        raise PersonaJudgeError("--output needs --input FILE.jsonl (a single result goes to stdout; see --json)")
    if args.prompt is None:
        raise PersonaJudgeError("give a prompt (or '-' to read it from stdin), or --input FILE.jsonl")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt or not prompt.strip():
        raise PersonaJudgeError("the prompt is empty")
    cfg, prefs = config_from_args(args)
    stream = sys.stdout.isatty() and not args.json
    on_text = (lambda t: (sys.stdout.write(t), sys.stdout.flush())) if stream else None
    with PersonaJudge(cfg) as pj:
        res = pj.generate(prompt, preferences=prefs, on_text=on_text)
    if args.json:
        print(json.dumps(res.as_dict(), ensure_ascii=False))
    else:
        if stream:
            sys.stdout.write("\n")
        else:
            print(res.text)
        if not args.quiet:
            print(_stats_line(res), file=sys.stderr)
    return 0


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate one response")
    g.add_argument("prompt", nargs="?", help="the prompt ('-' reads it from stdin); omit it with --input")
    add_run_options(g)
    g.add_argument("--json", action="store_true", help="print one JSON object with text, tokens and stats")
    g.add_argument("-q", "--quiet", action="store_true", help="no stats line on stderr")
    b = g.add_argument_group("batch (JSONL)")
    b.add_argument("--input", metavar="FILE.jsonl",
                   help='one JSON object per line: {"prompt": str or chat messages, "id"?, "seed"?}')
    b.add_argument("--output", metavar="FILE.jsonl", help="results, one JSON line per prompt (default: stdout)")
    b.add_argument("--batch-size", type=int, default=8, dest="batch_size",
                   help="prompts decoded together as one batch (default 8)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    g.set_defaults(func=cmd_generate)
