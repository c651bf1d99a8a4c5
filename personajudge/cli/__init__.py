"""The ``personajudge`` command line: one module per command group.

User mistakes (a :class:`PersonaJudgeError` or a bad flag) print one line to
stderr and exit with status 2; warnings print one line each; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence

from personajudge import __version__
from personajudge.core.errors import PersonaJudgeError

from . import bench, eval, generate, info, serve
from .options import EXIT_USAGE, _Parser

#: Modules that add subcommands; each has ``register(subparsers)``.
COMMANDS = (generate, info, bench, eval, serve)


def build_parser() -> _Parser:
    parser = _Parser(prog="personajudge", description="Personalize LLM output at decoding time (Persona-judge).")
    parser.add_argument("--version", action="version", version=f"personajudge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in COMMANDS:
        module.register(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"personajudge: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        return args.func(args)
    except PersonaJudgeError as err:
        print(f"personajudge: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # `personajudge generate ... | head -1`: the reader left. Say so once, and keep the
        # interpreter from failing again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("personajudge: error: the output pipe was closed; generation stopped", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("personajudge: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
