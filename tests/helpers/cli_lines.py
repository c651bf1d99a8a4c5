"""Running the CLI in-process as the shell sees it, and checking a one-line error."""

from personajudge.cli import main


def run_main(argv, capsys):
    """``main`` as the shell sees it: argparse's refusals are SystemExit, the rest a return value."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code, err, *needles):
    """Exit status 2 and exactly one ``...: error: ...`` line on stderr, holding every needle."""
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and ": error: " in err, err
    for needle in needles:
        assert needle in err, err
