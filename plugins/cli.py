"""The ``personajudge`` command line.

User mistakes (a :class:`PersonaJudgeError` or a bad flag) print one line to
stderr and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from personajudge.core.config import build_config, load_config_file
from personajudge.core.errors import PersonaJudgeError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(name: str):
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {v!r}") from None
        return n
    return parse


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Flags shared by generate / bench / eval: backend, preferences, decoding."""
    g = p.add_argument_group("model")
    g.add_argument("--config", metavar="FILE", help="TOML config file; flags override it")
    g.add_argument("--backend", help="backend name (see `personajudge plugins`); default llama-cpp")
    g.add_argument("--model", help="model path or hub id; default: the backend's default model")
    g.add_argument("--device", help="cpu, cuda, cuda:N (hf backend)")
    g.add_argument("--dtype", help="float32, float16, bfloat16 or auto (hf backend)")
    g.add_argument("--threads", type=int, help="CPU threads")
    g.add_argument("--n-ctx", type=int, dest="n_ctx", help="context size in tokens")
    g.add_argument("--n-gpu-layers", type=int, dest="n_gpu_layers", help="layers offloaded to the GPU (llama-cpp)")
    g.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra backend option (repeatable); VALUE is parsed as JSON when it can be")
    g = p.add_argument_group("preferences")
    g.add_argument("--prefer", action="append", default=None, metavar="NAME_OR_TEXT",
                   help="a built-in preference name or a free-text description (repeatable; one view each)")
    g.add_argument("--view", action="append", default=None, metavar="A,B",
                   help="a view carrying several preferences, comma-separated (repeatable)")
    g.add_argument("--preferences-file", metavar="FILE", help="TOML/JSON/YAML list of preferences")
    g.add_argument("--encoder", help="preference encoder: auto, chat-turn, system, plain, instruction, ...")
    g.add_argument("--system", help="system message (chat models)")
    g = p.add_argument_group("decoding")
    g.add_argument("--method", help="persona-judge (default), persona-judge-base, prompt, base, reference, mod, pad")
    g.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option (repeatable), e.g. weight=2 for pad, weights=[0.7,0.3] for mod")
    g.add_argument("--lambda", dest="lam", type=_positive_int("--lambda"), help="draft window (default 4)")
    g.add_argument("--temperature", type=float, help="0 = greedy (default 0.7)")
    g.add_argument("--top-k", dest="top_k", type=int, help="default 20; 0 disables")
    g.add_argument("--top-p", dest="top_p", type=float, help="default 0.9")
    g.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, help="default 128")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--seed", type=int, help="random seed (default: fresh, reported in the stats)")
    g.add_argument("--roles", choices=["alternate", "fixed", "round-robin"], help="override the role schedule")
    g.add_argument("--schedule", choices=["interleaved", "windowed"], help="loop schedule (same decisions)")


def _parse_option(item: str, flag: str = "--backend-option") -> tuple[str, Any]:
    if "=" not in item:
        raise PersonaJudgeError(f"{flag} expects KEY=VALUE, got {item!r}")
    k, v = item.split("=", 1)
    try:
        return k.strip(), json.loads(v)
    except json.JSONDecodeError:
        return k.strip(), v


def config_from_args(args: argparse.Namespace):
    """File config (if any) overridden by the flags that were given."""
    from personajudge.preferences import load_file

    data = load_config_file(args.config) if args.config else {}
    if args.backend_option:
        opts = dict(data.get("backend", {}).get("options", {}))
        opts.update(_parse_option(o) for o in args.backend_option)
        data.setdefault("backend", {})["options"] = opts
    if args.method_option:
        opts = dict(data.get("method_options", {}))
        opts.update(_parse_option(o, "--method-option") for o in args.method_option)
        data["method_options"] = opts
    prefs = None
    if getattr(args, "preferences_file", None):
        prefs = load_file(args.preferences_file)
    if args.prefer is not None:
        prefs = (prefs or []) + list(args.prefer)
    cfg = build_config(
        data,
        **{"backend.name": args.backend, "backend.model": args.model, "backend.device": args.device,
           "backend.dtype": args.dtype, "backend.threads": args.threads, "backend.n_ctx": args.n_ctx,
           "backend.n_gpu_layers": args.n_gpu_layers, "method": args.method, "encoder": args.encoder,
           "system": args.system,
           "views": [[s.strip() for s in v.split(",") if s.strip()] for v in args.view] if args.view else None,
           "decoding.lambda": args.lam, "decoding.temperature": args.temperature, "decoding.top_k": args.top_k,
           "decoding.top_p": args.top_p, "decoding.max_new_tokens": args.max_new_tokens,
           "decoding.stop": args.stop, "decoding.seed": args.seed, "decoding.roles": args.roles,
           "decoding.schedule": args.schedule})
    return cfg, prefs


def _stats_line(res) -> str:
    s = res.stats
    acc = f", acceptance {s.acceptance_rate:.2f}" if s.acceptance_rate is not None else ""
    return (f"[{s.method}] {s.tokens} tokens in {s.wall_time_s:.2f}s ({s.tokens_per_s:.1f} tok/s){acc}, "
            f"{s.views} view(s), seed {s.seed}, finish: {res.finish_reason}")


def _generate_jsonl(args: argparse.Namespace) -> int:
    """``generate --input FILE.jsonl``: every prompt through generate_batch, one JSON line each."""
    from .api import PersonaJudge
    from .jsonl import read_records, run_jsonl

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
    from .api import PersonaJudge

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


def cmd_plugins(args: argparse.Namespace) -> int:
    from .manager import list_plugins

    data = list_plugins()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for kind, rows in data.items():
        if kind == "preference":
            print(f"{kind}s: {len(rows)} (list them with `personajudge preferences`)")
            continue
        print(f"{kind}s:")
        width = max((len(r["name"]) for r in rows), default=0)
        for r in rows:
            print(f"  {r['name']:<{width}}  {r['description']}  [{r['plugin']}]")
    return 0


def cmd_preferences(args: argparse.Namespace) -> int:
    from .manager import registry

    rows = [p for _, p in registry("preference").items()]
    if args.json:
        print(json.dumps([p.model_dump() for p in rows], indent=2))
        return 0
    width = max(len(p.name) for p in rows)
    for p in rows:
        alias = f" (also: {', '.join(p.aliases)})" if p.aliases else ""
        print(f"{p.name:<{width}}  {p.description}{alias}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="personajudge", description="Personalize LLM output at decoding time (Persona-judge).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
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
    p = sub.add_parser("plugins", help="list registered backends, encoders, methods, scorers")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("preferences", help="list the named preferences")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_preferences)
    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


def _register_bench(sub) -> None:
    from .bench import register_command

    register_command(sub)


def _register_eval(sub) -> None:
    from .evaluation.commands import register

    register(sub)


#: Functions that add subcommands (bench, eval, report) to the parser.
_EXTRA_COMMANDS: list = [_register_bench, _register_eval]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except PersonaJudgeError as err:
        print(f"personajudge: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("personajudge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
