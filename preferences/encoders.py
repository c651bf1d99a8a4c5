"""Preference encoders: (a view's preferences, conversation, tokenizer) -> token ids.

Where the preference text goes changes what the model does with it, so the
placement is a plugin. The built-ins:

- ``chat-turn``: the view's preference text as its own user turn before the
  conversation, through the model's chat template (what the released
  Persona-judge code did);
- ``system``: the preference text as the system message;
- ``plain``: a plain-text template for base models without a chat template;
- ``instruction``: the P-Soups form, the preference appended to the last user
  instruction;
- ``exemplar``: few-shot demonstrations for base models: each view's
  preference shown through question/answer exemplars, then the prompt.

``auto`` picks ``chat-turn`` when the tokenizer has a chat template;
otherwise ``exemplar`` when every preference of the run has exemplars, and
``plain`` when one does not.

Each encoder declares its ``encoder_options`` as a pydantic ``Options`` model,
checked by the same :func:`~personajudge.core.config.take_options` as a
backend's options: ``{"nn": 1}`` or ``{"instruction": "yes"}`` is a one-line
:class:`ConfigError` naming the encoder and the option, not a setting quietly
ignored. A third-party encoder that declares no ``Options`` receives the
options unchecked, as before (it may check them itself).
"""

from __future__ import annotations

import functools
import re
import string
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import Field, field_validator, model_validator

from personajudge.core.config import Options, take_options
from personajudge.core.contract import Tokenizer, special_texts_of
from personajudge.core.errors import ConfigError, PersonaJudgeWarning, PluginError
from personajudge.core.files import check_text

from .library import builtin_examples, combined_examples, neutral_examples
from .model import Example, Preference, compose

Message = dict[str, str]


