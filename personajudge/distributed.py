"""Batch generation and evaluation on a Ray cluster (``--ray``; ``pip install -e ".[ray]"`` in the clone).

The driver (the ``personajudge`` process) never loads the model. It starts
``replicas`` Ray actors (:class:`Replica`), each of which loads the backend
once, with the resources ``--cpus-per-replica`` / ``--gpus-per-replica`` asked
of Ray's scheduler. Work goes out in chunks through Ray's
:class:`~ray.util.actor_pool.ActorPool` (one chunk in flight per replica); a
replica runs a chunk through ``generate_batch`` and returns the results, which
stream back to the driver in completion order. The driver writes them to the
same resumable files as the local path (:class:`personajudge.batch.JsonlBatch`,
the evaluation harness's JSONL stores), so the file formats, the resume rules
and the final order are the local ones.

Faults, with Ray's own machinery rather than a scheduler of our own:

- A replica whose process dies is restarted by Ray (``max_restarts``; the new
  process loads the model again) and the chunk it was running is retried
  (``max_task_retries``). A replica that is dead for good leaves the pool and
  its chunk is submitted again to the replicas that remain; with none left the
  run stops with one line (finished chunks are on disk; rerun to continue).
  A chunk's rows are written once: the writer skips ids it already has.
- A model that fails to load is reported by the replica (not raised in its
  constructor, which Ray would retry) and becomes one :class:`ReplicaError`.
  Replicas that cannot be placed (too few CPUs/GPUs) are refused up front on
  a local instance, and time out with a message on a cluster.
- A ``HOST:PORT`` address is probed before ``ray.init`` (which has no timeout
  and retries an unreachable address for minutes): nothing listening, or a
  server that does not greet as gRPC within :data:`CONNECT_TIMEOUT_S`, is one
  :class:`ReplicaError`.
- Warnings in a replica are recorded there and issued again by the driver,
  once each, so they follow the driver's settings (one line in the CLI)
  instead of arriving as Ray's prefixed log lines, once per replica.

Nothing here imports ray at module level: ``import personajudge`` stays light.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from personajudge.api import PersonaJudge
from personajudge.core.config import RunConfig, build_config
from personajudge.core.errors import (
    BackendUnavailableError,
    ConfigError,
    ContextLengthError,
    PersonaJudgeError,
    PersonaJudgeWarning,
)
from personajudge.core.files import os_error_text
from personajudge.plugins import get_backend_class

#: Seconds a ``HOST:PORT`` given to ``--ray`` has to accept a connection and to send a gRPC server's
#: first frame, checked before ``ray.init``: that call has no timeout, and on an address where no
#: Ray is listening it retries for minutes (20 tries of about 35 s in Ray 2.60).
CONNECT_TIMEOUT_S = 5.0

#: The HTTP/2 client connection preface and an empty SETTINGS frame (RFC 9113, section 3.4). Ray's
#: GCS and its client server speak gRPC, i.e. HTTP/2: they answer with a SETTINGS frame at once.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_HTTP2_SETTINGS = 0x4


class ReplicaError(PersonaJudgeError):
    """A replica could not load the model, could not be placed, or every replica died."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how many replicas (``--ray [ADDRESS] --replicas N --cpus-per-replica C --gpus-per-replica G``).

    ``address``: None starts a local Ray instance; ``"auto"``, ``"HOST:PORT"`` or ``"ray://HOST:PORT"``
    joins an existing cluster. ``threads``: the backend's thread count in each replica when the config
    does not set one (default: ``cpus_per_replica``, so replicas do not fight over cores).
    """

    address: str | None = None
    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    max_restarts: int = 2
    ready_timeout_s: float = 900.0
    threads: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise ConfigError(f"--replicas must be a positive integer, got {self.replicas!r}")
        if not self.cpus_per_replica > 0:
            raise ConfigError(f"--cpus-per-replica must be positive, got {self.cpus_per_replica!r}")
        if not self.gpus_per_replica >= 0:
            raise ConfigError(f"--gpus-per-replica must be 0 or more, got {self.gpus_per_replica!r}")
        for flag, value in (
            ("--cpus-per-replica", self.cpus_per_replica),
            ("--gpus-per-replica", self.gpus_per_replica),
        ):
            if not _in_resource_units(value):
                raise ConfigError(f"{flag} must have at most 4 decimals (Ray's resource unit is 0.0001), got {value!r}")
        if self.max_restarts < 0:
            raise ConfigError("max_restarts must be 0 or more")
        scheme, sep, _ = (self.address or "").partition("://")
        if sep and scheme != "ray":
            raise ConfigError(
                f"--ray {self.address}: {scheme}:// is not a Ray address (a dashboard or Jobs URL?); give "
                "'auto', HOST:PORT (the head node's GCS port, default 6379) or ray://HOST:PORT (a Ray client "
                "server, default 10001)"
            )

    @property
    def replica_threads(self) -> int:
        return self.threads or max(1, int(self.cpus_per_replica))


#: Ray's smallest amount of a resource (``ray._raylet.RESOURCE_UNIT_SCALING`` is 10000): ``options()``
#: refuses a positive amount below it with a traceback-worthy ValueError, and rounds finer ones.
_RESOURCE_UNIT = 1e-4


def _in_resource_units(value: float) -> bool:
    """``value`` is a whole number of :data:`_RESOURCE_UNIT` (checked with a tolerance for binary floats:
    0.3 is not exactly 3000 units). Infinity and NaN, refused before this, are not."""
    units = value / _RESOURCE_UNIT
    return units == units and abs(units) != float("inf") and abs(units - round(units)) < 1e-6 * max(1.0, abs(units))


@dataclass
class Task:
    """One chunk for one replica: prompts, their seeds and the per-call options of ``generate_batch``.

    ``single``: one prompt through ``generate`` (the evaluation harness's batch size 1).
    ``isolate_context_errors``: a prompt that does not fit the context is that prompt's error (a
    string in place of its result) instead of failing the chunk (the evaluation harness's rule).
    """

    key: Any
    prompts: list[Any]
    seeds: list[int]
    options: dict[str, Any] = field(default_factory=dict)
    single: bool = False
    isolate_context_errors: bool = False
    #: each prompt's origin (a JSONL file's ``path:line``), named by a prompt that does not fit
    where: list[str] | None = None


@dataclass
class Outcome:
    """A finished chunk: per prompt a ``GenerationResult`` or an error string."""

    task: Task
    results: list[Any]
    batched: bool  # False when a context error made the replica run the prompts one by one
    replica_pid: int
    compute_s: float  # inside the replica
    latency_s: float  # from dispatch to the driver having the result


def replica_config(config: dict[str, Any], threads: int | None) -> RunConfig:
    """A replica's config: ``threads`` (its share of the cores) filled in when the config sets none
    and the backend reads ``backend.threads`` (its class's ``config_fields``; None: it reads all).

    Set on a backend that does not read it (the toy), it would only earn each replica a warning that
    a setting the user never gave is ignored."""
    cfg = build_config(config)
    if threads and cfg.backend.threads is None:
        fields = getattr(get_backend_class(cfg.backend.name), "config_fields", None)
        if fields is None or "threads" in fields:
            cfg = build_config(cfg.model_dump(by_alias=True), **{"backend.threads": threads})
    return cfg


@contextlib.contextmanager
def _recording(into: list[tuple[type[Warning], str, str, int]]) -> Iterator[None]:
    """Record every warning raised inside (category, text, file, line) instead of printing it.

    The driver issues them again (:meth:`ReplicaPool._warn`), so its filters and its way of showing
    them apply: printed here, they would reach the terminal as Ray log lines, once per replica."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the driver's filters decide, not the replica's
        try:
            yield
        finally:
            into.extend((w.category, str(w.message), w.filename, w.lineno) for w in caught)


class Replica:
    """A Ray actor that holds one loaded :class:`PersonaJudge` (made remote by :class:`ReplicaPool`)."""

    def __init__(self, config: dict[str, Any], threads: int | None = None, warmup: bool = False):
        self.pj: PersonaJudge | None = None
        self.error: str | None = None
        self.warnings: list[tuple[type[Warning], str, str, int]] = []  # not yet sent to the driver
        with _recording(self.warnings):
            self._load(config, threads, warmup)

    def _load(self, config: dict[str, Any], threads: int | None, warmup: bool) -> None:
        try:
            cfg = replica_config(config, threads)
            self.pj = PersonaJudge(cfg)
            if warmup:  # one untimed call, as the local harness does, so timings do not pay for warm-up
                try:
                    self.pj.generate("Hello.", preferences=[], views=None, method="base", max_new_tokens=2, seed=0)
                except PersonaJudgeError:
                    pass
        except PersonaJudgeError as err:
            self.error = str(err)
        except Exception as err:  # reported by ready(): raising here would make Ray restart the actor
            self.error = f"{type(err).__name__}: {err}"

    def _take_warnings(self) -> list[tuple[type[Warning], str, str, int]]:
        out, self.warnings = self.warnings, []
        return out

    def ready(self) -> dict[str, Any]:
        model = None
        if self.pj is not None:
            try:
                model = self.pj.backend.describe()
            except Exception:  # informative only
                model = None
        return {"error": self.error, "pid": os.getpid(), "model": model, "warnings": self._take_warnings()}

    def run(self, task: Task) -> dict[str, Any]:
        with _recording(self.warnings):
            out = self._run(task)
        return {**out, "warnings": self._take_warnings()}  # with a restarted replica's load warnings

    def _run(self, task: Task) -> dict[str, Any]:
        import ray

        t0 = time.perf_counter()
        me = ray.get_runtime_context().get_actor_id()
        if self.pj is None:
            return {"key": task.key, "actor": me, "raise": f"replica has no model: {self.error}"}
        try:
            results, batched = self._generate(task)
        except PersonaJudgeError as err:  # a user-level error: one line at the driver, like locally
            return {"key": task.key, "actor": me, "raise": str(err)}
        return {
            "key": task.key,
            "actor": me,
            "results": results,
            "batched": batched,
            "pid": os.getpid(),
            "compute_s": time.perf_counter() - t0,
        }

    def _generate(self, task: Task) -> tuple[list[Any], bool]:
        pj = self.pj
        assert pj is not None  # run() answers without calling this when the replica has no model
        if task.single:
            return [self._one(p, s, task) for p, s in zip(task.prompts, task.seeds)], False
        try:
            return pj.generate_batch(task.prompts, seeds=task.seeds, **task.options), True
        except ContextLengthError as err:
            if not task.isolate_context_errors:
                raise err.located(task.where) if task.where is not None else err from None
            return [self._one(p, s, task) for p, s in zip(task.prompts, task.seeds)], False

    def _one(self, prompt: Any, seed: int, task: Task) -> Any:
        assert self.pj is not None  # as in _generate
        try:
            return self.pj.generate(prompt, seed=seed, **task.options)
        except ContextLengthError as err:
            if not task.isolate_context_errors:
                raise
            return str(err)

    def close(self) -> None:
        if self.pj is not None:
            self.pj.close()
            self.pj = None


def _import_ray():
    try:
        import ray
    except ImportError:
        raise BackendUnavailableError('--ray needs Ray: pip install -e ".[ray]" in your persona-judge clone') from None
    return ray


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``HOST:PORT`` or ``ray://HOST:PORT``; None for ``auto`` and for what Ray
    itself refuses at once (no port, a port that is not a number)."""
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.removeprefix("[").removesuffix("]"), int(port)


def check_address(address: str, timeout: float | None = None) -> None:
    """Refuse a ``HOST:PORT`` where no Ray is listening, in ``timeout`` seconds, before ``ray.init``.

    Nothing listening (or an unknown host) fails on connecting; a server that is not gRPC (a web
    server, a database) fails on its first frame, which a gRPC server sends at once. A gRPC server
    that is not Ray still passes; Ray then says what it found. With ``RAY_USE_TLS`` only the
    connection is checked: the greeting would be inside TLS. ``timeout``: :data:`CONNECT_TIMEOUT_S`."""
    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
    hp = _host_port(address)
    if hp is None:
        return
    if not 0 < hp[1] < 65536:
        raise ReplicaError(f"cannot reach the Ray cluster at {address}: the port must be 1 to 65535")
    try:
        with socket.create_connection(hp, timeout=timeout) as conn:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return
            conn.sendall(_HTTP2_PREFACE)
            head = b""
            while len(head) < 9:
                more = conn.recv(9 - len(head))
                if not more:
                    break
                head += more
    except TimeoutError:
        raise ReplicaError(
            f"cannot reach the Ray cluster at {address}: no answer within {timeout:g}s (is Ray running there?)"
        ) from None
    except OSError as err:
        raise ReplicaError(f"cannot reach the Ray cluster at {address}: {os_error_text(err)}") from None
    if len(head) < 9 or head[3] != _HTTP2_SETTINGS:
        raise ReplicaError(
            f"cannot reach the Ray cluster at {address}: the server there does not speak gRPC (not a Ray "
            "head node's GCS port, default 6379, nor a Ray client server's, default 10001)"
        )


def _init_args(address: str | None) -> dict[str, Any]:
    """``ray.init``'s arguments. A local instance is this machine's only: its node address is
    127.0.0.1 (the driver's, the raylet's and the workers' endpoints follow it; Ray 2.60 still
    binds the GCS, the raylet and the driver's core worker on all interfaces, with token
    authentication on), and no dashboard. ``log_to_driver=False``: replicas print nothing the
    user needs (their warnings come back with their results), so Ray's per-process log lines stay
    in Ray's log files."""
    args: dict[str, Any] = {
        "address": "local" if address is None else address,
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": False,
        "configure_logging": True,
    }
    if address is None:
        args["_node_ip_address"] = "127.0.0.1"
    return args


def _init_error(address: str | None, err: BaseException) -> str:
    """One line for a failed ``ray.init``: "start" a local instance, "join" a cluster, in our words
    where Ray's name a flag of its own (``--address``) that personajudge does not have."""
    if address is None:
        return f"cannot start a local Ray instance: {_first_line(err)}"
    text = _first_line(err)
    if address == "auto" and "Could not find any running Ray instance" in text:
        text = (
            "no running Ray instance found on this machine (start one with `ray start --head`, or give --ray ADDRESS)"
        )
    return f"cannot join the Ray cluster at {address}: {text}"


#: Ray's start-up notice that token authentication is on (its default for a new local instance):
#: a WARNING on every run, -q included, about a setting the user did not choose and cannot act on.
_TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


@contextlib.contextmanager
def _quiet_ray_start() -> Iterator[None]:
    """``ray.init`` without Ray's token-authentication notice (its errors still show)."""
    log = logging.getLogger(_TOKEN_NOTICE_LOGGER)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def _interrupt_after() -> Iterator[None]:
    """Hold a Ctrl-C back until the block (``ray.init``) is over, then deliver it.

    A KeyboardInterrupt inside ``ray.init``, while Ray builds this process's core worker, leaves a
    half-built one that crashes the interpreter at exit (exit 139 or 134, not 130): ray.shutdown()
    does not tidy it. A second Ctrl-C is delivered at once (a ``ray.init`` that hangs can still be
    stopped). Only where Python's own SIGINT handler is installed, on the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # SIG_IGN, SIG_DFL or set outside Python: leave it alone
        yield
        return
    held: list[Any] = []

    def hold(signum: int, frame: Any) -> None:
        if held:
            previous(signum, frame)
        held.append((signum, frame))

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        previous(*held[0])


@contextlib.contextmanager
def _loopback_node(local: bool) -> Iterator[None]:
    """A local instance's node address is 127.0.0.1 (``ray.init`` alone turns a ``_node_ip_address``
    of 127.0.0.1 into the machine's routable address in Ray 2.60). Ray keeps to the loopback
    address where it treats the platform as single-machine (``ENABLE_RAY_CLUSTER`` false, its
    macOS/Windows default): set so while the instance starts; its processes are handed the
    address on their command lines. Nothing changes when joining a cluster."""
    if not local:
        yield
        return
    try:
        from ray._private import ray_constants
    except ImportError:  # another Ray layout: its own default address
        yield
        return
    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):  # a Ray without the switch: its own default
        yield
        return
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


class ReplicaPool:
    """``replicas`` Ray actors with one loaded model each; :meth:`run` maps chunks over them.

    A context manager: entering connects to (or starts) Ray and waits until every replica has loaded
    the model; leaving kills the replicas and shuts down a Ray instance it started.

    The pool prints nothing: its notes (waiting for the cluster to grow, a replica that died) are
    :class:`PersonaJudgeWarning` warnings, shown whatever ``quiet`` says (the CLI's ``-q`` keeps
    warnings). ``quiet`` is kept for the callers, which print :meth:`overhead_line` only without it.
    """

    def __init__(self, config: RunConfig, options: RayOptions, *, warmup: bool = False, quiet: bool = False):
        self.config = config
        self.options = options
        self.warmup = warmup
        self.quiet = quiet
        self.actors: list[Any] = []
        self.infos: list[dict[str, Any]] = []
        self.overheads: list[float] = []  # per chunk: latency minus compute time in the replica
        self.retried = 0
        self._started_ray = False
        self._warned: set[tuple[type[Warning], str]] = set()
        self._running: dict[Any, Any] = {}  # task key -> the ObjectRef of its chunk, while out

    def _warn(self, recorded: Iterable[tuple[type[Warning], str, str, int]]) -> None:
        """Issue the warnings a replica recorded, in this process, once per pool: the replicas' copies
        of one warning are one warning, as with the one model a local run loads."""
        for category, text, filename, lineno in recorded:
            if not (isinstance(category, type) and issubclass(category, Warning)):
                category = UserWarning
            if (category, text) in self._warned:
                continue
            self._warned.add((category, text))
            warnings.warn_explicit(text, category, filename, lineno)

    # -- start -----------------------------------------------------------------------------------
    def __enter__(self) -> ReplicaPool:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        ray = _import_ray()
        o = self.options
        if not ray.is_initialized():
            if o.address is not None:
                check_address(o.address)
            # Set before ray.init: whatever stops it half-way, close() shuts down what it started.
            self._started_ray = True
            try:
                with _interrupt_after(), _quiet_ray_start(), _loopback_node(o.address is None):
                    ray.init(**_init_args(o.address))
            except Exception as err:  # ConnectionError, a missing ray[client], a bad address: one line
                raise ReplicaError(_init_error(o.address, err)) from None
        self._check_resources(ray)
        try:
            remote = ray.remote(Replica).options(
                num_cpus=o.cpus_per_replica,
                num_gpus=o.gpus_per_replica,
                max_restarts=o.max_restarts,
                max_task_retries=o.max_restarts,
                max_concurrency=1,
            )
        except ValueError as err:  # Ray's own checks of the amounts (RayOptions checks what it knows of)
            raise ConfigError(
                f"--cpus-per-replica {o.cpus_per_replica:g} / --gpus-per-replica {o.gpus_per_replica:g}: "
                f"{_first_line(err)}"
            ) from None
        cfg = self.config.model_dump(mode="json", by_alias=True)
        self.actors = [remote.remote(cfg, o.replica_threads, self.warmup) for _ in range(o.replicas)]
        self._wait_ready(ray)

    def _check_resources(self, ray) -> None:
        o = self.options
        have = ray.cluster_resources()
        need = {"CPU": o.replicas * o.cpus_per_replica, "GPU": o.replicas * o.gpus_per_replica}
        short = [
            f"{need[k]:g} {k}s (the cluster has {have.get(k, 0):g})"
            for k in need
            if need[k] > 0 and need[k] > have.get(k, 0) + 1e-9
        ]
        if not short:
            return
        msg = (
            f"--replicas {o.replicas} x --cpus-per-replica {o.cpus_per_replica:g} / --gpus-per-replica "
            f"{o.gpus_per_replica:g} needs " + " and ".join(short)
        )
        if o.address is None:
            raise ReplicaError(msg + "; ask for fewer replicas or fewer resources per replica")
        # a warning whatever ``quiet`` says: without it, a run could wait for minutes without a word
        warnings.warn(
            f"{msg}; waiting up to {o.ready_timeout_s:g}s for the cluster to grow", PersonaJudgeWarning, stacklevel=2
        )

    def _wait_ready(self, ray) -> None:
        from ray.exceptions import GetTimeoutError, RayActorError

        refs = [a.ready.remote() for a in self.actors]
        try:
            infos = ray.get(refs, timeout=self.options.ready_timeout_s)
        except GetTimeoutError:
            raise ReplicaError(
                f"the replicas were not ready after {self.options.ready_timeout_s:g}s (the cluster "
                "could not place them or loading is stuck)"
            ) from None
        except RayActorError as err:
            raise ReplicaError(f"a replica died while loading the model: {_first_line(err)}") from None
        for info in infos:
            self._warn(info.get("warnings", ()))
        for i, info in enumerate(infos):
            if info["error"]:
                raise ReplicaError(f"replica {i + 1} of {len(infos)} could not load the model: {info['error']}")
        self.infos = infos

    def close(self) -> None:
        if not self.actors and not self._started_ray:
            return
        try:
            import ray
        except ImportError:
            return
        # Chunks still out when the run stops early (a chunk's error, Ctrl-C) are cancelled first:
        # a cancelled task is not retried, so killing its replica does not make Ray announce, once
        # per chunk, a retry that will never happen.
        for ref in self._running.values():
            try:
                ray.cancel(ref)
            except Exception:  # already finished
                pass
        self._running = {}
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # already dead
                pass
        self.actors = []
        if self._started_ray:
            self._started_ray = False
            ray.shutdown()  # also after a ray.init that was interrupted half-way (safe when nothing started)

    @property
    def model(self) -> dict[str, Any] | None:
        return self.infos[0]["model"] if self.infos else None

    # -- work ------------------------------------------------------------------------------------
    def run(self, tasks: Iterable[Task]) -> Iterator[Outcome]:
        """Run ``tasks`` on the replicas; yield each finished chunk as soon as it is back (any order).

        A chunk that fails with a user-level error (a prompt too long for the context) stops the
        run as locally, but not at once: nothing new is submitted, the chunks still out are drained
        and those that succeed are yielded, then the error is raised. So the chunks before the bad
        one are kept, as locally, whichever replica finished first. With several failures the
        error of the earliest task (in the order given) is the one raised, as locally."""
        from ray.exceptions import ActorDiedError, RayActorError
        from ray.util.actor_pool import ActorPool

        pool = ActorPool(list(self.actors))
        inflight: dict[Any, tuple[Task, float, str]] = {}  # task key -> (task, dispatch time, actor id)
        attempts: dict[Any, int] = {}
        order: dict[Any, int] = {}  # task key -> its place in ``tasks``
        queue: deque[Task] = deque()  # not yet submitted; a retried chunk goes first
        failed: tuple[int, str] | None = None  # (place, error) of the earliest chunk that raised
        alive = len(self.actors)

        def submit(actor, task: Task):
            inflight[task.key] = (task, time.perf_counter(), actor._actor_id.hex())
            self._running[task.key] = ref = actor.run.remote(task)
            return ref

        def fill() -> None:
            # Only onto an idle replica, so the pool never queues a chunk of its own (it would
            # submit it by itself when a result comes back, even after a failure).
            while queue and pool.has_free() and (failed is None or attempts[queue[0].key]):
                pool.submit(submit, queue.popleft())

        for t in tasks:
            if t.key in order:
                raise ValueError(f"duplicate task key {t.key!r}")
            attempts[t.key] = 0
            order[t.key] = len(order)
            queue.append(t)
        fill()
        while pool.has_next():
            try:
                out = pool.get_next_unordered()
            except RayActorError as err:
                # The replica is gone after Ray's own restarts and retries: its chunk goes to another one.
                # (The oldest chunk dispatched to that actor is the one that failed: the pool may already
                # have handed the actor a newer one.)
                dead = getattr(err, "actor_id", None)
                key = next((k for k, (_, _, a) in inflight.items() if a == dead), None)
                if isinstance(err, ActorDiedError):
                    alive -= 1
                if key is None:
                    raise ReplicaError(
                        f"a replica failed: {_first_line(err)}; finished results are saved: "
                        "rerun the same command to continue"
                    ) from None
                task = inflight.pop(key)[0]
                self._running.pop(key, None)
                attempts[key] += 1
                if alive <= 0 or attempts[key] > len(self.actors):
                    raise ReplicaError(
                        f"every replica died (last: {_first_line(err)}); finished results are "
                        "saved: rerun the same command to continue"
                    ) from None
                warnings.warn(  # whatever ``quiet`` says: it is a warning
                    f"a replica died; its chunk is retried on another one ({alive} left)",
                    PersonaJudgeWarning,
                    stacklevel=2,
                )
                self.retried += 1
                queue.appendleft(task)
                fill()
                continue
            self._warn(out.get("warnings", ()))
            task, t_sent, _ = inflight.pop(out["key"])
            self._running.pop(out["key"], None)
            if "raise" in out:
                if failed is None or order[task.key] < failed[0]:
                    failed = (order[task.key], out["raise"])
                fill()  # a retried chunk still goes out; nothing new does
                continue
            fill()
            latency = time.perf_counter() - t_sent
            self.overheads.append(max(0.0, latency - out["compute_s"]))
            yield Outcome(task, out["results"], out["batched"], out["pid"], out["compute_s"], latency)
        if failed is not None:
            raise ReplicaError(failed[1])

    def overhead_line(self) -> str:
        n = len(self.overheads)
        if not n:
            return ""
        mean = sum(self.overheads) / n
        return (
            f"personajudge: ray: {len(self.infos)} replica(s), {n} chunk(s), overhead {mean * 1000:.0f} ms "
            f"per chunk (dispatch to result, minus generation){f', {self.retried} retried' if self.retried else ''}"
        )

    # -- the JSONL batch path --------------------------------------------------------------------
    def executor(self, preferences: Sequence[Any] | None = None):
        """An executor for :meth:`personajudge.batch.JsonlBatch.run`: chunks become tasks, results dicts."""

        def run(chunks):
            by_key = {c.index: c for c in chunks}
            tasks = [Task(c.index, c.prompts, c.seeds, {"preferences": preferences}, where=c.where) for c in chunks]
            for out in self.run(tasks):
                yield by_key[out.task.key], [r.as_dict() for r in out.results]

        return run


__all__ = [
    "CONNECT_TIMEOUT_S",
    "RayOptions",
    "ReplicaPool",
    "Replica",
    "ReplicaError",
    "Task",
    "Outcome",
    "check_address",
    "replica_config",
]
