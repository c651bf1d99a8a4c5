"""Chat templates are code from the model file: rendered in a sandbox with time and size limits.

Hostile templates must be stopped *before* they allocate (checked with tracemalloc's peak) or run
for long (checked with the step budget, which does not depend on the machine's speed); every
failure is one ChatTemplateError line naming the model file; real templates render exactly as
the plain jinja2 sandbox renders them.
"""

from __future__ import annotations

import json
import tracemalloc

import pytest

jinja2 = pytest.importorskip("jinja2")
pytest.importorskip("hypothesis")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st
from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: E402

from personajudge.core import chat_template  # noqa: E402
from personajudge.core.chat_template import ChatTemplate  # noqa: E402
from personajudge.core.errors import ChatTemplateError, ChatTemplateFatalError, ConfigError  # noqa: E402

MSGS = [{"role": "user", "content": "hi"}]
ORIGIN = "/models/evil.gguf"


def render(source, *, messages=MSGS, **limits):
    return ChatTemplate(source, ORIGIN).render(
        messages=messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>", **limits
    )


def stopped(source, **limits):
    """The error a hostile template ends in, with the peak memory its rendering allocated."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        with pytest.raises(ChatTemplateFatalError) as info:
            render(source, **limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return str(info.value), peak


# -- time ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        # no output and no call inside the inner loop: only the loop itself can count
        "{% set r = range(100000) %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}",
        # exponential macro recursion (2**60 calls)
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
        # loop over a loop's output without any output of its own
        "{% for i in range(100000) %}{% set x = range(100000)|list %}{% endfor %}",
    ],
)
def test_runaway_loops_are_stopped_by_the_step_budget(source):
    msg, _ = stopped(source, max_steps=20_000, time_limit=600)
    assert "20,000 steps" in msg and ORIGIN in msg and "--encoder plain" in msg


def test_the_deadline_stops_a_loop_too():
    # a generous step budget: only the (tiny) deadline can end this
    msg, _ = stopped(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        max_steps=10**12,
        time_limit=0.05,
    )
    assert "within 0.05 s" in msg


def test_deep_recursion_is_one_line():
    msg, _ = stopped("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}")
    assert "recursed too deeply" in msg and len(msg.splitlines()) == 1


# -- size: refused before the allocation ----------------------------------------------------------

GIB = 1 << 30


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'x' * 5000000000 }}",
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
        "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l }}",
        # a tower of shared lists: tiny in memory, exponential for str() / == / tojson to walk
        "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l }}",
        "{% set a = namespace(l=[1]) %}{% set b = namespace(l=[1]) %}{% for i in range(64) %}"
        "{% set a.l = [a.l, a.l] %}{% set b.l = [b.l, b.l] %}{% endfor %}{{ a.l == b.l }}",
        "{% set ns = namespace(d={}) %}{% for i in range(64) %}{% set ns.d = {'a': ns.d, 'b': ns.d} %}{% endfor %}"
        "{{ ns.d|tojson }}",
        "{{ 'x'|center(3000000000) }}",
        "{{ 'x'.ljust(3000000000) }}",
        "{{ 'x'.zfill(3000000000) }}",
        "{{ '%2000000000d'|format(1) }}",
        "{{ '%2000000000d' % 1 }}",
        "{{ '{:2000000000}'.format(1) }}",
        "{% set s = 'a' * 400000 %}{{ s.replace('a', s) }}",
        "{% set s = 'a' * 400000 %}{{ s|replace('a', s) }}",
        "{% set s = '\t' * 400000 %}{{ s.expandtabs(400000) }}",
        "{% set s = '\n' * 400000 %}{{ s|indent(400000) }}",
        "{% set s = 'x' * 400000 %}{{ s|wordwrap(1, wrapstring=s) }}",
        "{% set s = 'x' * 400000 %}{{ [s, s, s]|join }}",
        "{% set s = 'x' * 400000 %}{{ ', '.join([s, s, s]) }}",
        "{{ ([[1]] * 200000)|sum(start=[]) }}",
        "{{ range(10)|batch(900000, fill_with='x' * 900) }}",
        "{{ 2 ** 100000000 }}",
        "{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}{{ ns.n }}",
        "{% macro m() %}" + "{{ s }}" * 50 + "{% endmacro %}{% set s = 'x' * 400000 %}{{ m() }}",
        "{% set s = 'x' * 1000 %}{% for i in range(100000) %}{{ s }}{% endfor %}",
    ],
)
def test_size_bombs_are_refused_before_they_allocate(source):
    msg, peak = stopped(source, max_steps=10**9, time_limit=600)
    assert ORIGIN in msg and len(msg.splitlines()) == 1
    # the limit is ~1 MiB of text: a refused bomb never comes near a gigabyte
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB"


def test_the_size_limit_grows_with_the_input():
    """A long conversation is not a bomb: the limit is relative to the messages' size."""
    long = [{"role": "user", "content": "word " * 400_000}]  # 2 MB, over the fixed part of the limit
    out = render("{% for m in messages %}{{ m.content }}{{ m.content }}{% endfor %}", messages=long)
    assert len(out) == 2 * len(long[0]["content"])