@runtime_checkable
class Encoder(Protocol):
    """A preference encoder, registered through ``register_encoders``: where a view's preferences go in
    the prompt. ``render`` returns the prompt text of one view and whether to add BOS; an optional
    ``stop_strings(tokenizer, options)`` lists the strings that end an answer in its format, and an
    optional pydantic ``Options`` class declares its ``encoder_options``."""

    name: ClassVar[str]
    description: ClassVar[str]

    def render(
        self,
        view: list[Preference],
        conversation: list[Message],
        tokenizer: Tokenizer,
        *,
        system: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> tuple[str, bool]:
        """The prompt text of one view, and whether the tokenizer should add BOS."""
        ...

    # Optional: ``stop_strings(tokenizer, options) -> list[str]``, stop strings the
    # format implies (added to the user's; e.g. the plain template's next "Question:").
    # Optional: ``Options``, an :class:`EncoderOptions` subclass declaring ``encoder_options``.
    # Optional: ``check_views(views, options)``, raising ConfigError for views it cannot encode; it needs
    # no tokenizer, so a one-shot call and the CLI run it before the model loads.


class EncoderOptions(Options):
    """Base of an encoder's ``encoder_options`` (strict, unknown names refused, like a backend's).

    ``stop = false`` drops the stop strings the format implies (the benchmark
    and the exactness kit time or count a fixed number of tokens); every
    built-in encoder takes it, so a caller may pass it whatever ``auto`` picks.
    """

    stop: bool = Field(True, description="False: none of the format's own stop strings.")


def encoder_options(encoder: Any, options: dict[str, Any] | None) -> dict[str, Any]:
    """``options`` checked against ``encoder.Options`` (defaults filled in), or as given when the encoder
    declares none.

    Raises :class:`ConfigError` in one line naming the encoder and the option:
    ``encoder_options: unknown option(s) for the exemplar encoder: nn; known: stop, n, instruction``.
    """
    spec = getattr(encoder, "Options", None)
    if spec is None:
        return dict(options or {})
    owner = f"the {getattr(encoder, 'name', type(encoder).__name__)} encoder"
    try:
        return take_options(options, spec, owner=owner, where="encoder_options")
    except ConfigError as err:  # a bad value's message names the option; add the encoder
        msg = str(err)
        raise ConfigError(msg if owner in msg else f"{msg} ({owner})") from None


def normalize_conversation(prompt: str | list[Message]) -> list[Message]:
    """A prompt string or a list of ``{"role", "content"}`` messages -> validated messages."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ConfigError("the prompt is empty")
        return [{"role": "user", "content": check_text(prompt, "the prompt", ConfigError)}]
    if not isinstance(prompt, list) or not prompt:
        raise ConfigError("a conversation must be a non-empty list of {role, content} messages")
    out = []
    for i, m in enumerate(prompt):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("content"), str)
            or m.get("role") not in ("system", "user", "assistant")
        ):
            raise ConfigError(f"message {i + 1}: expected {{'role': system|user|assistant, 'content': str}}")
        out.append({"role": m["role"], "content": check_text(m["content"], f"message {i + 1}", ConfigError)})
    if out[-1]["role"] != "user":
        raise ConfigError("the conversation must end with a user message")
    if not any(m["content"].strip() for m in out if m["role"] == "user"):
        raise ConfigError("the prompt is empty")
    return out


def encode(
    encoder: Encoder,
    view: list[Preference],
    conversation: list[Message],
    tokenizer: Tokenizer,
    *,
    system: str | None = None,
    options: dict[str, Any] | None = None,
) -> list[int]:
    """``encoder``'s prompt for one view, as token ids (what the engine feeds each view); special-token
    text in the user's strings stays text (:class:`UserText`)."""
    user = UserText(tokenizer, conversation, system, [view])
    cls = type(encoder).__qualname__
    who = f"encoder '{getattr(encoder, 'name', cls)}' ({cls})"

    def render(v: list[Preference], c: list[Message], s: str | None) -> tuple[str, bool]:
        return checked_render(encoder.render(v, c, tokenizer, system=s, options=options), who)

    text, add_bos = user.render(render, view, who=who)
    return user.encode(text, add_bos)


#: private-use code points a placeholder mark is drawn from: the BMP's, then planes 15 and 16
_MARKS = (range(0xE000, 0xF900), range(0xF0000, 0xFFFFE), range(0x100000, 0x10FFFE))

Render = Callable[[list[Preference], list[Message], "str | None"], tuple[str, bool]]


class UserText:
    """The user's strings (messages, system text, preferences), whose special-token text stays text.

    A tokenizer parses special-token text: ``"<eos>"`` in a prompt would be the model's real end of
    text, and ``"<end_of_turn>"`` in a message would close the turn, so a user (or any client of the
    server) could end a view's context early or step out of the chat-turn or exemplar frame that
    carries its preference. The encoder renders one string, in which the template's markers and the
    user's text can no longer be told apart; so :meth:`render` tells them apart after the fact.

    The encoder renders the user's real strings (what it returns is the prompt, and what
    ``--show-prompt`` prints): a third-party encoder may ``json.dumps`` them, cut them or count their
    tokens, and never sees anything but the user's text. Only where a user string holds a string of
    the tokenizer's ``special_texts`` does it render a second time, with each such string swapped
    for a placeholder (a private-use character no input holds, and a number); where that second text
    with the strings put back is the first, the placeholders say exactly where the user's special-token
    text lies. :meth:`encode` then encodes the prompt as the tokenizer would if only the user's
    special-token text were ordinary text: the rendered text is cut only at the template's own
    control tokens (where the tokenizer cuts it anyway), the raw-text piece around the user's text is
    encoded in one ``special=False`` call, and the rest as usual. So the user's text tokenizes
    exactly as with special-token parsing off, with no extra prefix space or split word around it.

    An encoder that changes the user's text (escapes it, cuts a placeholder, renders at random) gives
    a second text that does not match; then every occurrence of the user's special-token strings in
    the prompt is encoded as text, wherever it came from, and where the encoder wrote one of those
    strings itself (so its own marker becomes text too) a :class:`PersonaJudgeWarning` says so.

    Where no user string holds special-token text (ordinary prompts), nothing is rendered twice and
    the ids are exactly ``tokenizer.encode(text)``'s. A tokenizer that lists no ``special_texts`` is
    encoded as before.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        conversation: list[Message],
        system: str | None = None,
        views: Sequence[Sequence[Preference]] = (),
    ):
        self._tokenizer = tokenizer
        self.conversation, self.system = conversation, system
        self._index = _special_index(special_texts_of(tokenizer))
        self._located: dict[str, list[tuple[int, int]] | None] = {}  # rendered text -> the user's spans
        self._prefix_after: dict[str, bool] = {}
        texts = [m["content"] for m in conversation] + ([system] if system else [])
        texts += [t for v in views for p in v for t in _preference_texts(p)]
        joined = "\x00".join(texts)
        found = {joined[i:j] for i, j in _find_specials(joined, self._index)}
        self._literals: list[str] = sorted(found, key=lambda t: (-len(t), t))  # longest first
        self._user_index = _special_index(frozenset(found))
        self._mark: str | None = None
        if not found:
            return
        taken = set(joined) | set(tokenizer.chat_template or "")
        self._mark = next((chr(c) for r in _MARKS for c in r if chr(c) not in taken), None)

    @property
    def literal(self) -> bool:
        """Whether a user string holds special-token text (else :meth:`encode` is the tokenizer's)."""
        return bool(self._literals)

    def _hide(self, text: str) -> str:
        """``text`` with each of the user's special-token strings swapped for its placeholder (or, with no
        mark free, removed: the second rendering then only shows which of them the encoder writes itself)."""
        if not text or not self._literals:
            return text
        out, at = [], 0
        for i, j in _find_specials(text, self._user_index):
            mark = f"{self._mark}{self._literals.index(text[i:j])}{self._mark}" if self._mark else ""
            out += [text[at:i], mark]
            at = j
        return "".join(out) + text[at:]

    def _hide_view(self, view: list[Preference]) -> list[Preference]:
        out = []
        for p in view:
            if not isinstance(p, Preference) or not any(
                _find_specials(t, self._user_index) for t in _preference_texts(p)
            ):
                out.append(p)
                continue
            examples = tuple(e.model_copy(update={"q": self._hide(e.q), "a": self._hide(e.a)}) for e in p.examples)
            update = {"description": self._hide(p.description), "instruction": self._hide(p.instruction)}
            out.append(p.model_copy(update={**update, "examples": examples}))
        return out

    def render(self, render: Render, view: list[Preference], *, who: str = "the encoder") -> tuple[str, bool]:
        """``render(view, conversation, system)`` of the user's real strings (the prompt, and what
        ``--show-prompt`` prints), and where a user string holds special-token text, once more with
        it held out, which tells :meth:`encode` where that text lies in the prompt. ``who`` names the
        encoder in the warning about an encoder that changes the user's text."""
        text, add_bos = render(view, self.conversation, self.system)
        if not self._literals:
            return text, add_bos
        hidden = [
            {**m, "content": self._hide(m["content"])} if _find_specials(m["content"], self._user_index) else m
            for m in self.conversation
        ]
        second, _ = render(self._hide_view(view), hidden, self._hide(self.system) if self.system else self.system)
        spans = self._spans(text, second) if self._mark else None
        if spans is None:
            own = sorted({second[i:j] for i, j in _find_specials(second, self._user_index)})
            if own:
                warnings.warn(
                    f"{who} changed the user's text (escaped, cut or reworded it), so the special-token text "
                    f"in it ({', '.join(own)}) could not be told apart from the encoder's own; every "
                    f"{' and '.join(own)} in this prompt is encoded as text, the encoder's own included",
                    PersonaJudgeWarning,
                    stacklevel=3,
                )
        self._located[text] = spans
        return text, add_bos

    def _spans(self, text: str, second: str) -> list[tuple[int, int]] | None:
        """Where the user's special-token strings lie in ``text``, read off ``second`` (the same rendering
        with placeholders), or None where ``second`` with the strings put back is not ``text``."""
        assert self._mark is not None
        parts = re.split(f"{re.escape(self._mark)}(\\d+){re.escape(self._mark)}", second)
        spans, at = [], 0
        for k, part in enumerate(parts):
            if k % 2 == 0:
                if not text.startswith(part, at):
                    return None
                at += len(part)
                continue
            i = int(part)
            if i >= len(self._literals) or not text.startswith(self._literals[i], at):
                return None
            spans.append((at, at + len(self._literals[i])))
            at = spans[-1][1]
        return spans if at == len(text) else None

    def encode(self, rendered: str, add_bos: bool) -> list[int]:
        """Token ids of ``rendered`` (what :meth:`render` returned): the user's special-token text as
        plain text, tokenized as it would be with special-token parsing off; the rest as the tokenizer
        encodes it."""
        tok = self._tokenizer
        if not self._literals:
            return tok.encode(rendered, add_bos=add_bos)
        spans = self._located.get(rendered)
        if spans is None:  # not located (see render): every occurrence of the user's strings is text
            spans = _find_specials(rendered, self._user_index)
        if not spans:
            return tok.encode(rendered, add_bos=add_bos)
        # the template's control tokens: the special-token text outside the user's spans
        control: list[tuple[int, int]] = []
        at = 0
        for i, j in [*spans, (len(rendered), len(rendered))]:
            control += _find_specials(rendered, self._index, at, i)
            at = j
        # cut at the control tokens; a raw piece holding user text is one special=False call, and each
        # run of the others (template text and control tokens) one ordinary call
        segments: list[list[Any]] = []  # [start, end, holds user text, the control token before it]
        at, before = 0, None
        for i, j in [*control, (len(rendered), len(rendered))]:
            if at < i:
                user = any(at <= a < i for a, _ in spans)
                if user or not segments or segments[-1][2]:
                    segments.append([at, i, user, before])
                else:
                    segments[-1][1] = i
            if i < j:
                if segments and not segments[-1][2]:
                    segments[-1][1] = j
                else:
                    segments.append([i, j, False, None])
                before = rendered[i:j]
            at = j
        ids: list[int] = []
        for k, (i, j, user, after) in enumerate(segments):
            if user:
                ids += self._raw(rendered[i:j], add_bos and k == 0, after)
            else:
                ids += tok.encode(rendered[i:j], add_bos=add_bos and k == 0)
        return ids

    def _raw(self, text: str, add_bos: bool, after: str | None) -> list[int]:
        """``text``, a raw-text piece holding the user's special-token text, in one ``special=False``
        call. ``after`` is the control token it follows (None at the start): llama.cpp and most HF
        tokenizers tokenize a piece after a control token as one at the start of a text, but one whose
        pre-tokenizer adds a prefix space only at the very start (SentencePiece with ``legacy=False``,
        Metaspace ``prepend_scheme="first"``) does not, so there the piece is encoded after a newline,
        whose tokens are then dropped."""
        tok = self._tokenizer
        plain = tok.encode(text, add_bos=add_bos, special=False)  # type: ignore[call-arg]
        if after is None or self._prefixes_after(after):
            return plain
        anchor = tok.encode("\n", add_bos=False, special=False)  # type: ignore[call-arg]
        anchored = tok.encode("\n" + text, add_bos=False, special=False)  # type: ignore[call-arg]
        if anchored[: len(anchor)] != anchor:
            return plain
        return anchored[len(anchor) :]

    def _prefixes_after(self, control: str) -> bool:
        """Whether the tokenizer tokenizes text after ``control`` as it tokenizes it at the start of a text."""
        if control not in self._prefix_after:
            tok = self._tokenizer
            joint = tok.encode(control + "a", add_bos=False)
            apart = tok.encode(control, add_bos=False) + tok.encode("a", add_bos=False, special=False)  # type: ignore[call-arg]
            self._prefix_after[control] = joint == apart
        return self._prefix_after[control]


@functools.lru_cache(maxsize=16)
def _special_index(texts: frozenset[str]) -> tuple[re.Pattern[str] | None, tuple[int, ...], frozenset[str]]:
    """What :func:`_find_specials` scans with: the first characters of ``texts``, their lengths
    (longest first) and the set (a tokenizer lists thousands, Gemma's ``<unused0>``... among them,
    so one pass over the text, not one search per string)."""
    firsts = sorted({t[0] for t in texts})
    pattern = re.compile("[" + "".join(map(re.escape, firsts)) + "]") if firsts else None
    return pattern, tuple(sorted({len(t) for t in texts}, reverse=True)), texts


def _find_specials(
    text: str,
    index: tuple[re.Pattern[str] | None, tuple[int, ...], frozenset[str]],
    start: int = 0,
    end: int | None = None,
) -> list[tuple[int, int]]:
    """The spans of ``index``'s strings in ``text[start:end]``, leftmost-longest (as a tokenizer
    matches its added tokens)."""
    pattern, lengths, texts = index
    end = len(text) if end is None else end
    out: list[tuple[int, int]] = []
    at = start
    while pattern is not None:
        m = pattern.search(text, at, end)
        if m is None:
            break
        i = m.start()
        hit = next((n for n in lengths if i + n <= end and text[i : i + n] in texts), 0)
        if hit:
            out.append((i, i + hit))
        at = i + (hit or 1)
    return out


def _preference_texts(p: Any) -> list[str]:
    """The texts of a preference an encoder may put in a prompt."""
    if not isinstance(p, Preference):
        return []
    return [p.description, p.instruction, *(t for e in p.examples for t in (e.q, e.a))]


def checked_render(out: Any, who: str) -> tuple[str, bool]:
    """``out``, what ``who``'s ``render`` returned, checked to be ``(text, add_bos)``: anything else would
    fail at ``tokenizer.encode`` or an unpacking far from the plugin (a bare str unpacks into letters)."""
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], str) and isinstance(out[1], bool)):
        raise PluginError(
            f"{who}.render returned {type(out).__name__} {out!r:.60}; it returns (text, add_bos): a str and a bool"
        )
    return out


