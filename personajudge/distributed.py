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
- The config is checked by the driver before Ray starts, as a local run checks
  it before the model loads (:func:`check_for_replicas`); a plugin registered
  at run time, which the replicas cannot have, is refused there too.
- An unexpected exception in a replica (a bug) is answered like a user error:
  the chunks still out finish and are kept, then one line names the replica.
- A row whose logits turn NaN or infinite fails alone in the JSONL batch, as
  locally: the replica returns its chunk's other rows and that row's
  ``NumericalError``, and the driver's :class:`~personajudge.batch.JsonlBatch`
  writes the others and names the row's ``file:line`` at the end.
- A row that fails with any other error of its own (a backend that cannot run
  its forward, a plugin method's bug on it) stops the JSONL batch, as locally,
  but its chunk's finished rows come back with the error and are written
  first, so a rerun decodes only the rows that did not finish.
- Ray's own notices, which it prints to ``sys.stdout`` from a thread of its
  own, go to standard error while a pool is open (:class:`_OwnStdout`):
  standard output may be carrying JSONL results.

Nothing here imports ray at module level: ``import personajudge`` stays light.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from personajudge.api import PersonaJudge, _check_config, executor_results, rows_failed_alone
from personajudge.core.config import MAX_THREADS, Options, RunConfig, build_config, take_options
from personajudge.core.errors import (
    BackendUnavailableError,
    ConfigError,
    ContextLengthError,
    NumericalError,
    PersonaJudgeError,
    PersonaJudgeWarning,
    located,
)
from personajudge.core.files import discard_fresh_files, os_error_text
from personajudge.core.processes import terminate_as_exit
from personajudge.plugins import get_backend_class, registry
from personajudge.preferences import Preference

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
    does not set one (default: ``cpus_per_replica``, so replicas do not fight over cores; at most 512).
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
            if not value <= MAX_RESOURCE:  # inf, or so large its resource units overflow (not "decimals")
                raise ConfigError(f"{flag} must be at most {MAX_RESOURCE} (more than any node has), got {value!r}")
            if not _in_resource_units(value):
                raise ConfigError(f"{flag} must have at most 4 decimals (Ray's resource unit is 0.0001), got {value!r}")
        if self.max_restarts < 0:
            raise ConfigError("max_restarts must be 0 or more")
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or not 1 <= self.threads <= MAX_THREADS
        ):
            raise ConfigError(f"threads must be between 1 and {MAX_THREADS}, got {self.threads!r}")
        scheme, sep, _ = (self.address or "").partition("://")
        if sep and scheme != "ray":
            raise ConfigError(
                f"--ray {self.address}: {scheme}:// is not a Ray address (a dashboard or Jobs URL?); give "
                "'auto', HOST:PORT (the head node's GCS port, default 6379) or ray://HOST:PORT (a Ray client "
                "server, default 10001)"
            )

    @property
    def replica_threads(self) -> int:
        """A replica's thread count: ``threads``, else its CPUs, at most :data:`MAX_THREADS` (a replica
        reserving 600 CPUs runs 512 threads rather than failing its config in every replica)."""
        return self.threads or min(MAX_THREADS, max(1, int(self.cpus_per_replica)))


#: Ray's smallest amount of a resource (``ray._raylet.RESOURCE_UNIT_SCALING`` is 10000): ``options()``
#: refuses a positive amount below it with a traceback-worthy ValueError, and rounds finer ones.
_RESOURCE_UNIT = 1e-4
#: the most CPUs or GPUs a replica may ask for (no node has as many)
MAX_RESOURCE = 1_000_000


def _in_resource_units(value: float) -> bool:
    """``value`` is a whole number of :data:`_RESOURCE_UNIT` (checked with a tolerance for binary floats:
    0.3 is not exactly 3000 units). NaN, infinity and values past :data:`MAX_RESOURCE` are refused before."""
    units = value / _RESOURCE_UNIT
    return units == units and abs(units) != float("inf") and abs(units - round(units)) < 1e-6 * max(1.0, abs(units))


