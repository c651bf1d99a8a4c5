"""Rendering a model's chat template (Jinja) in a sandbox with a time and a size limit.

A GGUF file (or a tokenizer config) carries its chat template as Jinja source:
code written by whoever made the file. Jinja's :class:`ImmutableSandboxedEnvironment`
keeps that code away from Python internals and from mutating its inputs, but
not from the machine's time and memory: ``range(100000)`` loops nest, ``"x" *
10**10`` allocates ten gigabytes, and a tower of ``[a, a]`` lists has an
exponential size that a single ``str()`` or ``==`` would walk. This module
renders under three limits, checked *before* anything large is built:

- **work**: every loop iteration, call, filter, attribute lookup, operator and
  output piece counts one step; over :data:`MAX_STEPS` steps, or past the
  deadline (:data:`TIME_LIMIT_S`), rendering stops.
- **size**: every value the template builds (string, list, dict, in total,
  shared parts counted each time they occur) and everything it outputs must fit
  in the size limit: :data:`MIN_OUTPUT_CHARS` plus :data:`OUTPUT_PER_INPUT`
  times the size of the messages. Operations whose result can be larger than
  their inputs (``*``, ``+``, ``~``, ``%``, ``**``, ``str.replace``,
  ``join``, ``indent``, ``format`` widths, ...) are checked from the sizes of
  their operands, so the check comes before the allocation.
- **source**: a template longer than :data:`MAX_SOURCE_CHARS` is refused.

How: the parsed template is rewritten before compilation so that every
``for`` iterates through a counting iterator, every ``~`` concatenation,
list/tuple/dict literal and output piece goes through a checking function
(reached as ``environment.<name>``, which a template cannot shadow), and the
sandbox's own hooks (``call``, ``getattr``, ``getitem``, intercepted binary
operators) plus wrappers around every filter do the rest.

Any failure -- a limit, a syntax error, the template's own
``raise_exception(...)``, a ``TypeError`` deep inside -- becomes one
:class:`~personajudge.core.errors.ChatTemplateError` line naming the model
file and the problem, with ``--encoder plain`` (no chat template) or
``--encoder system`` as the way around it. jinja2 is imported only when a
template is compiled.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from .errors import BackendUnavailableError, ChatTemplateError, ChatTemplateFatalError

#: wall-clock limit of one rendering, in seconds
TIME_LIMIT_S = 5.0
#: steps (loop iterations, calls, lookups, operators, output pieces) of one rendering
MAX_STEPS = 2_000_000
#: every template may build and output at least this many characters ...
MIN_OUTPUT_CHARS = 1 << 20
#: ... plus this many times the size of its inputs (the messages)
OUTPUT_PER_INPUT = 8
#: longest template source accepted (real chat templates are a few kilobytes)
MAX_SOURCE_CHARS = 1 << 20
#: the largest integer a template may build, in bits
MAX_INT_BITS = 1 << 14
#: a format width or precision with this many digits or more is refused ("%9999999d")
_BIG_WIDTH = re.compile(r"\d{7,}")
#: filters that may be called on large inputs only a bounded number of times
_SEQ_TYPES = (str, bytes, list, tuple)

_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("personajudge_template_budget", default=None)


class _Over(Exception):
    """A limit was hit; carries the one-line reason."""


class _Memo:
    """Sizes of lists, tuples and dicts measured before (see :func:`weight`).

    The inputs' sizes stay for the whole rendering; sizes of what the template built are kept
    until their total passes ``retain`` and then forgotten (each entry holds its object alive so
    its id stays its own; unbounded, that would itself keep every intermediate list in memory).
    ``visits`` counts the containers walked, so measuring is work the step budget sees.
    """

    __slots__ = ("fixed", "seen", "retained", "retain", "visits")

    def __init__(self, retain: int):
        self.fixed: dict[int, tuple[Any, int]] = {}
        self.seen: dict[int, tuple[Any, int]] = {}
        self.retained = 0
        self.retain = retain
        self.visits = 0

    def get(self, v: Any) -> int | None:
        hit = self.fixed.get(id(v)) or self.seen.get(id(v))
        return hit[1] if hit is not None and hit[0] is v else None

    def put(self, v: Any, w: int) -> None:
        if self.retained + w > self.retain:
            self.seen.clear()
            self.retained = 0
        self.seen[id(v)] = (v, w)
        self.retained += w

    def freeze(self) -> None:
        """Keep what was measured so far (the inputs) for good."""
        self.fixed.update(self.seen)
        self.seen.clear()
        self.retained = 0


class _Budget:
    __slots__ = ("steps", "max_steps", "deadline", "time_limit", "cap", "out", "memo")

    def __init__(self, *, time_limit: float, max_steps: int, cap: int, memo: _Memo):
        self.memo = memo
        self.steps = 0
        self.max_steps = max_steps
        self.time_limit = time_limit
        self.deadline = time.monotonic() + time_limit
        self.cap = cap
        self.out = 0

    def tick(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > self.max_steps:
            raise _Over(f"it did not finish within {self.max_steps:,} steps (a runaway loop?)")
        if (n > 1 or not self.steps & 63) and time.monotonic() > self.deadline:
            raise _Over(f"it did not finish within {self.time_limit:g} s (a runaway loop?)")


def _budget() -> _Budget:
    b = _BUDGET.get()
    if b is None:  # a compiled template used outside render_chat_template: no limits were set up
        raise _Over("the template was rendered without limits")
    return b


def weight(value: Any, limit: int, memo: _Memo | None = None) -> int:
    """The size of ``value``: characters of strings plus one per container element, counting a
    shared part each time it occurs (that is what ``str()`` or ``==`` would walk).

    Stops counting once past ``limit``. ``memo`` remembers the sizes of lists, tuples and dicts
    (the sandbox keeps templates from changing those; a namespace can change, so nothing holding
    one is remembered): a tower of ``[a, a]`` built step by step costs two lookups per step.
    """
    return _weight(value, limit, memo, 0)[0]


def _weight(v: Any, limit: int, memo: _Memo | None, depth: int) -> tuple[int, bool]:
    """(size, memoizable) of ``v``; see :func:`weight`."""
    if isinstance(v, (str, bytes)):
        return len(v) + 1, True
    if isinstance(v, int) and not isinstance(v, bool):
        return 1 + v.bit_length() // 64, True
    if memo is not None:
        hit = memo.get(v)
        if hit is not None:
            return hit, True
    if isinstance(v, dict):
        children: Any = (*v.keys(), *v.values())
    elif isinstance(v, (list, tuple, set, frozenset)):
        children = v
    elif _Namespace is not None and isinstance(v, _Namespace):
        children = (object.__getattribute__(v, "_Namespace__attrs"),)
    else:
        return 1, True
    if depth > 400:  # deeper than any real data: count it as over the limit rather than recurse on
        return limit + 1, False
    if memo is not None:
        memo.visits += 1 + len(children)
    total, pure = 1, not (_Namespace is not None and isinstance(v, _Namespace))
    for c in children:
        w, p = _weight(c, limit - total, memo, depth + 1)
        total += w
        pure = pure and p
        if total > limit:
            return total, False
    if pure and memo is not None:
        memo.put(v, total)
    return total, pure


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of lists/tuples/dicts (for indenting serializers), at most ``limit`` steps."""
    best, seen = 0, 0
    stack = [(value, 0)]
    while stack and seen < limit:
        v, d = stack.pop()
        seen += 1
        best = max(best, d)
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend((x, d + 1) for x in v)
    return best