def _with_system(conversation: list[Message], system: str | None) -> list[Message]:
    if not system:
        return list(conversation)
    if conversation and conversation[0]["role"] == "system":
        return [{"role": "system", "content": system + "\n\n" + conversation[0]["content"]}] + conversation[1:]
    return [{"role": "system", "content": system}] + list(conversation)


def _chat(tokenizer: Tokenizer, messages: list[Message]) -> str:
    if not tokenizer.chat_template:
        raise ConfigError("this model has no chat template; use --encoder plain (or auto)")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _fold_system(msgs: list[Message]) -> list[Message]:
    """``msgs`` without system messages, their text put in front of the first remaining turn: for
    templates with no system role (Gemma 2). Both the ``system`` and the ``chat-turn`` encoder fall
    back to this, so a ``--system`` text reaches the model the same way through either."""
    text = "\n\n".join(m["content"] for m in msgs if m["role"] == "system" and m["content"].strip())
    rest = [m for m in msgs if m["role"] != "system"]
    if text:
        rest[0] = {"role": rest[0]["role"], "content": text + "\n\n" + rest[0]["content"]}
    return rest


def _chat_or_fold(tokenizer: Tokenizer, msgs: list[Message]) -> str:
    """The chat template on ``msgs``; where it refuses them and they hold a system message, again
    with the system text folded into the first turn (:func:`_fold_system`)."""
    try:
        return _chat(tokenizer, msgs)
    except ConfigError:
        raise
    except Exception:
        if not any(m["role"] == "system" for m in msgs):
            raise
        return _chat(tokenizer, _fold_system(msgs))


