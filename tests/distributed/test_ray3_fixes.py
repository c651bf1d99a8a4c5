"""The third Ray audit: a row whose logits turn NaN fails alone on Ray, as it does locally.

Before, the replica answered the chunk's ``NumericalError`` as the chunk's failure: the other rows of
that chunk were lost and the run ended with a ``ReplicaError``. Now the replica returns the other rows
and the row's own error, and the driver's JSONL batch writes them as the local one does.

The replicas need a backend with NaN logits, which they cannot import (they load backends from the
installed entry points): this module and tests/helpers/nan_backend.py are pickled by value
(cloudpickle), so the :class:`NanReplica` this one defines, and the :class:`NanBackend` that replica
loads, travel to Ray's workers. Uses
``local_ray`` (tests/distributed/conftest.py).
"""

import json

import nan_backend  # tests/helpers
import pytest
from nan_backend import BAD, NanBackend

ray = pytest.importorskip("ray")

import personajudge as pj  # noqa: E402
import personajudge.distributed as dist  # noqa: E402
from personajudge.batch import JsonlBatch, local_executor, read_records  # noqa: E402
from personajudge.core.config import build_config  # noqa: E402
from personajudge.distributed import RayOptions, ReplicaPool  # noqa: E402

CONFIG = {
    "backend": {"name": "toy"},
    "preferences": ["concise", "humor"],
    "decoding": {"max_new_tokens": 8, "seed": 3},
}
TIMING = ("wall_time_s", "tokens_per_s")


class NanReplica(dist.Replica):
    """A replica whose model is the toy with :class:`NanBackend`'s logits."""

    def _load(self, config, threads, warmup):
        self.pj = pj.PersonaJudge(dist.replica_config(config, threads), backend=NanBackend())


@pytest.fixture
def nan_replicas(local_ray, monkeypatch):
    """Pools made in the test start :class:`NanReplica` actors, shipped by value to Ray's workers (with
    the helper module that defines their backend)."""
    import sys

    modules = [sys.modules[__name__], nan_backend]
    for module in modules:
        ray.cloudpickle.register_pickle_by_value(module)
    monkeypatch.setattr(dist, "Replica", NanReplica)
    try:
        yield
    finally:
        for module in modules:
            ray.cloudpickle.unregister_pickle_by_value(module)


def _partial_rows(path):
    """The result rows of a partial file, without their timings."""
    out = []
    for line in open(path):
        row = json.loads(line)
        if "fp" in row:
            out.append({**row, "stats": {k: v for k, v in row["stats"].items() if k not in TIMING}})
    return out


def _run(records, cfg, output, executor_for):
    """``records`` through a JSONL batch (chunks of 3) writing ``output``; returns the error it ends with."""
    job = JsonlBatch(records, cfg, batch_size=3, output=str(output), progress=False)
    with pytest.raises(pj.NumericalError) as info:
        with job:
            job.run(executor_for())
    return info.value


def test_a_nan_row_on_ray_fails_alone_as_locally(tmp_path, nan_replicas):
    """Seven prompts in chunks of 3 on two replicas, the fifth overflowing: the chunk's other two rows
    and every other chunk's are in the partial file, equal to a local run's, and the run ends with the
    local run's error, which names the line (``in.jsonl:5``) and is a ``NumericalError``."""
    inp = tmp_path / "in.jsonl"
    with open(inp, "w") as f:
        for i in range(7):
            f.write(json.dumps({"id": f"r{i}", "prompt": f"{BAD} overflow" if i == 4 else f"prompt {i} about the sea"}))
            f.write("\n")
    records = read_records(inp)
    cfg = build_config(CONFIG)
    with pj.PersonaJudge(cfg, backend=NanBackend()) as local:
        local_err = _run(records, cfg, tmp_path / "local.jsonl", lambda: local_executor(local))
    with ReplicaPool(cfg, RayOptions(replicas=2), quiet=True) as pool:
        ray_err = _run(records, cfg, tmp_path / "ray.jsonl", pool.executor)
    assert str(ray_err) == str(local_err) and str(ray_err).startswith(f"{inp}:5: ")
    local_rows = _partial_rows(tmp_path / "local.jsonl.partial")
    ray_rows = sorted(_partial_rows(tmp_path / "ray.jsonl.partial"), key=lambda r: r["id"])
    assert [r["id"] for r in ray_rows] == ["r0", "r1", "r2", "r3", "r5", "r6"]
    assert ray_rows == local_rows