def _size(value: Any) -> int:
    """:func:`weight` within the rendering's budget: the walk is charged as steps."""
    b = _budget()
    before = b.memo.visits
    w = weight(value, b.cap, b.memo)
    b.tick(1 + b.memo.visits - before)
    return w


def _need(size: int, what: str) -> None:
    b = _budget()
    if size > b.cap:
        raise _Over(f"{what} would be {size:,} characters, over the limit of {b.cap:,}")


def _check_value(value: Any, what: str = "a value") -> Any:
    b = _budget()
    if _size(value) > b.cap:
        raise _Over(f"{what} is larger than the limit of {b.cap:,} characters")
    return value


def _check_ints(args: tuple, kwargs: dict, what: str) -> None:
    cap = _budget().cap
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > cap:
            raise _Over(f"{what} got the argument {a}, larger than the size limit of {cap:,}")


def _check_format(fmt: Any, what: str) -> None:
    if isinstance(fmt, str) and _BIG_WIDTH.search(fmt):
        raise _Over(f"{what} asks for a field width or precision of a million characters or more")


def _join_size(sep: str, items: Any, what: str) -> list | tuple | Any:
    """Materialize ``items`` (counting steps) and check the joined size before joining."""
    b = _budget()
    if not isinstance(items, (list, tuple, str, dict)):
        out = []
        for x in items:
            b.tick()
            out.append(x)
        items = out
    _need(_size(items) + len(sep) * len(items), what)
    return items


