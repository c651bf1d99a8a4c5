"""A toy backend whose logits turn NaN on one marker: a row that fails with a ``NumericalError``.

Shared by the tests of a NaN row (the Python API's, locally; the Ray replicas'). The Ray tests ship
this module to Ray's workers by value (``ray.cloudpickle.register_pickle_by_value``): the workers
cannot import tests/helpers.
"""

import numpy as np

from personajudge.backends.toy import ToyBackend

BAD = "xqx"  # a prompt holding this overflows (NanBackend)


class NanBackend(ToyBackend):
    """NaN logits for any context that contains :data:`BAD` (a prompt that overflows float16, say)."""

    def logits_after(self, context):
        out = super().logits_after(context)
        return np.full_like(out, np.nan) if BAD in self.tokenizer.decode(list(context)) else out