@dataclass
class Task:
    """One chunk for one replica: prompts, their seeds and the per-call options of ``generate_batch``.

    ``single``: one prompt through ``generate`` (the evaluation harness's batch size 1).
    ``isolate_context_errors``: a prompt that does not fit the context is that prompt's error (a
    string in place of its result) instead of failing the chunk (the evaluation harness's rule).
    ``isolate_row_errors``: no finished row of the chunk is lost to another row's own failure (the
    JSONL batch's rule, :func:`personajudge.api.rows_failed_alone`; the evaluation harness, which
    fails the run there locally, leaves it off). A row whose logits turn NaN or infinite fails
    alone, its ``NumericalError`` in place of its result, and the chunk's other rows are delivered;
    any other error of one row still fails the chunk, but the finished rows go back with it.
    """

    key: Any
    prompts: list[Any]
    seeds: list[int]
    options: dict[str, Any] = field(default_factory=dict)
    single: bool = False
    isolate_context_errors: bool = False
    isolate_row_errors: bool = False
    #: each prompt's origin (a JSONL file's ``path:line``), named by a prompt that does not fit
    where: list[str] | None = None


@dataclass
class Outcome:
    """A finished chunk: per prompt a ``GenerationResult``, an error string (a prompt too long, where
    context errors are isolated) or an exception (a row that failed alone, where row errors are)."""

    task: Task
    results: list[Any]
    batched: bool  # False when a context error made the replica run the prompts one by one
    replica_pid: int
    compute_s: float  # inside the replica
    latency_s: float  # from dispatch to the driver having the result


def replica_config(config: RunConfig | dict[str, Any], threads: int | None) -> RunConfig:
    """A replica's config: ``threads`` (its share of the cores) filled in when the config sets none
    and the backend reads ``backend.threads`` (its class's ``config_fields``; None: it reads all).

    Set on a backend that does not read it (the toy), it would only earn each replica a warning that
    a setting the user never gave is ignored. A :class:`RunConfig` keeps its class and its fields
    that a dump leaves out (the CLI's ``definitions``: the preferences a ``--preferences-file``
    defines, which its views name), so it is copied, not rebuilt from a dump."""
    cfg = config if isinstance(config, RunConfig) else build_config(config)
    if threads and cfg.backend.threads is None:
        fields = getattr(get_backend_class(cfg.backend.name), "config_fields", None)
        if fields is None or "threads" in fields:
            backend = type(cfg.backend).model_validate({**cfg.backend.model_dump(by_alias=True), "threads": threads})
            cfg = cfg.model_copy(update={"backend": backend})
    return cfg


#: The entry-point group through which installed plugins reach every process (Ray's replicas too).
_ENTRY_POINT_GROUP = "personajudge"


def _registered_at_run_time(kind: str, name: Any) -> bool:
    """``name`` is a ``kind`` plugin registered in this process with ``register_plugin`` (not built in,
    not an installed entry point): a replica, another process, does not have it."""
    reg = registry(kind)
    return isinstance(name, str) and name in reg and not reg.source(name).distribution


