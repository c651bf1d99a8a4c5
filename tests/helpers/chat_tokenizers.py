"""Chat-template tokenizers built inside the tests (no model hub needed)."""

from jinja2.sandbox import ImmutableSandboxedEnvironment

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Gemma-like: no system role, and roles must alternate user/assistant.
STRICT = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


class TemplateError(Exception):
    pass


class ChatTokenizer:
    """Byte-level ids (0 = EOS) with a Jinja chat template, like an HF tokenizer."""

    vocab_size = 257
    eos_token_ids = frozenset({0})

    def __init__(self, template=CHATML, bos="<s>"):
        self.chat_template = template
        self.bos = bos
        env = ImmutableSandboxedEnvironment()

        def raise_exception(msg):
            raise TemplateError(msg)

        env.globals["raise_exception"] = raise_exception
        self._tpl = env.from_string(template)

    def encode(self, text, *, add_bos=True):
        ids = [b + 1 for b in text.encode()]
        return ([1] if add_bos else []) + ids

    def decode(self, ids):
        return bytes(i - 1 for i in ids if i > 1).decode(errors="replace")

    def apply_chat_template(self, messages, *, add_generation_prompt=True):
        return self._tpl.render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos)
