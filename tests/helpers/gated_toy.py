"""A toy backend whose forwards wait for a gate: a request stays 'running' as long as a test wants."""

import threading

from personajudge.backends.toy import ToyBackend


class GatedToy(ToyBackend):
    """``entered`` is set when a forward starts; it returns once ``gate`` is set (or fails after 30 s)."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()

    def open(self, n_views):
        s = super().open(n_views)
        inner = s._forward_many

        def gated(calls):
            self.entered.set()
            assert self.gate.wait(30)
            return inner(calls)

        s._forward_many = gated
        return s