def _preference_names(value: Any) -> Iterator[str]:
    """The names among preferences (a list), or views (a list of lists), as a config or a call gives them."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _preference_names(v)


def check_for_replicas(config: RunConfig, preferences: Sequence[Any] | None = None, views: Any = None) -> None:
    """What a local run checks before its model loads, done by the driver before Ray starts: the method,
    its options, the encoder, the preferences and views (:func:`personajudge.api._check_config`), the
    backend's name and, where its class declares them as ``Options`` (as encoders do), its options.
    The same one-line errors as a local run, in milliseconds, instead of after Ray has placed and
    loaded every replica.

    Then what a replica cannot have: a backend, method, encoder or preference registered at run time
    with ``register_plugin`` lives in this process only (a replica builds its registries from
    the installed entry points), so it is refused here with the reason instead of failing in every
    replica. ``preferences`` / ``views``: a call's own, beside the config's."""
    _check_config(config)
    cls = get_backend_class(config.backend.name)
    spec = getattr(cls, "Options", None)
    if isinstance(spec, type) and issubclass(spec, Options):
        take_options(config.backend, spec, owner=config.backend.name)
    _refuse_run_time_plugins(config, preferences, views)


def _refuse_run_time_plugins(
    config: RunConfig, preferences: Any = None, views: Any = None, method: str | None = None
) -> None:
    """:func:`check_for_replicas`'s second half, also for each task's own ``preferences`` / ``views`` /
    ``method`` (registry look-ups only: cheap enough for every chunk)."""
    defined = {p.name for p in getattr(config, "definitions", None) or () if isinstance(p, Preference)}
    if isinstance(preferences, list | tuple):
        defined |= {p.name for p in preferences if isinstance(p, Preference)}
    used = [("backend", config.backend.name), ("method", method or config.method), ("encoder", config.encoder)]
    for source in (config.preferences, config.views, preferences, views):
        used += [("preference", n) for n in _preference_names(source) if n not in defined]
    for kind, name in used:
        if _registered_at_run_time(kind, name):
            raise ReplicaError(
                f"{kind} '{name}' was registered in this process (register_plugin), and Ray's replicas "
                f"do not have it: install its plugin as a package with a '{_ENTRY_POINT_GROUP}' entry point "
                "(on every node), or run without Ray"
            )


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

    def __init__(self, config: RunConfig | dict[str, Any], threads: int | None = None, warmup: bool = False):
        self.pj: PersonaJudge | None = None
        self.error: str | None = None
        self.config_error = False  # the error is the config's (a plugin missing on this node), not the model's
        self.warnings: list[tuple[type[Warning], str, str, int]] = []  # not yet sent to the driver
        with _recording(self.warnings):
            self._load(config, threads, warmup)

    def _load(self, config: RunConfig | dict[str, Any], threads: int | None, warmup: bool) -> None:
        try:
            cfg = replica_config(config, threads)
            try:
                _check_config(cfg)  # checked by the driver too: here it fails where a node lacks a plugin
            except PersonaJudgeError:
                self.config_error = True
                raise
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
        return {
            "error": self.error,
            "config_error": self.config_error,
            "pid": os.getpid(),
            "model": model,
            "warnings": self._take_warnings(),
        }

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
        failure: dict[str, Any] = {}
        try:
            results, batched = self._generate(task)
        except Exception as err:
            if isinstance(err, PersonaJudgeError):  # a user-level error: one line at the driver, like locally
                failure = {"raise": str(err)}
            else:  # a bug (a plugin's, say): one line at the driver, the traceback in Ray's log
                traceback.print_exc()  # this replica's stderr: Ray's worker log file (log_to_driver is off)
                failure = {"crash": _exception_line(err)}
            # One row's own error (generate_batch waited for the others): the finished rows go back
            # with it, as the local executor hands them over before it raises, so they are written.
            rows = rows_failed_alone(err, len(task.prompts)) if task.isolate_row_errors else None
            if rows is None:
                return {"key": task.key, "actor": me, **failure}
            results, batched = [_row_error(r) for r in rows], True
        return {
            "key": task.key,
            "actor": me,
            **failure,
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
        except NumericalError as err:  # as the local JSONL batch: the NaN rows fail alone, the others are kept
            rows = rows_failed_alone(err, len(task.prompts)) if task.isolate_row_errors else None
            if rows is None:
                raise
            return rows, True
        except PersonaJudgeError as err:  # one row's, before the chunk decoded (``prompts[i]``): name its line
            if task.where is not None and (named := located(err, task.where)) is not err:
                raise named from None
            raise

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


def _row_error(row: Any) -> Any:
    """A row of a chunk that failed, as it travels back to the driver: a result, or the row's
    ``NumericalError`` as is (data, which the JSONL batch records), as locally; any other error of
    the row becomes a :class:`PersonaJudgeError` with its one line. That error's class may live
    only on the replica's node (a backend's module) and it carries ``.rows``, every row of the chunk:
    unpickled by the driver it could fail, or drag the whole chunk along twice. The driver only
    needs to know that the row failed: the run stops with the chunk's error anyway."""
    if not isinstance(row, BaseException) or isinstance(row, NumericalError):
        return row
    return PersonaJudgeError(_exception_line(row))


def _import_ray():
    try:
        import ray
    except ImportError:
        raise BackendUnavailableError('--ray needs Ray: pip install -e ".[ray]" in your persona-judge clone') from None
    return ray


