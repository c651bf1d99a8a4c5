"""The project's own backends pass the same conformance suite a plugin author runs."""

import pytest

from personajudge.backends.toy import ToyBackend
from personajudge.core.config import BackendConfig
from personajudge.testing import BackendConformance


class TestToyConformance(BackendConformance):
    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls):
        return ToyBackend(BackendConfig(name="toy", n_ctx=256))


@pytest.mark.model
class TestLlamaCppConformance(BackendConformance):
    # llama.cpp's CPU kernels change logits with the batch shape and the split of a context into
    # calls (measured on the embedded model, threads 1: up to 0.56 in a logit, 0.03 in total variation,
    # for two calls; 0.098 in total variation and 1.7 in a logit for a row of a three-call forward_many
    # or of a five-row window, while rows of different positions or contexts differ by 0.76 or more)
    logits_atol = 1.0
    batch_tv = 0.15
    check_exactness = False  # the statistical check runs on the toy backend's exact oracle

    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls):
        pytest.importorskip("llama_cpp")
        from personajudge.backends.llama_cpp import LlamaCppBackend

        b = LlamaCppBackend(BackendConfig(name="llama-cpp", threads=1, n_ctx=256))
        yield b
        b.close()


@pytest.mark.hf
class TestHFConformance(BackendConformance):
    logits_atol = 1e-3
    batch_tv = 1e-4
    check_exactness = False
    arch = "llama"
    options: dict = {}

    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls, tmp_path_factory):
        pytest.importorskip("torch")
        pytest.importorskip("transformers")
        from tiny_hf import build_tiny_backend

        b = build_tiny_backend(tmp_path_factory.mktemp("tiny"), cls.arch, options=cls.options)
        yield b
        assert b.compile_fallback is None  # with compile: every compiled step ran as one traced graph
        b.close()


class TestHFCompiledConformance(TestHFConformance):
    """The static cache with steps traced by torch.compile (dynamo's ``eager`` backend: the graph as traced)."""

    arch = "gemma3"
    options = {"compile": True, "compile_backend": "eager", "max_cache_len": 256}
