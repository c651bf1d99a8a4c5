"""Statistical exactness of Persona-judge, checked through the public API on any backend.

The claim (paper, appendix C.2): every committed token is distributed as the
*judge's* filtered distribution p for its position. Which view judges a
position depends on the role schedule and on where earlier windows ended, and
where a window ends depends on the draft view too, so the law of a whole
committed sequence is a mixture over iteration boundaries -- not simply one
view's distribution. This module computes that law exactly and compares it,
by a chi-square test, with sequences sampled through
:meth:`personajudge.PersonaJudge.generate_batch` (the path users call).

The law is derived here from the acceptance rule, not from the core's code.
In a window with draft view d and judge view j, after committed prefix c:

- draft token y is sampled from q = q_d(. | c) and accepted with probability
  min(1, p(y)/q(y)), so "y committed as an accepted draft" has probability
  min(p(y), q(y)) and the window goes on (same roles, next position);
- otherwise a token y is emitted from the residual norm(max(0, p - q)); the
  rejection has probability sum(max(0, q - p)) = sum(max(0, p - q)), so "y
  committed by a rejection" has probability max(0, p(y) - q(y)) and the
  window ends (next iteration, next roles);
- after lambda accepted drafts the bonus token comes from p(. | c) with
  probability p(y), and the window ends.

A dynamic program over (committed prefix, iteration, position in the window)
sums these transitions. Each view's filtered distribution is computed here
from the backend's raw logits (temperature, top-k, top-p written out again
with numpy), the role schedule is written out again too, and the backend is
queried through its :class:`~personajudge.core.contract.Session` only, so the
check works on any backend that implements the contract (the toy backend, a
third-party one in the conformance kit). Enumeration is exact and cheap with a
small top-k (2 or 3) and a sequence of lambda + 2 tokens.

A backend whose logits depend on the batch shape (llama.cpp's CPU kernels do)
gives the sampler and this law slightly different distributions; the check is
meant for deterministic backends (the toy model, a float64 test model) or for
large tolerances.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from personajudge.api import PersonaJudge, make_method
from personajudge.core.config import DecodingConfig, build_config
from personajudge.core.transforms import SamplingParams
from personajudge.plugins import get_method, preference_library
from personajudge.preferences import build_views

#: The role schedule of each built-in method (paper: Persona-judge alternates, -Base keeps roles).
METHOD_ROLES = {"persona-judge": "alternate", "persona-judge-base": "fixed", "reference": "alternate"}

Outcome = tuple[int, ...]


def roles_at(policy: str, n_views: int, iteration: int) -> tuple[int, int]:
    """(draft view, judge view) of ``iteration`` under ``policy``.

    ``alternate``/``round-robin``: view i mod N drafts, view (i + 1) mod N
    judges (two views swap every iteration). ``fixed``: view 0 drafts; the
    judge cycles through views 1..N-1.
    """
    if policy in ("alternate", "round-robin"):
        return iteration % n_views, (iteration + 1) % n_views
    if policy == "fixed":
        return 0, 1 + iteration % (n_views - 1)
    raise ValueError(f"unknown role policy {policy!r}")


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, wherever it lives
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


def filtered_distribution(logits: Any, *, temperature: float, top_k: int, top_p: float) -> dict[int, float]:
    """The filtered next-token distribution {token: probability} of one logits row.

    Temperature 0 is greedy (all mass on the first argmax). Top-k keeps every
    entry at least as large as the k-th largest (ties kept); top-p then keeps
    the most likely of those k values while the probability mass before them
    (renormalized over the k) is below ``top_p``.
    """
    z = _to_numpy(logits).reshape(-1)
    if SamplingParams(temperature).greedy:
        return {int(np.argmax(z)): 1.0}
    z = z / temperature
    v = z.shape[0]
    k = top_k if 0 < top_k < v else v
    desc = np.sort(z)[::-1]
    keep = z >= desc[k - 1]
    if top_p < 1.0:
        top = desc[:k]
        w = np.exp(top - top[0])
        w /= w.sum()
        before = np.cumsum(w) - w
        keep &= z >= top[before < top_p].min()
    ids = np.flatnonzero(keep)
    e = np.exp(z[ids] - z[ids].max())
    e /= e.sum()
    return {int(i): float(p) for i, p in zip(ids, e)}


class SessionOracle:
    """Logits of each view after its context plus a committed continuation, read through a Session.

    Queries come in depth-first order from the law's dynamic program, so the
    session keeps the longest shared prefix and rolls back the rest
    (``truncate``), as the decoding loops do.
    """

    def __init__(self, backend: Any, contexts: Sequence[Sequence[int]]):
        self.contexts = [list(c) for c in contexts]
        self.session = backend.open(len(self.contexts))
        self.fed: list[list[int]] = [[] for _ in self.contexts]
        self.cache: dict[tuple[int, Outcome], np.ndarray] = {}

    def logits(self, view: int, committed: Outcome) -> np.ndarray:
        key = (view, committed)
        if key not in self.cache:
            want = self.contexts[view] + list(committed)
            have = self.fed[view]
            n = 0
            while n < min(len(have), len(want)) and have[n] == want[n]:
                n += 1
            n = min(n, len(want) - 1)  # at least one token is fed, to get its logits
            if n < len(have):
                self.session.truncate(view, n)
            out = self.session.forward(view, want[n:], 1)
            self.fed[view] = want
            self.cache[key] = _to_numpy(out)[-1]
        return self.cache[key]

    def close(self) -> None:
        self.session.close()


def expected_law(
    backend: Any,
    contexts: Sequence[Sequence[int]],
    *,
    roles: str | Callable[[int], tuple[int, int]],
    lam: int,
    temperature: float,
    top_k: int,
    top_p: float,
    length: int,
    eos_ids: Iterable[int] | None = None,
    events: dict[str, float] | None = None,
) -> dict[Outcome, float]:
    """The exact law of the first ``length`` committed tokens of Persona-judge.

    ``contexts`` are the views' token ids (as the method prompts them),
    ``roles`` a policy name (see :func:`roles_at`) or a function from the
    iteration number to ``(draft, judge)``. An outcome is the tuple of
    committed tokens; a sequence that ends at an end-of-sequence token has
    that token appended (the result's tokens never contain it), so outcomes
    are :func:`outcome` of a :class:`GenerationResult`.

    ``events``, if given, receives the expected number per sequence of
    ``bonus`` tokens (drawn from p_{lambda+1} after a fully accepted window),
    of tokens emitted at a ``rejection``, and of ``role_swap``s (iterations
    begun after the first): a test uses them to show that its sequences are
    long enough to exercise each branch.
    """
    n = len(contexts)
    if n < 2:
        raise ValueError("Persona-judge needs at least two views")
    role_fn = roles if callable(roles) else (lambda it: roles_at(roles, n, it))
    eos = frozenset(backend.tokenizer.eos_token_ids if eos_ids is None else eos_ids)
    oracle = SessionOracle(backend, contexts)
    dists: dict[tuple[int, Outcome], dict[int, float]] = {}

    def dist(view: int, seq: Outcome) -> dict[int, float]:
        if (view, seq) not in dists:
            dists[(view, seq)] = filtered_distribution(
                oracle.logits(view, seq), temperature=temperature, top_k=top_k, top_p=top_p
            )
        return dists[(view, seq)]

    law: dict[Outcome, float] = {}
    try:
        # state: (committed, iteration, accepted so far in this window) -> probability; depth-first per prefix
        states: dict[tuple[Outcome, int, int], float] = {((), 0, 0): 1.0}
        ev = {"bonus": 0.0, "rejection": 0.0, "role_swap": 0.0}
        for _ in range(length):
            nxt: dict[tuple[Outcome, int, int], float] = {}
            for (seq, it, i), mass in sorted(states.items()):
                d, j = role_fn(it)
                p = dist(j, seq)
                moves: list[tuple[int, float, int, int]] = []  # token, probability, next it, next i
                if i == lam:
                    moves = [(y, py, it + 1, 0) for y, py in p.items()]
                else:
                    q = dist(d, seq)
                    for y in sorted(set(p) | set(q)):
                        py, qy = p.get(y, 0.0), q.get(y, 0.0)
                        if min(py, qy) > 0:
                            moves.append((y, min(py, qy), it, i + 1))
                        if py > qy:
                            moves.append((y, py - qy, it + 1, 0))
                if it > 0 and i == 0:
                    ev["role_swap"] += mass
                for y, pr, it2, i2 in moves:
                    if i == lam:
                        ev["bonus"] += mass * pr
                    elif it2 > it:
                        ev["rejection"] += mass * pr
                    if y in eos:
                        key = seq + (y,)
                        law[key] = law.get(key, 0.0) + mass * pr
                    else:
                        s = (seq + (y,), it2, i2)
                        nxt[s] = nxt.get(s, 0.0) + mass * pr
            states = nxt
        for (seq, _, _), mass in states.items():
            law[seq] = law.get(seq, 0.0) + mass
        if events is not None:
            events.update(ev)
    finally:
        oracle.close()
    return law


def token_law(
    step: Callable[[Outcome], dict[int, float]], *, length: int, eos_ids: Iterable[int]
) -> dict[Outcome, float]:
    """The law of ``length`` tokens sampled one at a time from ``step(committed) -> {token: prob}``.

    For the methods that sample one distribution per token (plain sampling,
    logit mixing, reward-guided re-ranking): the test supplies ``step``,
    computed its own way, and compares with :func:`chi_square`.
    """
    eos = frozenset(eos_ids)
    law: dict[Outcome, float] = {}
    frontier: dict[Outcome, float] = {(): 1.0}
    for _ in range(length):
        nxt: dict[Outcome, float] = {}
        for seq, mass in frontier.items():
            for y, py in step(seq).items():
                if py <= 0:
                    continue
                if y in eos:
                    law[seq + (y,)] = law.get(seq + (y,), 0.0) + mass * py
                else:
                    nxt[seq + (y,)] = nxt.get(seq + (y,), 0.0) + mass * py
        frontier = nxt
    for seq, mass in frontier.items():
        law[seq] = law.get(seq, 0.0) + mass
    return law


def outcome(result: Any) -> Outcome:
    """The outcome key of one :class:`GenerationResult` (tokens, plus the EOS that ended it)."""
    tokens = tuple(int(t) for t in result.tokens)
    if result.finish_reason not in ("eos", "length"):
        raise ValueError(
            f"a generation finished by {result.finish_reason!r}; the exactness check needs sequences "
            "that end only at EOS or the length (turn off stop strings: encoder_options stop=false)"
        )
    if result.finish_reason == "eos":
        return tokens + (_EOS_MARK,)
    return tokens


#: Stand-in for "ended at EOS" in sampled outcomes; :func:`chi_square` maps it to the law's EOS ids.
_EOS_MARK = -1


@dataclass
class ExactnessResult:
    """A chi-square comparison of sampled sequences with a law."""

    pvalue: float
    statistic: float
    dof: int
    n: int
    #: samples whose outcome has probability 0 under the law (any such sample refutes it)
    impossible: int
    law: dict[Outcome, float] = field(repr=False)
    counts: Counter = field(repr=False)


def _canon(key: Outcome, eos: frozenset[int]) -> Outcome:
    return key[:-1] + (_EOS_MARK,) if key and key[-1] in eos else key


def chi_square(
    counts: Counter, law: dict[Outcome, float], *, eos_ids: Iterable[int] = (), min_expected: float = 5.0
) -> ExactnessResult:
    """Pearson's chi-square of ``counts`` against ``law``.

    Outcomes expected fewer than ``min_expected`` times are pooled into one
    bin (the usual validity condition of the test). A sampled outcome the law
    gives probability 0 makes the p-value 0.
    """
    from scipy import stats  # a test-time dependency, like pytest

    eos = frozenset(eos_ids)
    probs: dict[Outcome, float] = {}
    for k, v in law.items():
        c = _canon(k, eos)
        probs[c] = probs.get(c, 0.0) + v
    n = sum(counts.values())
    impossible = sum(c for k, c in counts.items() if probs.get(k, 0.0) <= 0.0)
    obs: list[float] = []
    exp: list[float] = []
    rest_o = rest_e = 0.0
    for k, p in sorted(probs.items()):
        e = p * n
        if e >= min_expected:
            obs.append(counts.get(k, 0))
            exp.append(e)
        else:
            rest_o += counts.get(k, 0)
            rest_e += e
    if rest_e > 0:
        obs.append(rest_o)
        exp.append(rest_e)
    obs_a, exp_a = np.asarray(obs, dtype=float), np.asarray(exp, dtype=float)
    exp_a *= obs_a.sum() / exp_a.sum() if exp_a.sum() > 0 else 1.0  # rounding of the law's total mass
    if impossible or len(obs_a) < 2:
        stat, pvalue = (float("inf"), 0.0) if impossible else (0.0, 1.0)
    else:
        res = stats.chisquare(obs_a, exp_a)
        stat, pvalue = float(res.statistic), float(res.pvalue)
    return ExactnessResult(
        pvalue=pvalue, statistic=stat, dof=max(len(obs_a) - 1, 0), n=n, impossible=impossible, law=law, counts=counts
    )


def sample_outcomes(
    model: Any, prompt: Any, *, n: int, seed: int = 0, batch: bool = True, chunk: int = 256, **generate: Any
) -> Counter:
    """Outcomes of ``n`` generations with seeds ``seed .. seed + n - 1`` through the public API."""
    seeds = list(range(seed, seed + n))
    if batch:  # in chunks: an engine may bound how many requests wait at once
        results = [
            r
            for i in range(0, n, chunk)
            for r in model.generate_batch([prompt] * len(seeds[i : i + chunk]), seeds=seeds[i : i + chunk], **generate)
        ]
    else:
        results = [model.generate(prompt, seed=s, **generate) for s in seeds]
    return Counter(outcome(r) for r in results)


def view_contexts(
    model: Any,
    prompt: Any,
    *,
    method: str,
    preferences: Sequence[Any] | None = None,
    views: Sequence[Sequence[Any]] | None = None,
) -> list[list[int]]:
    """The token ids of the views ``method`` prompts for ``prompt`` (as ``generate`` builds them)."""

    data = model.config.model_dump(by_alias=True)
    if data.get("method") != method:  # the configured options belong to the configured method
        data["method_options"] = {}
    cfg = build_config(data, method=method)
    groups = [list(v) for v in views] if views is not None else cfg.views
    prefs = list(preferences) if preferences is not None else cfg.preferences
    return model.encode_views(prompt, cfg, make_method(cfg), build_views(prefs, groups, preference_library()))


def _KIT_CONFIG(backend: Any) -> dict[str, Any]:
    """How a bare backend is wrapped: short plain-text views (any two distinct contexts do for exactness),
    and no stop strings, which would cut sequences short of the length the law is computed for."""
    return {
        "backend": {"name": getattr(backend, "name", None) or "custom"},
        "encoder": "plain",
        "encoder_options": {"stop": False},
    }


def check_exactness(
    model: Any,
    prompt: Any = "hello",
    *,
    preferences: Sequence[Any] | None = None,
    views: Sequence[Sequence[Any]] | None = None,
    method: str = "persona-judge",
    schedule: str = "interleaved",
    lam: int = 4,
    temperature: float = 1.0,
    top_k: int = 2,
    top_p: float = 1.0,
    length: int | None = None,
    n: int = 3000,
    seed: int = 0,
    law_roles: str | Callable[[int], tuple[int, int]] | None = None,
    batch: bool = True,
) -> ExactnessResult:
    """Sample ``n`` sequences of ``length`` (default lambda + 2) tokens and test them against the exact law.

    ``model`` is a :class:`~personajudge.PersonaJudge` or a bare backend
    (wrapped in one). The views come from ``preferences`` (one view each) or
    ``views``; at least two are needed. ``law_roles`` overrides the role
    schedule the law assumes (default: the method's, from
    :data:`METHOD_ROLES`); a wrong one is a negative control. Returns an
    :class:`ExactnessResult`; a correct implementation gives a p-value that
    is uniform on [0, 1], a broken one a p-value near 0.
    """

    if not isinstance(model, PersonaJudge):
        model = PersonaJudge(_KIT_CONFIG(model), backend=model)
    length = lam + 2 if length is None else length
    contexts = view_contexts(model, prompt, method=method, preferences=preferences, views=views)
    if len(contexts) < 2:
        raise ValueError("the exactness check needs at least two views (two preferences or two view groups)")
    roles = law_roles if law_roles is not None else METHOD_ROLES.get(method)
    if roles is None:
        roles = getattr(get_method(method), "roles", "alternate")
    backend = model.backend
    law = expected_law(
        backend, contexts, roles=roles, lam=lam, temperature=temperature, top_k=top_k, top_p=top_p, length=length
    )
    extra = {"repeat_lines": 0} if "repeat_lines" in DecodingConfig.model_fields else {}  # no text-level cuts
    counts = sample_outcomes(
        model,
        prompt,
        n=n,
        seed=seed,
        batch=batch,
        preferences=preferences,
        views=views,
        method=method,
        schedule=schedule,
        lam=lam,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        max_new_tokens=length,
        stop=[],
        **extra,
    )
    return chi_square(counts, law, eos_ids=backend.tokenizer.eos_token_ids)


def check_backend_exactness(
    backend: Any,
    *,
    prompt: Any = "hello",
    preferences: Sequence[Any] = ("concise", "humor"),
    lam: int = 4,
    n: int = 1500,
    seed: int = 0,
    schedule: str = "interleaved",
) -> tuple[float, float]:
    """The conformance kit's exactness check on a (third-party) backend: ``(p_value, control_p)``.

    ``p_value`` tests Persona-judge's committed sequences (lambda + 2 tokens,
    top-k 2, temperature 1) against the exact law; ``control_p`` tests the
    *same* samples against two wrong laws -- the wrong role schedule (fixed
    roles instead of alternating) and temperature 0.5 instead of 1 -- and is
    the smaller p-value: a check with power rejects at least one. (Views that
    give identical distributions, as a bigram model's do once their last
    tokens agree, make the role schedules indistinguishable; the temperature
    control still shows power.) A conforming backend gives ``p_value`` well
    above 1e-3 and ``control_p`` below it. ``schedule`` is the loop schedule
    sampled with (``windowed`` verifies lambda + 1 rows per forward).
    """

    model = backend if isinstance(backend, PersonaJudge) else PersonaJudge(_KIT_CONFIG(backend), backend=backend)
    settings: dict[str, Any] = dict(lam=lam, temperature=1.0, top_k=2, top_p=1.0)
    res = check_exactness(
        model,
        prompt,
        preferences=list(preferences),
        method="persona-judge",
        n=n,
        seed=seed,
        schedule=schedule,
        **settings,
    )
    contexts = view_contexts(model, prompt, method="persona-judge", preferences=list(preferences))
    eos = model.backend.tokenizer.eos_token_ids
    wrong_roles = expected_law(model.backend, contexts, roles="fixed", length=lam + 2, **settings)
    sharper = expected_law(
        model.backend, contexts, roles="alternate", length=lam + 2, **{**settings, "temperature": 0.5}
    )
    return res.pvalue, min(
        chi_square(res.counts, wrong_roles, eos_ids=eos).pvalue, chi_square(res.counts, sharper, eos_ids=eos).pvalue
    )