def _replace_size(s: str, old: Any, new: Any, count: Any = -1) -> int:
    if not (isinstance(s, str) and isinstance(old, str) and isinstance(new, str)):
        return len(s) if isinstance(s, str) else 0
    n = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        n = min(n, count)
    return len(s) + n * max(0, len(new) - len(old))


def _precheck_method(obj: Any, args: tuple, kwargs: dict) -> tuple:
    """Size checks for the ``str`` methods whose result can outgrow their inputs; returns the args
    to call with (``join`` of a generator gets a checked list)."""
    target = getattr(obj, "__wrapped__", obj)
    owner = getattr(target, "__self__", None)
    name = getattr(target, "__name__", "")
    if not isinstance(owner, str):
        return args
    what = f"str.{name}()"
    if name in ("translate", "maketrans"):
        raise _Over(f"{what} is not allowed in a chat template")
    if name == "replace" and len(args) >= 2:
        _need(_replace_size(owner, *args[:3]), what)
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int):
            _need(len(owner) + owner.count("\t") * max(size, 0), what)
    elif name == "join" and args:
        args = (_join_size(owner, args[0], what), *args[1:])
    elif name in ("format", "format_map"):
        _check_format(owner, what)
    return args


_CONTEXTS: tuple[type, ...] = ()
_Namespace: type | None = None


