"""A third-party preference encoder: the view's preferences as a "persona card".

The plugin the README's "A preference encoder" section shows, as an installable
package. Installed, it registers the encoder ``persona-card`` through the
``personajudge`` entry-point group; use it with
``personajudge generate ... --encoder persona-card``.
"""

import personajudge as pj


class PersonaCard:
    name = "persona-card"
    description = "The view's preferences as a persona card."

    def render(self, view, conversation, tokenizer, *, system=None, options=None):
        card = "\n".join(f"- {p.name}: {p.instruction}" for p in view)
        text = f"# Persona card\n{card}\n\nUser: {conversation[-1]['content']}\nAssistant:"
        return text, True

    def stop_strings(self, tokenizer, options=None):
        # a base model answers on one line, then invents more card lines or the next turn
        return ["\n", "User:"]


@pj.hookimpl
def register_encoders(register):
    register(PersonaCard)
