"""The batched judge lowers through inductor's GPU-only lowerings, checked on the CPU.

On CUDA, inductor lowers ``sort``, ``cumsum`` and ``searchsorted`` to Triton's own kernels. The
CPU's C++ backend has none of them and takes torch's kernels instead, so a CPU compile never
runs those lowerings. That is how torch 2.11's failure reached the GPU unseen: its
``searchsorted`` lowering names the searched tensor, and ``_lookup`` searched a reshaped sum,
a view with no name (``InductorError: NotImplementedError: View``; found on an H200, where the
judge then ran eager). Here inductor is told the CPU has those features, and the compile is
stopped where code generation would begin: every lowering ran, none of the C++ code is needed.

The torch this project pins (2.13) lowers a view there too, so on it this test passes with the
old code as well. It guards the fix where the README's torch 2.11 rehearsal runs it (the GPU
image's torch), and any lowering a later torch breaks.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
inductor_graph = pytest.importorskip("torch._inductor.graph")
scheduler = pytest.importorskip("torch._inductor.scheduler")
common = pytest.importorskip("torch._inductor.codegen.common")

from personajudge.core.batched import judge_rows  # noqa: E402
from personajudge.core.transforms import SamplingParams  # noqa: E402

pytestmark = pytest.mark.hf

GPU_ONLY = {
    getattr(common.BackendFeature, name)
    for name in ("BUCKETIZE", "SORT", "SCAN", "TUPLE_REDUCTION")
    if hasattr(common.BackendFeature, name)
}


class Lowered(Exception):
    """Raised where code generation begins: lowering is done."""


@pytest.fixture
def gpu_lowerings(monkeypatch):
    if not GPU_ONLY or not hasattr(inductor_graph.GraphLowering, "has_feature"):
        pytest.skip("this torch's inductor names its backend features differently")
    has_feature = inductor_graph.GraphLowering.has_feature

    def gpu_features(self, device, feature):
        return True if feature in GPU_ONLY else has_feature(self, device, feature)

    def stop(self, *args, **kwargs):
        raise Lowered("lowered")

    monkeypatch.setattr(inductor_graph.GraphLowering, "has_feature", gpu_features)
    monkeypatch.setattr(scheduler.Scheduler, "codegen", stop)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_the_batched_judge_lowers_with_the_gpu_lowerings(gpu_lowerings, dynamic):
    """Top-k and top-p: the sort, the cumulative sum and both searches of a step all lower."""
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9)
    fn = torch.compile(
        lambda p, q, a, b, c: judge_rows(p, q, params, a, b, c), backend="inductor", fullgraph=True, dynamic=dynamic
    )
    g = torch.Generator().manual_seed(0)
    r, v = 4, 1000
    logits = [torch.randn(r, v, generator=g) for _ in range(2)]
    uniforms = [torch.rand(r, generator=g, dtype=torch.float64) for _ in range(3)]
    with pytest.raises(Exception) as caught:
        fn(*logits, *uniforms)
    # the only way out is the stop at code generation; a lowering that fails raises its own error first
    assert "Lowered" in f"{type(caught.value).__name__}: {caught.value}", str(caught.value)[:500]
