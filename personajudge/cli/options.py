"""Flags shared by the commands that load a model (generate, bench, eval, serve), and
how they become a validated :class:`~personajudge.core.config.RunConfig`."""

from __future__ import annotations

import argparse
import json
import re
import warnings
from typing import Any, NoReturn

from pydantic import Field

from personajudge.api import IGNORED_NEXT_TO_VIEWS
from personajudge.core.config import RunConfig, build_config, load_config_file
from personajudge.core.errors import ConfigError, PersonaJudgeError, PersonaJudgeWarning
from personajudge.core.files import path_problem
from personajudge.plugins import preference_library
from personajudge.preferences import (
    Preference,
    PreferenceSpec,
    build_views,
    load_file,
    named_by,
    resolve,
    view_names,
    with_definitions,
)

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


def file_path_arg(value: str) -> str:
    """argparse ``type=`` of every flag that names a file: ``''``, ``.``, ``/`` or ``sub/`` is one line
    naming the flag and exit 2 (:func:`~personajudge.core.files.path_problem`), not a traceback, a
    silently ignored flag or a file written into the current folder."""
    problem = path_problem(value, "file")
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def dir_path_arg(value: str) -> str:
    """argparse ``type=`` of a flag that names a folder (it may end with a slash; empty is refused)."""
    problem = path_problem(value, "dir")
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def add_run_options(p: argparse.ArgumentParser, *, seed_help: str | None = None) -> None:
    """Flags shared by generate / bench / eval: backend, preferences, decoding.

    ``seed_help``: the ``--seed`` help of a command whose default is not a fresh
    seed (eval and bench start at 0), so each command's help says what it does.
    """
    g = p.add_argument_group("model")
    g.add_argument("--config", metavar="FILE", type=file_path_arg, help="TOML config file; flags override it")
    g.add_argument("--backend", help="backend name (see `personajudge plugins`); default llama-cpp")
    g.add_argument("--model", help="model path or hub id; default: the backend's default model")
    g.add_argument("--device", help="cpu, cuda, cuda:N (hf backend)")
    g.add_argument("--dtype", help="float32, float16, bfloat16 or auto (hf backend)")
    g.add_argument("--threads", type=int, help="CPU threads")
    g.add_argument("--n-ctx", type=int, dest="n_ctx", help="context size in tokens")
    g.add_argument("--n-gpu-layers", type=int, dest="n_gpu_layers", help="layers offloaded to the GPU (llama-cpp)")
    g.add_argument(
        "--backend-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra backend option (repeatable); VALUE is parsed as JSON when it can be",
    )
    g = p.add_argument_group("preferences")
    g.add_argument(
        "--prefer",
        action="append",
        default=None,
        metavar="NAME_OR_TEXT",
        help="a preference name or a free-text description (repeatable; one view each; "
        "several in one view: --view A,B)",
    )
    g.add_argument(
        "--view",
        action="append",
        default=None,
        metavar="A,B",
        help="a view carrying several preferences, comma- or +-separated (A,B or A+B; repeatable; split only "
        "where every piece could be a name, so a description with a comma stays one preference)",
    )
    g.add_argument(
        "--preferences-file",
        metavar="FILE",
        type=file_path_arg,
        help="TOML/JSON/YAML list of preferences: one view each, unless --prefer or --view gives the views "
        "(the file then only defines the names they use; its definitions win over the built-ins)",
    )
    g.add_argument(
        "--encoder",
        help="preference encoder: auto (default: chat-turn for chat models, else exemplar when every preference "
        "has examples, else plain), chat-turn, system, plain, instruction, exemplar, or a plugin's "
        "(see `personajudge plugins`)",
    )
    g.add_argument("--system", help="system message (chat models)")
    g = p.add_argument_group("decoding")
    g.add_argument("--method", help="persona-judge (default), persona-judge-base, prompt, base, reference, mod, pad")
    g.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option (repeatable), e.g. weight=2 for pad, weights=[0.7,0.3] for mod",
    )
    g.add_argument("--lambda", dest="lam", type=_positive_int("--lambda"), help="draft window (default 4)")
    g.add_argument("--temperature", type=float, help="0 = greedy (default 0.7)")
    g.add_argument("--top-k", dest="top_k", type=int, help="default 20; 0 disables")
    g.add_argument("--top-p", dest="top_p", type=float, help="default 0.9")
    g.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, help="default 128")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--seed", type=int, help=seed_help or "random seed (default: fresh, reported in the stats)")
    g.add_argument("--roles", choices=["alternate", "fixed", "round-robin"], help="override the role schedule")
    g.add_argument("--schedule", choices=["interleaved", "windowed"], help="loop schedule (same decisions)")


