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

from .conformance import BackendConformance, to_numpy, total_variation

__all__ = ["BackendConformance", "to_numpy", "total_variation"]
