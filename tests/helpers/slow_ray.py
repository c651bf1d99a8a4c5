"""The CLI with each chunk slowed down in the Ray *replicas*, for tests that stop a driver while chunks are out.

The actor class is patched before Ray pickles it, so the replicas run the slow version; run it with
``python -c slow_ray_main(seconds) ARGV...``.
"""


def slow_ray_main(seconds: float = 0.3) -> str:
    """Python source: ``personajudge.cli.main(sys.argv[1:])`` with ``Replica.run`` sleeping ``seconds`` first."""
    return f"""
import sys, time
import personajudge.distributed as d
real = d.Replica.run
def slow(self, task):
    time.sleep({seconds!r})
    return real(self, task)
d.Replica.run = slow
from personajudge.cli import main
sys.exit(main(sys.argv[1:]))
"""