def test_an_oversized_source_is_refused():
    with pytest.raises(ChatTemplateFatalError, match="characters long"):
        ChatTemplate("x" * (chat_template.MAX_SOURCE_CHARS + 1), ORIGIN)


# -- errors: one line naming the model file -------------------------------------------------------


def test_raise_exception_is_one_sanitized_line_naming_the_file():
    source = "{{ raise_exception('Roles must alternate\\n\\x1b[31mred\\x1b[0m' ~ 'y' * 5000) }}"
    with pytest.raises(ChatTemplateError) as info:
        render(source)
    msg = str(info.value)
    assert not isinstance(info.value, ConfigError)  # the encoders may retry with merged turns
    assert len(msg.splitlines()) == 1 and "\x1b" not in msg and len(msg) < 600
    assert msg.startswith(f"the chat template of {ORIGIN} failed: Roles must alternate")
    assert "--encoder plain" in msg and "--encoder system" in msg


@pytest.mark.parametrize(
    "source, words",
    [
        ("{% for %}", "does not compile"),
        ("{{ messages + 1 }}", "TypeError"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ("{{ messages.__class__.__mro__ }}", None),  # the sandbox's own refusal renders as empty / undefined
        ("{{ ''.__class__.__subclasses__() }}", "is unsafe"),
        ("{{ 'a'.translate({97: 'b' * 100}) }}", "not allowed"),
    ],
)
def test_template_errors_are_typed(source, words):
    try:
        out = render(source)
    except ChatTemplateError as err:
        assert words is None or words in str(err)
        assert ORIGIN in str(err) and len(str(err).splitlines()) == 1
    else:
        assert words is None and "__mro__" not in out


def test_limits_need_a_render_call():
    """The compiled template cannot be run around the limits (no budget: it refuses)."""
    tpl = ChatTemplate("{% for i in range(3) %}x{% endfor %}", ORIGIN)
    with pytest.raises(chat_template._Over):
        "".join(tpl._template.generate(messages=MSGS))


# -- real templates render exactly as in the plain sandbox ----------------------------------------

GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}{%- set role = "model" -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}{{ message['content'] | trim }}{%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"""

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# the constructs the guards wrap, used the way templates use them
KITCHEN_SINK = (
    "{%- set ns = namespace(sys='', n=0) -%}{%- for m in messages -%}{%- if m.role == 'system' -%}"
    "{%- set ns.sys = ns.sys ~ m.content -%}{%- endif -%}{%- set ns.n = ns.n + 1 -%}{%- endfor -%}"
    "{{ ns.sys|tojson }}|{{ ns.n }}|{% for m in messages if m.role != 'system' %}[{{ loop.index }}/{{ loop.length }}"
    "{{ ',' if not loop.last }}]{{ m|tojson(indent=2) }}{% endfor %}|{{ messages|map(attribute='role')|join(', ') }}"
    "|{{ '%s-%d'|format('a', 3) }}|{{ '{}:{}'.format(1, 2) }}|{{ (messages|length) * 2 }}|{{ [1, 2, 3]|sum }}"
    "|{{ 'ab' * 3 }}|{{ messages[-1].content|indent(2) }}|{{ messages[-1].content|wordwrap(5) }}"
    "|{{ messages[-1].content|replace('a', 'bb') }}|{{ messages[-1].content|center(40) }}|{{ range(3)|list }}"
    "|{{ dict(a=1).items()|list }}|{{ (1, 2) + (3,) }}|{{ {'k': [1, 2]}['k'][1:] }}|{{ 2 ** 10 }}"
    "|{{ messages[-1].content.split(' ')|reverse|join(' ') }}|{{ messages|selectattr('role', 'eq', 'user')|list|length }}"
    "{% if add_generation_prompt %}<gen>{% endif %}"
)

REAL = {"gemma3": GEMMA3, "llama3": LLAMA3, "chatml": CHATML, "kitchen-sink": KITCHEN_SINK}


def plain_render(source, **context):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source).render(**context)


text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60)


@st.composite
def conversations(draw):
    n = draw(st.integers(1, 4))
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": draw(text)} for i in range(2 * n - 1)]
    if draw(st.booleans()):
        msgs = [{"role": "system", "content": draw(text)}] + msgs
    return msgs


@pytest.mark.parametrize("name", sorted(REAL))
@given(msgs=conversations(), gen=st.booleans())
def test_real_templates_render_as_in_the_plain_sandbox(name, msgs, gen):
    ctx = dict(messages=msgs, add_generation_prompt=gen, bos_token="<bos>", eos_token="<eos>")
    try:
        want = plain_render(REAL[name], **ctx)
    except jinja2.exceptions.TemplateError as err:  # Gemma's roles rule: the same refusal, as a typed error
        with pytest.raises(ChatTemplateError, match="roles must alternate"):
            ChatTemplate(REAL[name], ORIGIN).render(**ctx)
        assert "alternate" in str(err)
        return
    assert ChatTemplate(REAL[name], ORIGIN).render(**ctx) == want
