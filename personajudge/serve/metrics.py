"""Prometheus metrics of the server (``GET /metrics``), on their own registry.

Counters of requests (by endpoint and status), prompt and completion tokens,
drafted and accepted tokens (the acceptance rate is their ratio, also exported
as a gauge); gauges of queue depth, running requests and KV slots in use, read
from the engine at scrape time; histograms of the batch size and duration of
each engine step, and of request latency, time to first token and queue wait.
"""

from __future__ import annotations

from typing import Any

from personajudge.engine import RequestCancelled

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self, engine: Any):
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram

        self.content_type = CONTENT_TYPE_LATEST
        self.registry = r = CollectorRegistry()
        self._drafted = self._accepted = 0
        self.requests = Counter(
            "personajudge_requests", "HTTP requests by endpoint and status code.", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("personajudge_prompt_tokens", "Prompt tokens processed (all views).", registry=r)
        self.completion_tokens = Counter("personajudge_completion_tokens", "Tokens generated.", registry=r)
        self.drafted = Counter("personajudge_drafted_tokens", "Draft tokens judged.", registry=r)
        self.accepted = Counter("personajudge_accepted_tokens", "Draft tokens accepted by the judge view.", registry=r)
        self.cancelled = Counter(
            "personajudge_cancelled_requests",
            "Requests cancelled (client disconnected, timed out or shutdown).",
            registry=r,
        )
        rate = Gauge("personajudge_acceptance_rate", "Accepted / drafted tokens since start.", registry=r)
        rate.set_function(self._rate)
        for name, key, doc in (
            ("personajudge_queue_depth", "queued", "Requests waiting for a batch slot."),
            ("personajudge_running_requests", "running", "Requests in the running batch."),
            ("personajudge_kv_slots_in_use", "slots_in_use", "Session views (KV sequences) held."),
            ("personajudge_kv_slots", "slots", "Session views (KV sequences) available."),
        ):
            g = Gauge(name, doc, registry=r)

            def read(k: str = key) -> float:
                return float(engine.stats()[k])

            g.set_function(read)
        self.batch_size = Histogram(
            "personajudge_batch_size", "Requests in each batched engine step.", buckets=BATCH_BUCKETS, registry=r
        )
        self.step_seconds = Histogram(
            "personajudge_step_seconds",
            "Duration of each batched engine step.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.latency = Histogram(
            "personajudge_request_duration_seconds",
            "Request latency, submit to last token.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "personajudge_time_to_first_token_seconds",
            "Submit to first committed token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "personajudge_queue_wait_seconds", "Submit to joining the batch.", buckets=LATENCY_BUCKETS, registry=r
        )

    def _rate(self) -> float:
        return self._accepted / self._drafted if self._drafted else 0.0

    def on_step(self, batch: int, seconds: float) -> None:
        self.batch_size.observe(batch)
        self.step_seconds.observe(seconds)

    def on_finish(self, job: Any, error: BaseException | None) -> None:
        """Called by the engine for every job that ends: in the engine thread, or, for a request
        cancelled while it waits, in the thread that cancelled it (then only ``cancelled`` is touched)."""
        if error is None:
            self.observe_job(job.label, job)
        elif isinstance(error, RequestCancelled):
            self.cancelled.inc()
            self.observe_cancelled(job)

    def observe_cancelled(self, job: Any) -> None:
        """Record the work of a job cancelled part-way (a timeout, a client that left, a shutdown): its
        prompts were prefilled and its committed tokens generated (a stream sent them), so the token
        counters include them, as their help texts say. A job cancelled while queued did neither. Its
        times are not observed: the latency histogram is of requests that finished."""
        if job.t_start is None:  # never joined the batch
            return
        req = job.req
        self._count(sum(req.stats.prompt_tokens), len(req.emitter.tokens), req.stats.drafted, req.stats.accepted)

    def _count(self, prompt: int, completion: int, drafted: int, accepted: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.completion_tokens.inc(completion)
        self.drafted.inc(drafted)
        self.accepted.inc(accepted)
        self._drafted += drafted
        self._accepted += accepted

    def observe_job(self, endpoint: str, job: Any) -> None:
        """Record a finished job's tokens and times."""
        res = job.result_value
        if res is not None:
            st = res.stats
            self._count(sum(st.prompt_tokens), len(res.tokens), st.drafted, st.accepted)
        if job.t_end is not None:
            self.latency.labels(endpoint).observe(job.t_end - job.t_submit)
        if job.t_first is not None:
            self.ttft.observe(job.t_first - job.t_submit)
        if job.t_start is not None:
            self.queue_wait.observe(job.t_start - job.t_submit)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