def _first_line(err: BaseException) -> str:
    text = _ANSI.sub("", str(err)).strip()
    return text.splitlines()[0] if text else type(err).__name__


#: Terminal colour codes: Ray colours the text of its errors (``\x1b[36mray::Replica.run()\x1b[39m``).
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _exception_line(err: BaseException) -> str:
    """``RuntimeError: text (at file.py:12)``: an unexpected exception in one line, with the place it
    was raised (the innermost frame), so a bug in a plugin can be found without the traceback."""
    where = ""
    tb = traceback.extract_tb(err.__traceback__)
    if tb:
        where = f" (at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno})"
    text = _ANSI.sub("", str(err)).strip()
    head = f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
    return head + where


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


#: The status of a process ended by a second Ctrl-C while Ray starts, as the CLI's (128 + SIGINT).
_EXIT_INTERRUPTED = 128 + signal.SIGINT


def _hard_stop(wakeup: socket.socket) -> None:
    """The watch over ``ray.init`` (:func:`_interrupt_after`): on the second SIGINT it ends the process.

    ``signal.set_wakeup_fd`` has the C-level handler write each signal's number to ``wakeup`` at once,
    while the main thread is still inside Ray's C++ code, where no Python signal handler runs
    until it returns (minutes, against a server that greets as gRPC but is no Ray). A closed
    socket (the block is over) ends the watch."""
    seen = 0
    while True:
        try:
            data = wakeup.recv(64)
        except InterruptedError:
            continue
        except OSError:
            return
        if not data:
            return
        seen += data.count(bytes([signal.SIGINT]))
        if seen >= 2:
            try:
                discard_fresh_files()  # no ``finally`` runs after os._exit: a run with no row leaves none
            except Exception:  # the process ends anyway
                pass
            try:
                os.write(2, b"personajudge: interrupted\n")
            except OSError:
                pass
            os._exit(_EXIT_INTERRUPTED)