class ChatTurnEncoder:
    name = "chat-turn"
    description = "Each view's preference text as its own user turn before the prompt (the released code's form)."
    Options = EncoderOptions

    def render(self, view, conversation, tokenizer, *, system=None, options=None):
        encoder_options(self, options)
        msgs = _with_system(conversation, system)
        if view:
            at = 1 if msgs[0]["role"] == "system" else 0
            turn = {"role": "user", "content": compose(view)}
            try:
                return _chat(tokenizer, msgs[:at] + [turn] + msgs[at:]), False
            except ConfigError:
                raise
            except Exception:
                # Templates that insist on alternating roles (Gemma, Llama 2, Mistral) reject two
                # user turns in a row; merge the preference into the first user turn instead (and,
                # where the template has no system role either, the system text in front of it).
                first = msgs[at]
                msgs = (
                    msgs[:at]
                    + [{"role": "user", "content": compose(view) + "\n\n" + first["content"]}]
                    + msgs[at + 1 :]
                )
        return _chat_or_fold(tokenizer, msgs), False


class SystemEncoder:
    name = "system"
    description = "The view's preference text as the system message."
    Options = EncoderOptions

    def render(self, view, conversation, tokenizer, *, system=None, options=None):
        encoder_options(self, options)
        text = "\n\n".join(x for x in (system, compose(view) if view else "") if x)
        msgs = _with_system(conversation, text or None)
        # Some templates (Gemma 2) have no system role; then it goes in front of the first user turn.
        return _chat_or_fold(tokenizer, msgs), False


