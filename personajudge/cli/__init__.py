"""The ``personajudge`` command line: one module per command group.

User mistakes (a :class:`PersonaJudgeError` or a bad flag) and a standard
output that cannot be written (closed, full disk) print one line to stderr and
exit with status 2; warnings print one line each; anything else is a bug and
keeps its traceback. Standard error only ever carries such lines (and the
progress bar): when it is closed, full or broken they are dropped, and the run
goes on (:class:`~personajudge.core.files.QuietStream`).
"""

from __future__ import annotations

import errno
import sys
import warnings
from collections.abc import Sequence

from personajudge import __version__
from personajudge.core.errors import PersonaJudgeError
from personajudge.core.files import OutputError, QuietStream, note, os_error_text, reopen_closed_stderr, silence_stdout

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
    note(f"personajudge: warning: {message}")  # never on standard output, even with stderr closed


class ClosedStdout:
    """Stands in for a standard output that was closed before the process started (``>&-``).

    Python then sets ``sys.stdout`` to None, and ``print`` drops every line without a word; this
    makes the first write a one-line error instead. ``closed`` lets a command refuse up front,
    before a model loads (``generate``)."""

    closed = True

    def write(self, text: str) -> int:
        raise OutputError("standard output is closed; the output could not be written")

    def flush(self) -> None:
        pass


#: write errors of a standard output redirected to a full or failing device (``> /dev/full``)
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = warnings.showwarning
    warnings.showwarning = _one_line_warning
    previous_stderr = sys.stderr
    if sys.stderr is None:  # `2>&-`
        reopen_closed_stderr()
    sys.stderr = QuietStream(sys.stderr)  # type: ignore[assignment]
    if sys.stdout is None and getattr(args, "uses_stdout", True):  # `serve` logs to stderr only
        sys.stdout = ClosedStdout()
    try:
        status = args.func(args)
        sys.stdout.flush()  # a full disk shows here, not as an "Exception ignored" at exit
        return status
    except PersonaJudgeError as err:
        print(f"personajudge: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # `personajudge generate ... | head -1`: the reader left. Say so once, and keep the
        # interpreter from failing again when it flushes stdout at exit.
        silence_stdout()
        print("personajudge: error: the output pipe was closed; generation stopped", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        # `... > /dev/full`: the project's own files report this as OutputError, so an unhandled
        # write error of this kind is standard output's.
        if err.errno not in _OUTPUT_ERRNOS or err.filename is not None:
            raise
        silence_stdout()
        print(
            f"personajudge: error: could not write to standard output ({os_error_text(err)}); the output is incomplete",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("personajudge: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous
        sys.stderr = previous_stderr
        if isinstance(sys.stdout, ClosedStdout):
            sys.stdout = None


if __name__ == "__main__":
    sys.exit(main())