def _wrap_filter(name: str, func: Any) -> Any:
    """A filter that counts a step and checks its inputs (and growth) before it runs, and its result after."""

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        b = _budget()
        b.tick()
        what = f"the filter '{name}'"
        _check_ints(args, kwargs, what)
        plain = [a for a in args if not isinstance(a, _CONTEXTS)]  # skip the context / eval context
        for a in (*plain, *kwargs.values()):
            _check_value(a, f"the input of {what}")
        value: Any = plain[0] if plain else None  # whatever the template piped in
        rest = plain[1:]
        if name == "indent":
            width = rest[0] if rest else kwargs.get("width", 4)
            w = len(width) if isinstance(width, str) else (width if isinstance(width, int) else 0)
            s = str(value)
            _need(len(s) + (s.count("\n") + 1) * max(w, 0), what)
        elif name == "replace" and len(rest) >= 2:
            _need(_replace_size(str(value), *rest[:3]), what)
        elif name == "format":
            _check_format(value, what)
        elif name == "join" and value is not None:
            sep = rest[0] if rest else kwargs.get("d", "")
            if isinstance(sep, str):
                items = _join_size(sep, value, what)
                args = tuple(items if a is value else a for a in args)
        elif name == "wordwrap":
            width = rest[0] if rest else kwargs.get("width", 79)
            wrap = kwargs.get("wrapstring") or (rest[2] if len(rest) > 2 else None) or "\n"
            s = str(value)
            if isinstance(width, int) and width > 0 and isinstance(wrap, str):
                _need(len(s) + (len(s) // width + s.count("\n") + 1) * len(wrap), what)
        elif name in ("batch", "slice"):
            count = rest[0] if rest else 1
            fill = rest[1] if len(rest) > 1 else kwargs.get("fill_with")
            if isinstance(count, int) and fill is not None:
                _need(count * _size(fill), what)
        elif name == "sum":
            start = rest[1] if len(rest) > 1 else kwargs.get("start", 0)
            if not isinstance(start, (int, float)) and (not hasattr(value, "__len__") or len(value) > 1000):
                raise _Over(f"{what} may add up at most 1,000 sequences")
        elif name in ("tojson", "pprint"):
            indent = kwargs.get("indent", rest[0] if rest and name == "tojson" else (1 if name == "pprint" else 0))
            ind = len(indent) if isinstance(indent, str) else (indent if isinstance(indent, int) else 0)
            if ind:
                _need(_size(value) * (1 + ind * _depth(value, b.cap)), what)
        result = func(*args, **kwargs)
        if not isinstance(result, Iterator):
            _check_value(result, f"the result of {what}")
        return result

    return guarded


def _environment() -> Any:
    global _CONTEXTS, _Namespace
    try:
        from jinja2 import nodes
        from jinja2.exceptions import TemplateError
        from jinja2.runtime import Context
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from jinja2.visitor import NodeTransformer
    except ImportError:
        raise BackendUnavailableError("rendering a chat template needs jinja2: pip install jinja2") from None
    from jinja2.utils import Namespace

    _CONTEXTS = (Context, nodes.EvalContext)
    _Namespace = Namespace

    def env_call(name: str, *args: Any) -> Any:
        return nodes.Call(nodes.EnvironmentAttribute(name), list(args), [], None, None)

    class Guard(NodeTransformer):
        """Route loops, concatenations, literals and output through the environment's checks."""

        def visit_For(self, node: Any) -> Any:
            self.generic_visit(node)
            node.iter = env_call("pj_iter", node.iter)
            return node

        def visit_Concat(self, node: Any) -> Any:
            self.generic_visit(node)
            return env_call("pj_concat", *node.nodes)

        def visit_Output(self, node: Any) -> Any:
            self.generic_visit(node)
            node.nodes = [env_call("pj_out", child) for child in node.nodes]
            return node

        def _literal(self, node: Any) -> Any:
            self.generic_visit(node)
            if getattr(node, "ctx", "load") != "load":
                return node
            return env_call("pj_value", node)

        visit_List = visit_Dict = visit_Tuple = _literal

    class Env(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def _parse(self, source: str, name: Any, filename: Any) -> Any:
            return Guard().visit(super()._parse(source, name, filename))

        # -- the functions the rewritten template calls (environment.pj_*)
        def pj_iter(self, iterable: Any) -> Any:
            b = _budget()
            for item in iterable:
                b.tick()
                yield item

        def pj_concat(self, *parts: Any) -> str:
            _budget().tick()
            texts = []
            size = 0
            for p in parts:
                _check_value(p, "a ~ operand")
                t = str(p)
                size += len(t)
                _need(size, "a ~ concatenation")
                texts.append(t)
            return "".join(texts)

        def pj_out(self, value: Any) -> str:
            b = _budget()
            _check_value(value, "an output value")
            text = value if isinstance(value, str) else str(value)
            b.out += len(text)
            if b.out > b.cap:
                raise _Over(f"its output is larger than the limit of {b.cap:,} characters")
            return text

        def pj_value(self, value: Any) -> Any:
            return _check_value(value, "a literal")

        # -- the sandbox's hooks
        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            b = _budget()
            b.tick()
            # jinja passes the loop's and block's variables along; they are not arguments
            internal = {k: kwargs.pop(k) for k in ("_loop_vars", "_block_vars") if k in kwargs}
            if getattr(__obj, "__self__", None) is __self and getattr(__obj, "__name__", "").startswith("pj_"):
                return __obj(*args, **kwargs)
            name = getattr(__obj, "__name__", None) or type(__obj).__name__
            what = f"the call {name}()"
            _check_ints(args, kwargs, what)
            for a in (*args, *kwargs.values()):
                _check_value(a, f"an argument of {what}")
            args = _precheck_method(__obj, args, kwargs)
            result = super().call(__context, __obj, *args, **kwargs, **internal)
            if not isinstance(result, Iterator):
                _check_value(result, f"the result of {what}")
            return result

        def getattr(self, obj: Any, attribute: str) -> Any:
            _budget().tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            _budget().tick()
            return super().getitem(obj, argument)

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            b = _budget()
            b.tick()
            what = f"the operator {operator}"
            is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
            if operator == "*":
                if is_int(left) and is_int(right):
                    if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                        raise _Over(f"{what} would build an integer over {MAX_INT_BITS} bits")
                elif isinstance(left, _SEQ_TYPES) and is_int(right):
                    _need(_size(left) * max(right, 0), what)
                elif is_int(left) and isinstance(right, _SEQ_TYPES):
                    _need(_size(right) * max(left, 0), what)
            elif operator == "**":
                if (
                    is_int(left)
                    and is_int(right)
                    and right > 0
                    and abs(left) > 1
                    and left.bit_length() * right > MAX_INT_BITS
                ):
                    raise _Over(f"{what} would build an integer over {MAX_INT_BITS} bits")
            elif operator == "+":
                if isinstance(left, _SEQ_TYPES) and isinstance(right, _SEQ_TYPES):
                    _need(_size(left) + _size(right), what)
            elif operator == "%" and isinstance(left, str):
                _check_format(left, what)
                _check_value(right, f"the operand of {what}")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message: Any) -> None:
        raise TemplateError(str(message))

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = Env(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.pop("lipsum", None)  # builds paragraphs of text by count; no chat template needs it
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(str(fmt))
    for fname in list(env.filters):
        env.filters[fname] = _wrap_filter(fname, env.filters[fname])
    return env


def _one_line(text: Any, limit: int = 200) -> str:
    """A message from the template (attacker-controlled text) as one short printable line."""
    s = " ".join(str(text).split())
    s = "".join(ch if ch.isprintable() else "?" for ch in s)
    return s if len(s) <= limit else s[: limit - 3] + "..."


_WAY_AROUND = ("use --encoder plain (no chat template)", "or --encoder system (the preferences in the system message)")


def _fail(origin: str, problem: str, *, limit: bool = False) -> ChatTemplateError:
    """One line naming the model file, the problem, and the way around it. ``limit``: the template
    cannot be used at all (it does not compile, or a limit stopped it), so only ``plain`` helps."""
    if limit:
        return ChatTemplateFatalError(f"the chat template of {origin} cannot be used: {problem}; {_WAY_AROUND[0]}")
    return ChatTemplateError(f"the chat template of {origin} failed: {problem}; {_WAY_AROUND[0]} {_WAY_AROUND[1]}")


class ChatTemplate:
    """A compiled chat template; :meth:`render` runs it under the limits."""

    def __init__(self, source: str, origin: str = "the model"):
        self.origin = origin
        if not isinstance(source, str):
            raise _fail(origin, "the template is not text")
        if len(source) > MAX_SOURCE_CHARS:
            raise _fail(
                origin,
                f"the template is {len(source):,} characters long, over the limit of {MAX_SOURCE_CHARS:,}",
                limit=True,
            )
        env = _environment()
        from jinja2.exceptions import TemplateError

        try:
            self._template = env.from_string(source)
        except TemplateError as err:
            raise _fail(origin, f"it does not compile ({_one_line(err)})", limit=True) from None
        except (RecursionError, MemoryError):
            raise _fail(origin, "it is nested too deeply to compile", limit=True) from None
        except Exception as err:  # a compiler corner case; still the file's fault, not the user's
            raise _fail(origin, f"it does not compile ({type(err).__name__}: {_one_line(err)})", limit=True) from None

    def render(
        self,
        *,
        time_limit: float | None = None,
        max_steps: int | None = None,
        max_chars: int | None = None,
        **context: Any,
    ) -> str:
        """The template's text for ``context`` (``messages``, ``add_generation_prompt``, tokens)."""
        from jinja2.exceptions import TemplateError

        size_in = weight(context, 1 << 62, memo := _Memo(1 << 62))
        memo.freeze()
        cap = max_chars if max_chars is not None else MIN_OUTPUT_CHARS + OUTPUT_PER_INPUT * size_in
        budget = _Budget(
            time_limit=TIME_LIMIT_S if time_limit is None else time_limit,
            max_steps=MAX_STEPS if max_steps is None else max_steps,
            cap=cap,
            memo=memo,
        )
        memo.retain = 2 * cap
        token = _BUDGET.set(budget)
        try:
            pieces = []
            for piece in self._template.generate(**context):
                budget.tick()
                pieces.append(piece)
            return "".join(pieces)
        except _Over as err:
            raise _fail(self.origin, str(err), limit=True) from None
        except RecursionError:
            raise _fail(self.origin, "it recursed too deeply", limit=True) from None
        except MemoryError:
            raise _fail(self.origin, "it ran out of memory", limit=True) from None
        except TemplateError as err:
            raise _fail(self.origin, _one_line(err) or type(err).__name__) from None
        except Exception as err:  # TypeError, ValueError, ZeroDivisionError, ... inside the template
            raise _fail(self.origin, f"{type(err).__name__}: {_one_line(err)}") from None
        finally:
            _BUDGET.reset(token)


def render_chat_template(source: str, origin: str = "the model", **context: Any) -> str:
    """Compile ``source`` and render it once (see :class:`ChatTemplate`)."""
    return ChatTemplate(source, origin).render(**context)


__all__ = [
    "ChatTemplate",
    "render_chat_template",
    "weight",
    "TIME_LIMIT_S",
    "MAX_STEPS",
    "MIN_OUTPUT_CHARS",
    "OUTPUT_PER_INPUT",
    "MAX_SOURCE_CHARS",
]
