import pytest

from personajudge.core.scheduler import RoleScheduler


def test_alternate_swaps_every_iteration():
    s = RoleScheduler(2, "alternate")
    assert [s.roles(i) for i in range(4)] == [(0, 1), (1, 0), (0, 1), (1, 0)]


def test_fixed_keeps_roles():
    s = RoleScheduler(2, "fixed")
    assert {s.roles(i) for i in range(10)} == {(0, 1)}


def test_round_robin_rotates_over_n_views():
    s = RoleScheduler(3, "round-robin")
    roles = [s.roles(i) for i in range(6)]
    assert roles == [(0, 1), (1, 2), (2, 0), (0, 1), (1, 2), (2, 0)]
    assert {d for d, _ in roles} == {j for _, j in roles} == {0, 1, 2}
    assert RoleScheduler(3, "alternate").roles(4) == s.roles(4)


def test_fixed_with_three_views_keeps_the_drafter():
    s = RoleScheduler(3, "fixed")
    assert [s.roles(i) for i in range(4)] == [(0, 1), (0, 2), (0, 1), (0, 2)]


def test_single_view_and_bad_input():
    assert RoleScheduler(1).roles(5) == (0, 0)
    with pytest.raises(ValueError):
        RoleScheduler(0)
    with pytest.raises(ValueError):
        RoleScheduler(2, "random")
