"""Preferences a caller (or a preferences file) defines or adjusts, shared by the preference tests."""

from personajudge.preferences import Example, Preference, resolve

#: a preference no library has: a file's ``[[preferences]] name = "pirate"`` table
PIRATE = Preference(
    name="pirate",
    description="Talk like a pirate",
    instruction="Talk like a pirate.",
    examples=[{"q": "Where is the ship?", "a": "Arr, in the harbour."}],
)
#: the built-in concise with its own examples, as a file's ``[[preferences]] name = "concise"`` table makes it
OWN_CONCISE = resolve("concise").model_copy(update={"examples": (Example(q="Why?", a="Because."),)})
