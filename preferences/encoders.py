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

import re
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import Field, field_validator, model_validator

from personajudge.core.config import Options, take_options
from personajudge.core.contract import Tokenizer
from personajudge.core.errors import ConfigError, PluginError
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
    out = encoder.render(user.view(view), user.conversation, tokenizer, system=user.system, options=options)
    cls = type(encoder).__qualname__
    text, add_bos = checked_render(out, f"encoder '{getattr(encoder, 'name', cls)}' ({cls})")
    return user.encode(text, add_bos)


class UserText:
    """The user's strings (messages, system text, preferences) with their special-token text kept literal.

    A tokenizer parses special-token text: ``"<eos>"`` in a prompt would be the model's real end of
    text, and ``"<end_of_turn>"`` in a message would close the turn, so a user (or any client of the
    server) could end a view's context early or step out of the chat-turn or exemplar frame that
    carries its preference. The encoder renders one string, in which the template's markers and the
    user's text can no longer be told apart; so before it renders, each special-token string the
    tokenizer lists (``special_texts``) that occurs in the user's strings is swapped for a placeholder
    (a private-use character no input holds, and a number), and after it, the rendered text is encoded
    in pieces: the text between placeholders as before (its markers are control tokens), each
    placeholder as the literal string, with ``special=False``. Every encoder, third-party ones too,
    gets this without knowing of it, as the placeholders survive the usual templating (trimming,
    joining, folding whitespace). Where no user string holds special-token text (ordinary prompts),
    nothing is swapped and the ids are exactly ``tokenizer.encode(text)``'s. A tokenizer that lists
    no ``special_texts`` is encoded as before.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        conversation: list[Message],
        system: str | None = None,
        views: list[list[Preference]] = (),  # type: ignore[assignment]
    ):
        self._tokenizer = tokenizer
        self.conversation, self.system = conversation, system
        texts = [m["content"] for m in conversation] + ([system] if system else [])
        texts += [t for v in views for p in v for t in _preference_texts(p)]
        joined = "\x00".join(texts)
        specials = getattr(tokenizer, "special_texts", None) or ()
        found = sorted((t for t in specials if t in joined), key=lambda t: (-len(t), t))  # longest first
        self._literals: list[str] = found
        if not found:
            self._pattern = None
            return
        taken = joined + (tokenizer.chat_template or "")
        self._mark = next(chr(c) for c in range(0xE000, 0xF900) if chr(c) not in taken)
        self._pattern = re.compile("|".join(map(re.escape, found)))
        self._placeholder = re.compile(f"{self._mark}(\\d+){self._mark}")
        self.conversation = [{**m, "content": self._hide(m["content"])} for m in conversation]
        self.system = self._hide(system) if system else system

    def _hide(self, text: str) -> str:
        if self._pattern is None:
            return text
        index = {t: i for i, t in enumerate(self._literals)}
        return self._pattern.sub(lambda m: f"{self._mark}{index[m.group(0)]}{self._mark}", text)

    def view(self, view: list[Preference]) -> list[Preference]:
        """``view`` with the special-token text of its preferences' texts swapped (the same objects where none)."""
        if self._pattern is None:
            return view
        out = []
        for p in view:
            if not any(self._pattern.search(t) for t in _preference_texts(p)):
                out.append(p)
                continue
            examples = tuple(e.model_copy(update={"q": self._hide(e.q), "a": self._hide(e.a)}) for e in p.examples)
            update = {"description": self._hide(p.description), "instruction": self._hide(p.instruction)}
            out.append(p.model_copy(update={**update, "examples": examples}))
        return out

    def text(self, rendered: str) -> str:
        """The rendered text with the literal strings back in place of the placeholders (what it reads as)."""
        if self._pattern is None:
            return rendered
        return self._placeholder.sub(lambda m: self._literals[int(m.group(1))], rendered)

    def encode(self, rendered: str, add_bos: bool) -> list[int]:
        """Token ids of ``rendered`` (an encoder's output): the user's special-token text as plain text."""
        tok = self._tokenizer
        if self._pattern is None:
            return tok.encode(rendered, add_bos=add_bos)
        parts = self._placeholder.split(rendered)  # template text, literal index, template text, ...
        ids = tok.encode(parts[0], add_bos=add_bos)
        for i in range(1, len(parts), 2):
            ids += tok.encode(self._literals[int(parts[i])], add_bos=False, special=False)  # type: ignore[call-arg]
            if parts[i + 1]:
                ids += tok.encode(parts[i + 1], add_bos=False)
        return ids


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
    """``fmt`` formats with its one placeholder, or a ValueError (one line) saying what is wrong.

    Checked when the options are read, not at render time, where a bad format string would be a
    ``KeyError``/``IndexError`` traceback after the model loaded."""
    field = TEMPLATE_FIELDS.get(key)
    if field is None:
        return
    try:
        fmt.format(**{field: ""})
    except KeyError as err:
        raise ValueError(
            f"format {key}: unknown placeholder {{{err.args[0]}}}; {key} takes only {{{field}}} "
            "(write a literal brace as {{ or }})"
        ) from None
    except (IndexError, ValueError, AttributeError, TypeError) as err:
        raise ValueError(
            f"format {key}: {err} in {fmt!r}; {key} takes only {{{field}}} (write a literal brace as {{{{ or }}}})"
        ) from None


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
