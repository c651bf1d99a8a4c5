"""The Python API: load a backend once, generate with any method and preferences.

    import personajudge as pj

    model = pj.PersonaJudge({"backend": {"name": "llama-cpp"}})
    result = model.generate("Why is the sky blue?", preferences=["concise", "humor"])
    print(result.text, result.stats.acceptance_rate)
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from personajudge.core.config import RunConfig, build_config
from personajudge.core.contract import Backend
from personajudge.core.errors import ConfigError
from personajudge.core.decoding import DecodeRequest, drive_many, run_timed
from personajudge.core.result import GenerationResult, Stats
from personajudge.core.stopping import Emitter
from personajudge.core.transforms import SamplingParams
from personajudge.plugins import get_method, load_backend, preference_library, resolve_encoder
from personajudge.preferences import Preference, build_views, encode, normalize_conversation

Prompt = str | list[dict[str, str]]


def make_method(cfg: RunConfig):
    """An instance of the configured method with its options."""
    cls = get_method(cfg.method)
    try:
        return cls(**cfg.method_options)
    except TypeError as err:
        raise ConfigError(f"method_options for '{cfg.method}': {err}") from None


def fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % (2**63))


class PersonaJudge:
    """A loaded model plus a default :class:`RunConfig`.

    The backend (and its weights) is loaded once in the constructor; every
    ``generate`` call opens a new session with one KV cache per view on the
    same weights.
    """

    def __init__(self, config: RunConfig | dict[str, Any] | None = None, *, backend: Backend | None = None):
        self.config = config if isinstance(config, RunConfig) else build_config(config or {})
        self.backend = backend if backend is not None else load_backend(self.config.backend)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "PersonaJudge":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run_config(self, **overrides: Any) -> RunConfig:
        if not any(v is not None for v in overrides.values()):
            return self.config
        return build_config(self.config.model_dump(by_alias=True), **overrides)

    def encode_views(self, prompt: Prompt, cfg: RunConfig, method, views: list[list[Preference]]) -> list[list[int]]:
        """Token contexts of the views ``method`` prompts for the user's ``views``."""
        conversation = normalize_conversation(prompt)
        tok = self.backend.tokenizer
        encoder = resolve_encoder(cfg.encoder, tok)
        return [encode(encoder, v, conversation, tok, system=cfg.system, options=cfg.encoder_options)
                for v in method.plan(views)]

    def generate(self, prompt: Prompt, *, preferences: Sequence[str | Preference] | None = None,
                 views: Sequence[Sequence[str | Preference]] | None = None, method: str | None = None,
                 on_text: Callable[[str], None] | None = None, **decoding: Any) -> GenerationResult:
        """Generate one response.

        ``prompt`` is a string or a list of chat messages. ``preferences`` and
        ``views`` replace the config's (names, descriptions or
        :class:`Preference` objects). ``decoding`` takes the fields of
        :class:`DecodingConfig` (``lam`` for the window, ``temperature``,
        ``top_k``, ``top_p``, ``max_new_tokens``, ``stop``, ``seed``, ``roles``,
        ``schedule``). ``on_text`` receives text as it is committed.
        """
        cfg, meth, pref_views = self._prepare(preferences, views, method, decoding)
        contexts = self.encode_views(prompt, cfg, meth, pref_views)
        return self.decode(contexts, cfg, meth, on_text=on_text)

    def stream(self, prompt: Prompt, **kwargs: Any) -> Iterator[str]:
        """Yield the response's text as it is committed (same arguments as :meth:`generate`).

        The pieces concatenate to ``generate(...).text`` for the same seed.
        The finished :class:`GenerationResult` is the generator's return
        value (``StopIteration.value``), for callers that want the stats.
        """
        pieces: queue.Queue = queue.Queue()
        done = object()
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["result"] = self.generate(prompt, on_text=pieces.put, **kwargs)
            except BaseException as err:  # re-raised in the caller's thread
                box["error"] = err
            finally:
                pieces.put(done)

        worker = threading.Thread(target=work, name="personajudge-stream", daemon=True)
        worker.start()
        while (piece := pieces.get()) is not done:
            yield piece
        worker.join()
        if "error" in box:
            raise box["error"]
        return box["result"]

    def _prepare(self, preferences, views, method, decoding: dict[str, Any]):
        """The run config with per-call overrides, the method instance and the user's views."""
        if "lam" in decoding:
            decoding["lambda"] = decoding.pop("lam")
        cfg = self._run_config(method=method, **{f"decoding.{k}": v for k, v in decoding.items()})
        prefs = list(preferences) if preferences is not None else cfg.preferences
        groups = [list(v) for v in views] if views is not None else cfg.views
        return cfg, make_method(cfg), build_views(prefs, groups, preference_library())

    def generate_batch(self, prompts: Sequence[Prompt], *, preferences: Sequence[str | Preference] | None = None,
                       views: Sequence[Sequence[str | Preference]] | None = None, method: str | None = None,
                       seeds: Sequence[int] | None = None, **decoding: Any) -> list[GenerationResult]:
        """Generate for many prompts at once, as one batch on the device.

        Every prompt runs its own loop (own seed, own acceptance lengths, own
        stopping); each step gathers the forwards of all unfinished prompts
        into one backend call. Row ``i`` gets the same output as
        ``generate(prompts[i], seed=seeds[i])`` (exactly in greedy mode; in
        sampling mode up to floating-point differences of batched kernels).
        ``seeds`` defaults to ``seed + i`` when a seed is configured.
        """
        cfg, meth, pref_views = self._prepare(preferences, views, method, decoding)
        if not prompts:
            return []
        if seeds is None:
            base = cfg.decoding.seed
            seeds = [base + i if base is not None else fresh_seed() for i in range(len(prompts))]
        elif len(seeds) != len(prompts):
            raise ConfigError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        contexts = [self.encode_views(p, cfg, meth, pref_views) for p in prompts]
        reqs = [self._request(c, cfg, s) for c, s in zip(contexts, seeds)]
        n_views = len(contexts[0])
        if not getattr(meth, "batchable", True):
            return [self._run(meth, cfg, r) for r in reqs]
        t0 = time.perf_counter()
        with self.backend.open(n_views * len(reqs)) as session:
            drive_many(session, [meth.loop(r) for r in reqs], n_views)
        wall = time.perf_counter() - t0
        out = []
        for r in reqs:
            r.stats.wall_time_s = wall
            r.stats.tokens = len(r.emitter.tokens)
            out.append(self._result(r))
        return out

    def stop_strings(self, cfg: RunConfig) -> list[str]:
        """The user's stop strings plus those the encoder's format implies."""
        tok = self.backend.tokenizer
        enc = resolve_encoder(cfg.encoder, tok)
        extra = enc.stop_strings(tok, cfg.encoder_options) if hasattr(enc, "stop_strings") else []
        return list(dict.fromkeys([*cfg.decoding.stop, *extra]))

    def _request(self, contexts: list[list[int]], cfg: RunConfig, seed: int | None,
                 on_text: Callable[[str], None] | None = None) -> DecodeRequest:
        d = cfg.decoding
        seed = seed if seed is not None else fresh_seed()
        emitter = Emitter(self.backend.tokenizer, max_new_tokens=d.max_new_tokens, stop=self.stop_strings(cfg),
                          on_text=on_text)
        stats = Stats(method=cfg.method, views=len(contexts), prompt_tokens=[len(c) for c in contexts], seed=seed)
        return DecodeRequest(contexts=contexts, params=SamplingParams(d.temperature, d.top_k, d.top_p),
                             lam=d.lambda_, rng=np.random.default_rng(seed), emitter=emitter,
                             context_length=self.backend.context_length, roles=d.roles, schedule=d.schedule,
                             stats=stats)

    @staticmethod
    def _result(req: DecodeRequest) -> GenerationResult:
        em = req.emitter
        if em.finish_reason is None:
            em.finish("length")
        return GenerationResult(text=em.text, tokens=list(em.tokens), finish_reason=em.finish_reason,
                                stats=req.stats)

    def _run(self, meth, cfg: RunConfig, req: DecodeRequest) -> GenerationResult:
        with self.backend.open(len(req.contexts)) as session:
            run_timed(meth.decode, session, req)
        return self._result(req)

    def decode(self, contexts: list[list[int]], cfg: RunConfig, meth, *,
               on_text: Callable[[str], None] | None = None) -> GenerationResult:
        """Run ``meth`` on already-encoded view contexts."""
        return self._run(meth, cfg, self._request(contexts, cfg, cfg.decoding.seed, on_text))


def generate(prompt: Prompt, *, config: RunConfig | dict[str, Any] | None = None, **kwargs: Any) -> GenerationResult:
    """One-shot helper: load the configured backend, generate, free it.

    To generate more than once, keep a :class:`PersonaJudge`: loading the
    model is most of a one-shot call's time.
    """
    with PersonaJudge(config) as pj:
        return pj.generate(prompt, **kwargs)


def stream(prompt: Prompt, *, config: RunConfig | dict[str, Any] | None = None, **kwargs: Any) -> Iterator[str]:
    """One-shot streaming: load the configured backend, yield text as it is committed, free it."""
    with PersonaJudge(config) as pj:
        yield from pj.stream(prompt, **kwargs)
