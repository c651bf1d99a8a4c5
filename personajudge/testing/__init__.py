"""The plugin author's kit: run the project's own conformance suite against your backend.

    from personajudge.testing import BackendConformance

    @pytest.fixture(scope="module")
    def backend():
        return MyBackend(BackendConfig(name="mine"))

    class TestMyBackend(BackendConformance):
        pass

The project's toy, llama.cpp and Hugging Face backends are tested by this same
suite (``tests/backends/test_conformance.py``). Needs pytest and scipy (the
``dev`` extra).
"""

import contextlib

# pytest rewrites ``assert`` (so a failure shows the compared values, not a bare AssertionError) only in
# test files and the modules registered here, and only when they are registered before they are imported.
# An installed package is neither, so the kit registers its own modules; without pytest there is nothing to do.
with contextlib.suppress(ImportError):
    import pytest

    pytest.register_assert_rewrite("personajudge.testing.conformance", "personajudge.testing.exactness")

from .conformance import BackendConformance, to_numpy, total_variation  # noqa: E402

__all__ = ["BackendConformance", "to_numpy", "total_variation"]