def mark_refused(p: argparse.ArgumentParser, reasons: dict[str, str]) -> None:
    """Give each shared flag that a command refuses (by ``dest``) a help text saying so: ``--help``
    then lists no flag as if it worked (``bench --method``, ``eval --preferences-file``), and the
    refusal itself stays one line naming what to use instead."""
    for action in p._actions:
        if action.dest in reasons:
            action.help = reasons[action.dest]


def _parse_option(item: str, flag: str = "--backend-option") -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON when it is JSON (``2``, ``true``, ``[1, 2]``), else the text."""
    if "=" not in item:
        raise PersonaJudgeError(f"{flag} expects KEY=VALUE, got {item!r}")
    k, v = item.split("=", 1)
    if not k.strip():
        raise PersonaJudgeError(f"{flag} expects KEY=VALUE with a non-empty KEY, got {item!r}")
    try:
        return k.strip(), json.loads(v)
    except RecursionError:
        raise PersonaJudgeError(f"{flag} {k.strip()}: the value is nested too deeply") from None
    except ValueError:  # not JSON (JSONDecodeError), or an integer too long to convert
        return k.strip(), v


class FileDefinedConfig(RunConfig):
    """A :class:`RunConfig` whose ``views`` use names a ``--preferences-file`` defines (``pirate``) or
    adjusts (``concise`` with its own examples).

    The CLI passes the file's preferences with every call, and the call resolves the views with them
    (:func:`personajudge.preferences.with_definitions`); ``definitions`` lets the check that runs
    before the model loads (``personajudge.api._check_config``) resolve them too. Not part of the
    dumped config: a run's settings report each of the file's preferences as its full table (which a
    config's ``views`` accepts), so a config rebuilt from them needs no file.
    """

    definitions: list[Preference] = Field(default_factory=list, exclude=True)


#: the flag that sets each config field (the dotted names of ``config_from_args``'s overrides)
FLAG_OF = {
    "backend.name": "--backend",
    "backend.model": "--model",
    "backend.device": "--device",
    "backend.dtype": "--dtype",
    "backend.threads": "--threads",
    "backend.n_ctx": "--n-ctx",
    "backend.n_gpu_layers": "--n-gpu-layers",
    "method": "--method",
    "encoder": "--encoder",
    "system": "--system",
    "views": "--view",
    "decoding.lambda": "--lambda",
    "decoding.temperature": "--temperature",
    "decoding.top_k": "--top-k",
    "decoding.top_p": "--top-p",
    "decoding.max_new_tokens": "--max-new-tokens",
    "decoding.stop": "--stop",
    "decoding.seed": "--seed",
    "decoding.roles": "--roles",
    "decoding.schedule": "--schedule",
}


def _name_flags(message: str, given: set[str]) -> str:
    """A config error about a value a flag gave names the flag: ``invalid --top-p: decoding.top_p: Input
    should be less than or equal to 1 (got 2.0)``, not ``invalid config: decoding.top_p: ...``, which
    sends a user who wrote no config file looking for one. ``given``: the fields the flags set. An error
    about a file's value keeps its wording (the field is what to look for in the file); a message
    about both says which is which."""
    body = message.removeprefix("invalid config: ")
    if body == message:
        return message
    starts = [m.start(2) for m in _LOC.finditer(body)]  # each field's part (a rule may hold "; " too)
    if not starts:
        return message
    parts = [body[a : b - 2] if b < len(body) else body[a:] for a, b in zip(starts, [*starts[1:], len(body)])]
    out = []
    for part in parts:
        loc = _LOC.match(part)
        field = next((f for f in given if loc and (loc[2] == f or loc[2].startswith(f + "."))), None)
        out.append(f"invalid {FLAG_OF[field]}: {part}" if field is not None else f"invalid config: {part}")
    if all(o.startswith("invalid config: ") for o in out):
        return message
    return "; ".join(out)


#: where a field's part of a config error starts: ``decoding.top_p: ``
_LOC = re.compile(r"(^|; )([A-Za-z_]\w*(?:\.\w+)*): ")


#: a flag that replaces a name the config file gives, and where the file keeps the options of that name
_NAMED_TABLES = (
    ("--method", "method", (), "method", "method_options", "--method-option"),
    ("--encoder", "encoder", (), "encoder", "encoder_options", None),
    ("--backend", "backend", ("backend",), "name", "options", "--backend-option"),
)


def _leave_out_tables_of_replaced_names(args: argparse.Namespace, data: dict[str, Any]) -> None:
    """A config file written for ``method = "mod"`` run with ``--method prompt``: its ``method_options`` are
    mod's, and the run failed on an option it never typed ("unknown option(s) weights"), so one config could
    not serve a comparison. When a flag replaces the method, encoder or backend the file names, the file's
    options for it are left out, with one warning; the flag's own options (``--method-option``) stay."""
    for flag, dest, parents, key, table, option_flag in _NAMED_TABLES:
        given = getattr(args, dest, None)
        where: Any = data
        for part in parents:
            where = where.get(part) if isinstance(where, dict) else None
        if given is None or not isinstance(where, dict):
            continue
        named, options = where.get(key), where.get(table)
        if not isinstance(named, str) or named == given or not isinstance(options, dict) or not options:
            continue
        where.pop(table)
        field = ".".join([*parents, table])
        extra = f"; give {option_flag} for {given}'s" if option_flag else ""
        warnings.warn(
            f"{flag} {given} replaces the config file's {'.'.join([*parents, key])} '{named}': its {field} "
            f"({', '.join(map(str, options))}) are {named}'s and are left out{extra}",
            PersonaJudgeWarning,
            stacklevel=3,
        )


def config_from_args(args: argparse.Namespace):
    """File config (if any) overridden by the flags that were given.

    The preferences and views are one setting: the command line's replace the file's. ``--view``
    replaces the file's ``views`` and ``preferences`` alike; ``--prefer`` or ``--preferences-file``
    without ``--view`` (one view per preference) replaces the file's ``views`` too. Next to ``--view``
    or ``--prefer`` a ``--preferences-file`` only defines names (its entries are no views of their
    own): ``--preferences-file prefs.toml --prefer pirate --prefer humor`` is two views, the file's
    pirate and humor, as ``--view pirate --view humor`` is and as the server reads a request's
    ``preferences``. Alone, its entries are the views, one each. So the warning about preferences
    next to views is only about what the user gave together, on one command line or in one file.

    The preferences and views are resolved here, before any model loads: a typo in ``--prefer``
    or ``--view`` is one line and exit 2 without waiting for the weights (or before a missing model
    file is reported).
    """
    data = load_config_file(args.config) if args.config is not None else {}  # --config '' is a mistake
    _leave_out_tables_of_replaced_names(args, data)
    if args.backend_option:
        backend = data.get("backend", {})
        if not isinstance(backend, dict) or not isinstance(backend.get("options", {}), dict):
            raise ConfigError("invalid config: backend and backend.options must be tables")
        opts = dict(backend.get("options", {}))
        opts.update(_parse_option(o) for o in args.backend_option)
        data["backend"] = {**backend, "options": opts}
    if args.method_option:
        if not isinstance(data.get("method_options", {}), dict):
            raise ConfigError("invalid config: method_options must be a table")
        opts = dict(data.get("method_options", {}))
        opts.update(_parse_option(o, "--method-option") for o in args.method_option)
        data["method_options"] = opts
    prefs: list[PreferenceSpec] | None = None
    if getattr(args, "preferences_file", None) is not None:
        prefs = [*load_file(args.preferences_file, preference_library())]
    if args.prefer is not None:
        if prefs is not None and not args.view:
            # the file only defines names, as next to --view and on the server: the views are the
            # --prefer list, one each, and a name the file defines or adjusts means its definition
            defs = [p for p in prefs if isinstance(p, Preference)]
            names = with_definitions(preference_library(), defs)
            for p in args.prefer:  # a typo is told the file's names too (did you mean pirate?)
                resolve(p, names)
            prefs = named_by(args.prefer, defs)
        else:
            prefs = (prefs or []) + list(args.prefer)
    views = None
    if args.view:
        data.pop("preferences", None)
        names = with_definitions(preference_library(), prefs or [])
        views = [view_names(v, names) for v in args.view]
        for i, (text, view) in enumerate(zip(args.view, views)):
            if not view:  # `--view=` or `--view=,`: a view of no preference was plain sampling, without a word
                raise ConfigError(f"--view {text!r} names no preference (view {i + 1} is empty)")
    elif prefs is not None:
        data.pop("views", None)
    overrides = {
        "backend.name": args.backend,
        "backend.model": args.model,
        "backend.device": args.device,
        "backend.dtype": args.dtype,
        "backend.threads": args.threads,
        "backend.n_ctx": args.n_ctx,
        "backend.n_gpu_layers": args.n_gpu_layers,
        "method": args.method,
        "encoder": args.encoder,
        "system": args.system,
        "views": views,
        "decoding.lambda": args.lam,
        "decoding.temperature": args.temperature,
        "decoding.top_k": args.top_k,
        "decoding.top_p": args.top_p,
        "decoding.max_new_tokens": args.max_new_tokens,
        "decoding.stop": args.stop,
        "decoding.seed": args.seed,
        "decoding.roles": args.roles,
        "decoding.schedule": args.schedule,
    }
    try:
        cfg = build_config(data, **overrides)
    except ConfigError as err:
        raise ConfigError(_name_flags(str(err), {k for k, v in overrides.items() if v is not None})) from None
    build_views(prefs if prefs is not None else cfg.preferences, cfg.views, preference_library())
    if args.view and args.prefer:
        # --prefer next to --view was given together with it: the views decide (a call's own
        # preferences would replace the views), and only the file's definitions go with each call
        warnings.warn(IGNORED_NEXT_TO_VIEWS, PersonaJudgeWarning, stacklevel=2)
        prefs = [p for p in prefs or () if isinstance(p, Preference)] or None
    defs = [p for p in prefs or () if isinstance(p, Preference)]
    if defs and cfg.views:
        cfg = FileDefinedConfig.model_validate({**cfg.model_dump(by_alias=True), "definitions": defs})
    return cfg, prefs


def warn_unused_config_method(args: argparse.Namespace, methods: list[str], command: str, done: str) -> None:
    """A ``--config`` file's ``method`` that ``command`` (which runs the methods ``--methods`` names) does not
    run: one warning line. ``--method`` is refused there; the file's may serve other commands, so it is not
    an error, but it must not be dropped without a word. ``done`` says what the command does to a method
    ("timed", "compared")."""
    if args.config is None:
        return
    method = load_config_file(args.config).get("method")
    if isinstance(method, str) and method not in methods:
        warnings.warn(
            f"the config file's method '{method}' is not {done}: {command} runs the methods --methods names "
            f"(add it there to include it: --methods {','.join([*methods, method])})",
            PersonaJudgeWarning,
            stacklevel=2,
        )