#: Plain-text templates for base models. ``{header}`` is the preference line (or empty),
#: turns are rendered with ``user`` / ``assistant`` labels, and the text ends with the
#: assistant label so the model continues with the answer.
PLAIN_TEMPLATES: dict[str, dict[str, str]] = {
    "qa": {
        "header": "Instructions: {preference}\n\n",
        "user": "Question: {content}\n",
        "assistant": "Answer: {content}\n\n",
        "prompt": "Answer:",
        "system": "{content}\n\n",
        "stop": "\nQuestion:",
    },
    "dialogue": {
        "header": "The assistant follows this instruction: {preference}\n\n",
        "user": "User: {content}\n",
        "assistant": "Assistant: {content}\n",
        "prompt": "Assistant:",
        "system": "{content}\n\n",
        "stop": "\nUser:",
    },
}


#: the one placeholder each format of a plain template fills in; ``prompt`` and ``stop`` are literal text
TEMPLATE_FIELDS = {"header": "preference", "user": "content", "assistant": "content", "system": "content"}


def _check_format(key: str, fmt: str) -> None:
    """``fmt`` holds its one placeholder, bare, or a ValueError (one line) saying what is wrong.

    Checked when the options are read, not at render time, where a bad format string would be a
    ``KeyError``/``IndexError`` traceback after the model loaded. The placeholder must be there: a
    ``header`` without ``{preference}`` leaves the preferences out of every view's prompt (every view
    would then be the same, as ``exemplar`` refuses for ``n = 0`` without the instruction line), and
    a ``user`` without ``{content}`` drops the question. It must be bare: ``{content.upper}`` would
    put a method's memory address into the prompt, ``{content!r}`` quotes and escapes the text."""
    field = TEMPLATE_FIELDS.get(key)
    if field is None:
        return
    try:
        parsed = [
            (name, spec or "", conv or "") for _, name, spec, conv in string.Formatter().parse(fmt) if name is not None
        ]
    except ValueError as err:
        raise ValueError(
            f"format {key}: {err} in {fmt!r}; {key} takes only {{{field}}} (write a literal brace as {{{{ or }}}})"
        ) from None
    for name, spec, conversion in parsed:
        if name == "" or name.isdigit():
            raise ValueError(
                f"format {key}: Replacement index {name or 0} out of range in {fmt!r}; {key} takes only {{{field}}}"
            )
        if not re.split(r"[.\[]", name)[0] == field:
            raise ValueError(
                f"format {key}: unknown placeholder {{{name}}}; {key} takes only {{{field}}} "
                "(write a literal brace as {{ or }})"
            )
        if name != field or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(
                f"format {key}: {shown} is not allowed; {key} takes only {{{field}}}, bare "
                "(write a literal brace as {{ or }})"
            )
    if not parsed:
        what = "the view's preferences" if key == "header" else f"the {key} text"
        raise ValueError(
            f"format {key}: {fmt!r} has no {{{field}}}, so {what} would be left out of every prompt; "
            f"put {{{field}}} where it goes"
        )


