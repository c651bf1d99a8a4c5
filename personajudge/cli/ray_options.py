"""The ``--ray`` flags shared by ``generate --input`` and ``eval`` (see :mod:`personajudge.distributed`)."""

from __future__ import annotations

import argparse

from personajudge.core.errors import PersonaJudgeError
from personajudge.distributed import RayOptions

LOCAL = "local"


def add_ray_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('scale out (Ray; pip install -e ".[ray]")')
    g.add_argument(
        "--ray",
        nargs="?",
        const=LOCAL,
        default=None,
        metavar="ADDRESS",
        help="run on Ray replicas: no ADDRESS starts a local Ray instance; 'auto', HOST:PORT or "
        "ray://HOST:PORT joins a cluster",
    )
    g.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help="model replicas (Ray actors), each loading the model once (default 1)",
    )
    g.add_argument(
        "--cpus-per-replica",
        type=float,
        default=None,
        dest="cpus_per_replica",
        metavar="C",
        help="CPUs Ray reserves per replica, at most 4 decimals; also its thread count unless --threads (default 1)",
    )
    g.add_argument(
        "--gpus-per-replica",
        type=float,
        default=None,
        dest="gpus_per_replica",
        metavar="G",
        help="GPUs Ray reserves per replica (default 0; fractions of at most 4 decimals share a GPU)",
    )


def replica_flags(args: argparse.Namespace) -> list[str]:
    """The replica flags given (``--replicas``, ``--cpus-per-replica``, ``--gpus-per-replica``): each a
    mistake where nothing runs on Ray, to refuse rather than ignore."""
    given = (
        ("--replicas", args.replicas),
        ("--cpus-per-replica", args.cpus_per_replica),
        ("--gpus-per-replica", args.gpus_per_replica),
    )
    return [f for f, v in given if v is not None]


def ray_options_from_args(args: argparse.Namespace) -> RayOptions | None:
    """None without ``--ray`` (and then the replica flags are a mistake)."""
    extra = replica_flags(args)
    if args.ray is None:
        if extra:
            raise PersonaJudgeError(f"{', '.join(extra)} needs --ray")
        return None
    return RayOptions(
        address=None if args.ray == LOCAL else args.ray,
        replicas=1 if args.replicas is None else args.replicas,
        cpus_per_replica=1.0 if args.cpus_per_replica is None else args.cpus_per_replica,
        gpus_per_replica=0.0 if args.gpus_per_replica is None else args.gpus_per_replica,
    )