@contextlib.contextmanager
def _interrupt_after() -> Iterator[None]:
    """Hold a Ctrl-C back until the block (``ray.init``) is over, then deliver it; a second one ends the
    process at once, with status 130.

    A KeyboardInterrupt inside ``ray.init``, while Ray builds this process's core worker, leaves a
    half-built one that crashes the interpreter at exit (exit 139 or 134, not 130): ray.shutdown()
    does not tidy it. So the first Ctrl-C is held and raised when the block is over, also when
    the block fails (a Ctrl-C wins over ``ray.init``'s error: the user asked to stop). A Python
    handler only runs once ``ray.init`` is back in Python, which takes seconds on a local start and
    minutes on an address that is not Ray; so a second Ctrl-C is seen through
    ``signal.set_wakeup_fd`` by a thread (:func:`_hard_stop`), which ends the process with
    ``os._exit`` (no finalizer: nothing half-built is torn down) -- as the CLI's second Ctrl-C
    does. What Ray had started goes as after a kill; a batch's partial file stays when it holds
    rows (rerun to continue), and one this run made, which can hold only its settings line yet, is
    removed (:func:`personajudge.core.files.discard_fresh_files`), as after any run stopped before its
    first row. Only where a Python SIGINT handler is installed, on the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # SIG_IGN, SIG_DFL or set outside Python: leave it alone
        yield
        return
    held: list[Any] = []

    def hold(signum: int, frame: Any) -> None:
        held.append((signum, frame))

    watch, wake = socket.socketpair()
    wake.setblocking(False)  # the C handler must never block on it
    try:
        before = signal.set_wakeup_fd(wake.fileno(), warn_on_full_buffer=False)
    except ValueError:  # not allowed here: only the held Ctrl-C then
        before = None
    watcher = threading.Thread(target=_hard_stop, args=(watch,), name="personajudge-ray-start", daemon=True)
    if before is not None:
        watcher.start()
    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if before is not None:
            signal.set_wakeup_fd(before)
        wake.close()  # the watch reads the end of the stream and stops
        if watcher.is_alive():
            watcher.join(5)
        watch.close()
        if held:  # raised here, it replaces an error of the block (a failed ray.init)
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


class _OwnStdout:
    """``sys.stdout`` while a pool is open: the owner thread's writes go to standard output, every other
    thread's to standard error.

    Ray's driver prints its notices (``(raylet) A worker died ...``, from its error-listening thread)
    with ``print(file=sys.stdout)``; ``log_to_driver=False`` does not cover them, and no public
    option turns them off. Standard output is where ``generate --input`` without ``--output``
    writes its JSONL, from the thread that runs the pool: the notices would land between rows.
    Every attribute but ``write`` / ``writelines`` / ``flush`` is the wrapped stream's."""

    def __init__(self, stream: Any, owner: threading.Thread) -> None:
        self.stream = stream
        self.owner = owner

    def _target(self) -> Any:
        if threading.current_thread() is self.owner:
            return self.stream
        return sys.stderr if sys.stderr is not None else self.stream  # `2>&-`: dropped by the stream's own rules

    def write(self, text: str) -> int:
        return self._target().write(text)

    def writelines(self, lines: Iterable[str]) -> None:
        self._target().writelines(lines)

    def flush(self) -> None:
        self._target().flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class ReplicaPool:
    """``replicas`` Ray actors with one loaded model each; :meth:`run` maps chunks over them.

    A context manager: entering connects to (or starts) Ray and waits until every replica has loaded
    the model; leaving kills the replicas and shuts down a Ray instance it started.

    The pool prints nothing: its notes (waiting for the cluster to grow, a replica that died) are
    :class:`PersonaJudgeWarning` warnings, shown whatever ``quiet`` says (the CLI's ``-q`` keeps
    warnings). ``quiet`` is kept for the callers, which print :meth:`overhead_line` only without it.
    While it is open, what other threads print to ``sys.stdout`` (Ray's own notices) goes to
    standard error (:class:`_OwnStdout`): standard output is the opening thread's, for results.

    The config is checked before Ray starts (:func:`check_for_replicas`), so a typo costs no
    cluster time and reads as it does locally.
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
        self._stdout: _OwnStdout | None = None  # installed by start(), removed by close()
        self._sigterm: contextlib.ExitStack | None = None  # terminate_as_exit while a Ray we started runs

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
        check_for_replicas(self.config)  # before Ray starts: as locally, before the model loads
        if sys.stdout is not None and not isinstance(sys.stdout, _OwnStdout):
            self._stdout = _OwnStdout(sys.stdout, threading.current_thread())
            sys.stdout = self._stdout  # type: ignore[assignment]
        if not ray.is_initialized():
            if o.address is not None:
                check_address(o.address)
            # Set before ray.init: whatever stops it half-way, close() shuts down what it started.
            self._started_ray = True
            self._sigterm = contextlib.ExitStack()
            before = signal.getsignal(signal.SIGTERM)  # None: set outside Python, nothing to put back
            if before is not None and threading.current_thread() is threading.main_thread():
                self._sigterm.callback(signal.signal, signal.SIGTERM, before)  # close(): what ray.init replaced
            try:
                with _interrupt_after(), _quiet_ray_start(), _loopback_node(o.address is None):
                    ray.init(**_init_args(o.address))
            except Exception as err:  # ConnectionError, a missing ray[client], a bad address: one line
                raise ReplicaError(_init_error(o.address, err)) from None
            # ray.init set a SIGTERM handler that exits with 15 (and Ray's C++ one prints a stack per
            # signal): `kill PID` is an exit with 143, as without Ray, through close() and the caller's
            # finally blocks (the partial file's count). Only over the handler this pool's ray.init set.
            self._sigterm.enter_context(terminate_as_exit())
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
        # The config object, not a dump: a dump leaves out what is not part of the reported settings
        # (the CLI's ``definitions``, the preferences a --preferences-file defines for its views).
        self.actors = [remote.remote(self.config, o.replica_threads, self.warmup) for _ in range(o.replicas)]
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
            if info["error"] and info.get("config_error"):  # the driver passed it: a plugin missing there
                raise ReplicaError(f"replica {i + 1} of {len(infos)}: {info['error']}")
            if info["error"]:
                raise ReplicaError(f"replica {i + 1} of {len(infos)} could not load the model: {info['error']}")
        self.infos = infos

    def close(self) -> None:
        try:
            self._close()
        finally:
            if self._stdout is not None:
                if sys.stdout is self._stdout:
                    sys.stdout = self._stdout.stream
                self._stdout = None
            if self._sigterm is not None:  # after ray.shutdown(): Ray's handler is back only as it ends
                sigterm, self._sigterm = self._sigterm, None
                # signal.signal works on the main thread only: a pool closed from another thread leaves
                # the handlers as they are (the process is ending, or the main thread goes on with Ray's)
                with contextlib.suppress(ValueError):
                    sigterm.close()

    def _close(self) -> None:
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
            # also after a ray.init that was interrupted half-way (safe when nothing started); Ray prints
            # the notices it held back (repeats) to sys.stdout here, on this thread: not into the results
            with contextlib.redirect_stdout(sys.stderr):
                ray.shutdown()

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
        error of the earliest task (in the order given) is the one raised, as locally.

        An unexpected exception in a replica (a bug, in a plugin say) stops the run the same way:
        the chunks still out finish and are yielded, then one :class:`ReplicaError` names the
        replica, the exception and where it was raised (its traceback is in Ray's log of that
        replica), where locally the same bug is a traceback.

        Where the error was one row's own (a task with ``isolate_row_errors``: a backend that
        could not run that row's forward, a plugin's bug on it), the replica also returns the
        chunk's finished rows, that row as its error: the chunk is yielded all the same, so the
        JSONL batch writes those rows and a rerun resumes after them, as locally; the run still
        stops with the error, as above."""
        from ray.exceptions import ActorDiedError, RayActorError, RayTaskError
        from ray.util.actor_pool import ActorPool

        pool = ActorPool(list(self.actors))
        inflight: dict[Any, tuple[Task, float, str]] = {}  # task key -> (task, dispatch time, actor id)
        attempts: dict[Any, int] = {}
        order: dict[Any, int] = {}  # task key -> its place in ``tasks``
        queue: deque[Task] = deque()  # not yet submitted; a retried chunk goes first
        failed: tuple[int, str] | None = None  # (place, error) of the earliest chunk that raised
        alive = len(self.actors)
        number = {a._actor_id.hex(): i + 1 for i, a in enumerate(self.actors)}  # actor id -> replica number

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
            opts = t.options
            _refuse_run_time_plugins(self.config, opts.get("preferences"), opts.get("views"), opts.get("method"))
            attempts[t.key] = 0
            order[t.key] = len(order)
            queue.append(t)
        fill()
        while pool.has_next():
            try:
                out = pool.get_next_unordered()
            except RayTaskError as err:
                # Raised outside Replica._run (which answers every exception of a chunk): which chunk
                # is not known, so it counts as the first. The others still out are drained.
                cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else err
                failed = (-1, f"a replica failed: {_exception_line(cause)}")
                fill()
                continue
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
            if "raise" in out or "crash" in out:
                if "raise" in out:
                    error = out["raise"]
                else:
                    which = number.get(out.get("actor"), "?")
                    error = f"replica {which} of {len(self.actors)} failed: {out['crash']}"
                if failed is None or order[task.key] < failed[0]:
                    failed = (order[task.key], error)
            fill()  # after a failure a retried chunk still goes out; nothing new does
            if "results" not in out:  # the chunk failed as a whole (one row's error brings the others back)
                continue
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
        """An executor for :meth:`personajudge.batch.JsonlBatch.run`: chunks become tasks, results dicts
        (a row whose logits turned NaN: its own ``NumericalError``, as the local executor yields it).
        A chunk where one row failed with another error of its own is yielded too, that row as an
        exception (:func:`_row_error`), before :meth:`run` raises the error: its finished rows are
        written, as the local executor's are."""

        def run(chunks):
            by_key = {c.index: c for c in chunks}
            tasks = [
                Task(
                    c.index,
                    c.prompts,
                    c.seeds,
                    {"preferences": preferences},
                    where=c.where,
                    isolate_row_errors=True,
                )
                for c in chunks
            ]
            for out in self.run(tasks):
                yield by_key[out.task.key], executor_results(out.results)

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
    "check_for_replicas",
    "replica_config",
]