class PlainOptions(EncoderOptions):
    """``template``: a name in :data:`PLAIN_TEMPLATES`, or a table of format strings that replace ``qa``'s
    (``header`` takes ``{preference}``; ``user``, ``assistant`` and ``system`` take ``{content}``;
    ``prompt`` and ``stop`` are literal)."""

    template: str | dict[str, str] = "qa"

    @field_validator("template")
    @classmethod
    def _known(cls, v: str | dict[str, str]) -> str | dict[str, str]:
        if isinstance(v, dict):
            unknown = sorted(set(v) - set(PLAIN_TEMPLATES["qa"]))
            if unknown:
                raise ValueError(
                    f"unknown format(s) {', '.join(unknown)}; a template's formats are {', '.join(PLAIN_TEMPLATES['qa'])}"
                )
            for key, fmt in v.items():
                _check_format(key, fmt)
        elif v not in PLAIN_TEMPLATES:
            raise ValueError(
                f"unknown plain template '{v}'; choose one of {', '.join(PLAIN_TEMPLATES)} or give a table of formats"
            )
        return v


class PlainEncoder:
    name = "plain"
    description = "A plain-text template for base models without a chat template (options: template=qa|dialogue)."
    Options = PlainOptions

    def _template(self, options) -> dict[str, str]:
        name = encoder_options(self, options)["template"]
        if isinstance(name, dict):
            return {**PLAIN_TEMPLATES["qa"], **name}
        return PLAIN_TEMPLATES[name]

    def stop_strings(self, tokenizer, options=None) -> list[str]:
        """A base model answers and then writes the next question; stop there.

        ``encoder_options.stop = false`` turns this off (the benchmark does, to
        time a fixed number of tokens).
        """
        if encoder_options(self, options)["stop"] is False:
            return []
        stop = self._template(options).get("stop")
        return [stop] if stop else []

    def render(self, view, conversation, tokenizer, *, system=None, options=None):
        tpl = self._template(options)
        parts = []
        for m in _with_system(conversation, system):
            if m["role"] == "system":
                parts.append(tpl["system"].format(content=m["content"].strip()))
        if view:
            parts.append(tpl["header"].format(preference=compose(view)))
        for m in conversation:
            if m["role"] in ("user", "assistant"):
                parts.append(tpl[m["role"]].format(content=m["content"].strip()))
        parts.append(tpl["prompt"])
        return "".join(parts), True


