"""A third-party preference encoder: the view's preferences as a "persona card".

Installed, it registers the encoder ``persona-card`` through the
``personajudge`` entry-point group; use it with
``personajudge generate ... --encoder persona-card``.
"""

from personajudge.plugins import hookimpl


class PersonaCardEncoder:
    name = "persona-card"
    description = "The view's preferences as a bulleted persona card above the question (example plugin)."

    def render(self, view, conversation, tokenizer, *, system=None, options=None):
        lines = ["# Persona card"]
        lines += [f"- {p.name}: {p.instruction}" for p in view] or ["- (no preferences)"]
        turns = [f"{m['role'].capitalize()}: {m['content'].strip()}" for m in conversation if m["role"] != "system"]
        text = "\n".join(lines) + "\n\n" + "\n".join(turns) + "\nAssistant:"
        return text, True


@hookimpl
def register_encoders(register):
    register(PersonaCardEncoder)
