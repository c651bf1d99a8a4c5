"""A toy backend whose forward raises for one marker: a row that fails with an error of its own.

Shared by the tests of such a row (the Python API's and the JSONL batch's, locally; the Ray
replicas'). The Ray tests ship this module to Ray's workers by value
(``ray.cloudpickle.register_pickle_by_value``): the workers cannot import tests/helpers.
"""

from personajudge.backends.toy import ToyBackend


class PoisonError(RuntimeError):
    """The one row's own failure (what a backend raises for a forward it cannot run)."""


class PoisonToy(ToyBackend):
    """A toy whose forward raises for a view holding the text "poison" once it has decoded ``after``
    tokens past its prompt: mid-decoding, while the other rows of its step are running.

    ``error``: the class raised (:class:`PoisonError`, a third-party error; a ``PersonaJudgeError``
    subclass for a user-level one)."""

    def __init__(self, config=None, after: int = 5, error: type[Exception] = PoisonError):
        super().__init__(config)
        self.after = after
        self.error = error
        self.raised = 0

    def open(self, n_views):
        s = super().open(n_views)
        forward_many, start = s._forward_many, {}

        def poisoned_forward_many(calls):
            for c in calls:
                ctx = s._ctx[c.view]
                if not ctx:
                    start[c.view] = len(c.tokens)
                elif "poison" in self.tokenizer.decode(ctx) and len(ctx) >= start.get(c.view, 0) + self.after:
                    self.raised += 1
                    raise self.error(f"cannot run slot {c.view}")
            return forward_many(calls)

        s._forward_many = poisoned_forward_many
        return s
