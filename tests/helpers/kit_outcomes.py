"""Run every test of the plugin author's conformance kit on one backend, outside pytest's collection, and keep
each outcome: the tests that check the kit catches a broken backend, and says why, read these."""

from __future__ import annotations

import pytest

from personajudge.testing import BackendConformance


class Kit(BackendConformance):
    """The kit as a noisy backend's author sets it up (``check_exactness = False``): the checks that must
    catch a broken backend without the statistical exactness test."""

    check_exactness = False


def run_kit(backend) -> dict[str, str | None]:
    """Every test of the kit on ``backend``: test name -> None (passed), "skipped", or the failure message.
    A contract error the backend's own bug raises (an id past ``vocab_size``) counts as a failure too, with
    its type."""
    outcomes: dict[str, str | None] = {}
    for name in sorted(n for n in dir(Kit) if n.startswith("test_")):
        try:
            getattr(Kit(), name)(backend)
            outcomes[name] = None
        except pytest.skip.Exception:
            outcomes[name] = "skipped"
        except AssertionError as e:
            outcomes[name] = str(e)
        except Exception as e:
            outcomes[name] = f"{type(e).__name__}: {e}"
    return outcomes


def failures(backend) -> dict[str, str]:
    """The kit's failures on ``backend``: test name -> message."""
    return {n: m for n, m in run_kit(backend).items() if m not in (None, "skipped")}
