"""The fifth Ray audit: a row that fails with an error of its own loses no finished row on Ray either.

Locally (tests/reliability/test_api5_fixes.py) such a row (a backend that cannot run its forward, a
plugin method's bug on it) stops the JSONL batch, but only after its chunk's finished rows are
written, so a rerun decodes only that row. On Ray the replica answered the chunk's error alone: the
chunk's finished rows were lost and a rerun decoded the whole chunk again. Now they come back with
the error, the driver writes them, then the run stops with the error it raised before.

The replicas need a backend that raises for one row, which they cannot import: this module and
tests/helpers/poison_backend.py are pickled by value, as in test_ray3_fixes.py. Uses ``local_ray``
(tests/distributed/conftest.py).
"""

import json

import poison_backend  # tests/helpers
import pytest
from poison_backend import PoisonToy

ray = pytest.importorskip("ray")

import personajudge as pj  # noqa: E402
import personajudge.distributed as dist  # noqa: E402
from personajudge.batch import JsonlBatch, local_executor, read_records  # noqa: E402
from personajudge.core.config import build_config  # noqa: E402
from personajudge.core.errors import PluginError  # noqa: E402
from personajudge.distributed import RayOptions, ReplicaError, ReplicaPool  # noqa: E402

CONFIG = {
    "backend": {"name": "toy"},
    "encoder": "plain",
    "preferences": ["concise", "humor"],
    "decoding": {"max_new_tokens": 16, "lambda": 3},
}
POISON = 4  # the row whose forward raises: in the second of two chunks of 3


class PoisonReplica(dist.Replica):
    """A replica whose model is the toy with :class:`PoisonToy`'s forward, raising ``raises``
    (``error`` is taken: a replica's load error)."""

    raises: type[Exception] = poison_backend.PoisonError

    def _load(self, config, threads, warmup):
        self.pj = pj.PersonaJudge(dist.replica_config(config, threads), backend=PoisonToy(error=self.raises))


@pytest.fixture
def poison_replicas(local_ray):
    """Ships this module and the backend's to Ray's workers by value while the test runs."""
    import sys

    modules = [sys.modules[__name__], poison_backend]
    for module in modules:
        ray.cloudpickle.register_pickle_by_value(module)
    try:
        yield
    finally:
        for module in modules:
            ray.cloudpickle.unregister_pickle_by_value(module)


def _rows(path, partial=False):
    """Each row's id, prompt, text and tokens (not its timings); a partial file's without its settings line."""
    lines = [json.loads(x) for x in open(path)]
    return [{k: r[k] for k in ("id", "prompt", "text", "tokens")} for r in lines if not partial or "fp" in r]


def _run(records, cfg, output, executor_for):
    """``records`` through a JSONL batch in chunks of 3; returns how many rows this run wrote."""
    with JsonlBatch(records, cfg, batch_size=3, output=str(output), progress=False) as job:
        return job.run(executor_for())


@pytest.mark.parametrize(
    "error, message",
    [
        (
            poison_backend.PoisonError,
            r"^replica [12] of 2 failed: PoisonError: cannot run slot \d+ \(at poison_backend",
        ),
        (PluginError, r"^cannot run slot \d+$"),
    ],
    ids=["third-party-error", "user-level-error"],
)
def test_a_row_that_fails_on_ray_keeps_its_chunks_finished_rows(tmp_path, poison_replicas, monkeypatch, error, message):
    """Six prompts in two chunks of 3 on two replicas (both chunks out at once), the fifth's forward
    raising mid-decoding: the run ends with the error it ended with before (a crash: ``ReplicaError``
    naming the replica; a user-level error: its message), and the partial file holds every other
    row, the failed chunk's two included, as a local run writes them. A rerun with the backend fixed
    decodes only that row, and the output is a clean local run's."""
    inp = tmp_path / "in.jsonl"
    with open(inp, "w") as f:
        for i in range(6):
            prompt = "poison apple" if i == POISON else f"prompt {i} about the sea"
            f.write(json.dumps({"id": f"r{i}", "prompt": prompt, "seed": i}) + "\n")
    records = read_records(inp)
    cfg = build_config(CONFIG)
    with pj.PersonaJudge(cfg) as local:
        _run(records, cfg, tmp_path / "clean.jsonl", lambda: local_executor(local))
    clean = _rows(tmp_path / "clean.jsonl")

    monkeypatch.setattr(PoisonReplica, "raises", error)
    monkeypatch.setattr(dist, "Replica", PoisonReplica)
    out = tmp_path / "ray.jsonl"
    with ReplicaPool(cfg, RayOptions(replicas=2), quiet=True) as pool:
        with pytest.raises(ReplicaError, match=message):
            _run(records, cfg, out, pool.executor)
    kept = sorted(_rows(f"{out}.partial", partial=True), key=lambda r: r["id"])
    assert kept == [r for r in clean if r["id"] != f"r{POISON}"] and not out.exists()

    monkeypatch.undo()  # the fixed backend: the toy Ray's replicas load themselves
    with ReplicaPool(cfg, RayOptions(replicas=1), quiet=True) as pool:
        assert _run(records, cfg, out, pool.executor) == 1
    assert _rows(out) == clean
