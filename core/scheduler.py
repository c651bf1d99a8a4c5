"""Who drafts and who judges in each iteration.

Persona-judge alternates the roles of two views every iteration so that each
preference both proposes and vets text; Persona-judge-Base keeps them fixed.
With more than two views the roles rotate so that every view takes both roles.
"""

from __future__ import annotations

from .config import RoleSchedule


class RoleScheduler:
    """Maps an iteration number to a ``(draft_view, judge_view)`` pair.

    - ``alternate``: two views swap every iteration; with N > 2 views this is
      the same as ``round-robin``.
    - ``round-robin``: iteration i drafts with view i mod N, judged by view
      (i + 1) mod N.
    - ``fixed``: view 0 always drafts; view 1 judges (with N > 2 views the judge
      cycles through views 1..N-1).
    """

    def __init__(self, n_views: int, policy: RoleSchedule = "alternate"):
        if n_views < 1:
            raise ValueError("a scheduler needs at least one view")
        if policy not in ("alternate", "fixed", "round-robin"):
            raise ValueError(f"unknown role schedule {policy!r}")
        self.n_views = n_views
        self.policy = policy

    def roles(self, iteration: int) -> tuple[int, int]:
        n = self.n_views
        if n == 1:
            return 0, 0
        if self.policy == "fixed":
            return 0, 1 + iteration % (n - 1)
        d = iteration % n
        return d, (d + 1) % n