class InstructionEncoder:
    name = "instruction"
    description = "The P-Soups form: the preference appended to the last user instruction."
    #: without a chat template it renders through ``plain``, so it takes plain's options
    Options = PlainOptions

    def render(self, view, conversation, tokenizer, *, system=None, options=None):
        encoder_options(self, options)
        msgs = list(conversation)
        if view:
            last = msgs[-1]
            msgs[-1] = {"role": "user", "content": last["content"].rstrip() + " " + compose(view)}
        if tokenizer.chat_template:  # no system role: the system text is folded in, as chat-turn and system do
            return _chat_or_fold(tokenizer, _with_system(msgs, system)), False
        return PlainEncoder().render([], msgs, tokenizer, system=system, options=options)

    def stop_strings(self, tokenizer, options=None) -> list[str]:
        return [] if tokenizer.chat_template else PlainEncoder().stop_strings(tokenizer, options)


class ExemplarEncoder:
    """Few-shot demonstrations of the view's preferences, for base models.

    A small base model barely follows "Instructions: be concise" but imitates
    demonstrations closely, so each view's context is::

        Instructions: <the view's instructions>        (option instruction=false drops it)

        Question: <exemplar question 1>
        Answer: <exemplar answer 1, written the preference's way>

        ... (options.n exemplars, default 3)

        Question: <the user's prompt>                   (earlier turns of a conversation as
        Answer:                                          Question/Answer pairs before it)

    Which exemplars a view shows:

    - one preference: its own ``examples``;
    - several preferences: the library's *combined* exemplars for exactly those
      built-in preferences (``concise+friendly``: answers that are short *and*
      warm) when they exist and none of the preferences brings its own
      examples; otherwise the preferences' exemplars interleaved (first of
      each, then second of each, ...), at least one per preference for
      ``n >= 1``. Each of
      those shows one preference only, so the composition is weaker than
      combined exemplars; write combined ones (a view's preferences in one
      ``examples`` list of a free-text preference) where it matters;
    - no preference (the ``base`` method's view): the library's *neutral*
      exemplars, plain unstyled answers. ``base`` is then prompted in the same
      Question/Answer format with the same number of demonstrations as the
      personalized views, so a comparison with ``base`` measures the
      preference, not the format.

    ``n = 0`` shows no exemplars in any view (only the ``Instructions:`` line,
    which ``instruction = false`` may then not drop). A preference without
    examples is an error here when ``n >= 1`` (``auto`` falls back to
    ``plain`` for such runs). A ``system`` message goes first, as in ``plain``.
    The format ends an answer at the end of its line: :meth:`stop_strings`
    gives ``"\n"`` (which the emitter applies only once the answer has text)
    and ``"Question:"``/``"Answer:"``, so an answer never carries an echoed
    label or the start of the next exemplar.
    """

    name = "exemplar"
    description = "Few-shot Question/Answer demonstrations of each view's preferences (base models)."

    class Options(EncoderOptions):
        n: int = Field(3, ge=0, description="Exemplars per view; 0: none (the instruction line alone).")
        instruction: bool = Field(True, description="False drops the Instructions: line.")

        @model_validator(mode="after")
        def _says_something(self):
            if self.n == 0 and not self.instruction:
                raise ValueError(
                    "n = 0 with instruction = false leaves the preferences out of every view's prompt; "
                    "keep the exemplars (n >= 1) or the Instructions: line"
                )
            return self

    #: Stop strings the format implies: an answer is one line, and a label means the model has
    #: moved on to the next exemplar (or echoes the format) -- nothing after it belongs to the answer.
    STOP = ("\n", "Question:", "Answer:")

    @staticmethod
    def examples(view: list[Preference], n: int = 3) -> list[Example]:
        """The exemplars a view shows (see the class docstring for the rule)."""
        if n == 0:  # none, for every kind of view (so none needs examples)
            return []
        if not view:
            return list(neutral_examples()[:n])
        missing = [p.name for p in view if not p.examples]
        if missing:
            raise ConfigError(
                f"the exemplar encoder needs examples for every preference; {', '.join(missing)} "
                'has none (give `examples = [{q = "...", a = "..."}]` in a preferences file, '
                "or use --encoder plain)"
            )
        if len(view) == 1:
            return list(view[0].examples[:n])
        names = [p.name for p in view]
        own = any(p.examples != builtin_examples(p.name) for p in view)
        combined = None if own else combined_examples(names)
        if combined:
            return list(combined[:n])
        out: list[Example] = []
        for i in range(max(len(p.examples) for p in view)):
            out.extend(p.examples[i] for p in view if i < len(p.examples))
        return out[: max(n, len(view))]

    def stop_strings(self, tokenizer, options=None) -> list[str]:
        if encoder_options(self, options)["stop"] is False:
            return []
        return list(self.STOP)

    def check_views(self, views: list[list[Preference]], options=None) -> None:
        """A preference without examples, refused before the model loads (``render`` would refuse it
        after)."""
        n = encoder_options(self, options)["n"]
        for view in views:
            self.examples(view, n)

    def render(self, view, conversation, tokenizer, *, system=None, options=None):
        options = encoder_options(self, options)
        parts = []
        for m in _with_system(conversation, system):
            if m["role"] == "system":
                parts.append(m["content"].strip() + "\n\n")
        if view and options["instruction"]:
            parts.append(f"Instructions: {compose(view)}\n\n")
        for ex in self.examples(view, options["n"]):
            parts.append(f"Question: {ex.q}\nAnswer: {ex.a}\n\n")
        for m in conversation:
            if m["role"] == "user":
                parts.append(f"Question: {_one_line(m['content'])}\n")
            elif m["role"] == "assistant":
                parts.append(f"Answer: {_one_line(m['content'])}\n\n")
        parts.append("Answer:")
        return "".join(parts), True


def _one_line(text: str) -> str:
    """A turn's text on one line: in this format a newline ends a question or an answer."""
    return " ".join(text.split())


BUILTIN_ENCODERS = (ChatTurnEncoder, SystemEncoder, PlainEncoder, InstructionEncoder, ExemplarEncoder)


def auto_encoder_name(tokenizer: Tokenizer, views: list[list[Preference]] | None = None) -> str:
    """The encoder ``auto`` stands for.

    ``chat-turn`` when the model has a chat template. Without one (a base
    model): ``exemplar`` when ``views`` (the user's views, before a method
    plans its own) are given and every preference in them has examples --
    every built-in one does -- since a base model follows demonstrations far
    better than instructions; ``plain`` otherwise. All methods of a run see the
    same user views, so ``base``, ``prompt`` and Persona-judge are encoded alike.
    """
    if tokenizer.chat_template:
        return "chat-turn"
    if views is not None and all(p.examples for v in views for p in v):
        return "exemplar"
    return "plain"
