"""``pairwise-judge``: the paper's LLM-as-judge protocol.

For one prompt, two responses (A = the method's, B = the baseline's) and one
aspect (a preference's description), the judge model is asked which response
is better *on that aspect only* and answers ``1``, ``2`` or ``0`` (tie).

- **Order randomized with a seed**: whether A is shown first is drawn from a
  generator seeded with ``(seed, item key)``, so it is reproducible and
  independent of the order the items are scored in.
- **Position bias checked by swapping** (``swap=True``, the default): the
  judge also sees the opposite order. The item's value is the mean of A's
  score over both orders (1 win, 0.5 tie, 0 loss), so a judge that always
  picks the first position scores 0.5 (a tie) instead of a fake win. The
  report shows the share of position-consistent verdicts and how often the
  first position won.
- The first standalone ``0``, ``1`` or ``2`` in the judge's output is its
  answer; an output without one counts as a tie and as *invalid*.

Judges (option ``judge``):

- ``http``: any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM,
  llama-cpp-python's server, ...), called with the standard library.
  ``base_url`` (e.g. ``https://api.openai.com/v1``; env
  ``PERSONAJUDGE_JUDGE_BASE_URL``), ``model`` (env ``PERSONAJUDGE_JUDGE_MODEL``),
  API key from the environment variable named by ``api_key_env`` (default:
  ``PERSONAJUDGE_JUDGE_API_KEY``, else ``OPENAI_API_KEY``; the key is never
  written to the run directory). ``concurrency`` parallel requests, retries
  with backoff on 429/5xx and connection errors.
- ``backend``: any registered backend through :class:`PersonaJudge` with the
  ``base`` method at temperature 0. Without ``backend``/``model`` options it
  reuses the model loaded for the run (the evaluated model judges itself:
  cheap, but biased and weak for small models); ``backend=NAME`` and
  ``model=PATH_OR_ID`` load a separate judge.
- ``auto`` (default): ``http`` when a base URL is configured, else ``backend``.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import Field

from personajudge.api import PersonaJudge
from personajudge.plugins import hookimpl

from ..errors import ScorerError
from .base import PairItem, PairResult, PairwiseScorer, ScorerOptions, ScoringContext

ENV_BASE_URL = "PERSONAJUDGE_JUDGE_BASE_URL"
ENV_MODEL = "PERSONAJUDGE_JUDGE_MODEL"
ENV_API_KEY = "PERSONAJUDGE_JUDGE_API_KEY"

DEFAULT_TEMPLATE = (
    "You are an impartial judge. Compare two responses to the same user question on ONE aspect only, "
    "ignoring every other quality.\n"
    "Aspect: {aspect}\n\n"
    "[Question]\n{prompt}\n\n"
    "[Response 1]\n{response_1}\n\n"
    "[Response 2]\n{response_2}\n\n"
    "Which response is better in this aspect ({aspect_name})? Answer with a single digit: "
    "1 if Response 1 is better, 2 if Response 2 is better, 0 if they are equally good."
)

_ANSWER = re.compile(r"(?<![\d.])[012](?![\d.])")


def parse_verdict(text: str) -> int | None:
    """The first standalone 0, 1 or 2 in ``text``, or None."""
    m = _ANSWER.search(text or "")
    return int(m.group()) if m else None


def a_first(seed: int, key: str) -> bool:
    """Whether response A is shown in position 1 for this item (seeded, order-independent)."""
    return random.Random(f"{seed}|{key}").random() < 0.5


def _score_a(answer: int | None, a_in_first: bool) -> float:
    if answer == 1:
        return 1.0 if a_in_first else 0.0
    if answer == 2:
        return 0.0 if a_in_first else 1.0
    return 0.5


class PairwiseJudgeOptions(ScorerOptions):
    judge: Literal["auto", "http", "backend"] = "auto"
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    backend: str | None = None
    swap: bool = True
    seed: int | None = Field(None, ge=0, description="Order seed; default: the run's seed.")
    max_tokens: int = Field(8, ge=1, le=4096)
    timeout: float = Field(120.0, gt=0)
    retries: int = Field(3, ge=0, le=20)
    concurrency: int = Field(1, ge=1, le=64)
    template: str = DEFAULT_TEMPLATE
    system: str | None = None


class PairwiseJudgeScorer(PairwiseScorer):
    name = "pairwise-judge"
    description = ("LLM judge: which of two responses is better on one aspect (1/2/0), order randomized with a "
                   "seed, position bias checked by swapping; any backend or an OpenAI-compatible endpoint.")
    Options = PairwiseJudgeOptions

    @classmethod
    def validate(cls, options):
        opts = super().validate(options)
        updates: dict[str, Any] = {}
        if opts.base_url is None and os.environ.get(ENV_BASE_URL):
            updates["base_url"] = os.environ[ENV_BASE_URL]
        judge = opts.judge
        if judge == "auto":
            judge = "http" if (updates.get("base_url") or opts.base_url) else "backend"
        updates["judge"] = judge
        if judge == "http":
            if opts.model is None and os.environ.get(ENV_MODEL):
                updates["model"] = os.environ[ENV_MODEL]
            if not (updates.get("base_url") or opts.base_url):
                raise ScorerError(f"scorer '{cls.name}' with judge=http needs a base URL: "
                                  f"set {ENV_BASE_URL} or --scorer-option ALIAS.base_url=URL")
            if not (updates.get("model") or opts.model):
                raise ScorerError(f"scorer '{cls.name}' with judge=http needs a model name: "
                                  f"set {ENV_MODEL} or --scorer-option ALIAS.model=NAME")
        for field in ("response_1", "response_2"):
            if "{" + field + "}" not in opts.template:
                raise ScorerError(f"scorer '{cls.name}': template must contain {{{field}}}")
        return opts.model_copy(update=updates)

    @classmethod
    def config_for(cls, options):
        cfg = super().config_for(options)
        for k in ("base_url", "api_key_env", "timeout", "retries", "concurrency"):  # where, not what
            cfg["options"].pop(k, None)
        return cfg

    def __init__(self, *, judge_fn: Callable[[str], str] | None = None, **options: Any):
        """``judge_fn(prompt_text) -> answer_text`` replaces the model (tests, custom judges)."""
        super().__init__(**options)
        self._judge_fn = judge_fn
        self._pj = None
        self._own_pj = False
        self._seed = self.options.seed if self.options.seed is not None else 0

    # -- judges ---------------------------------------------------------------------------------
    def bind(self, context: ScoringContext) -> None:
        if self.options.seed is None:
            self._seed = context.seed
        if self._judge_fn is not None or self.options.judge != "backend":
            return
        o = self.options
        run = context.run_config
        if o.backend is None and o.model is None:
            if context.pj is not None:  # the run's loaded model judges
                self._pj = context.pj
                return
            cfg = {"backend": run.backend.model_dump()} if run is not None else {}
        else:
            cfg = {"backend": {"name": o.backend or (run.backend.name if run is not None else "llama-cpp"),
                               "model": o.model}}
        self._pj = PersonaJudge(cfg)
        self._own_pj = True

    def _ask_backend(self, text: str) -> str:
        if self._pj is None:
            o = self.options
            self._pj = PersonaJudge({"backend": {"name": o.backend or "llama-cpp", "model": o.model}})
            self._own_pj = True
        res = self._pj.generate(text, preferences=[], views=None, method="base", temperature=0.0,
                                max_new_tokens=self.options.max_tokens, seed=0, stop=[])
        return res.text

    def _api_key(self) -> str | None:
        names = [self.options.api_key_env] if self.options.api_key_env else [ENV_API_KEY, "OPENAI_API_KEY"]
        for n in names:
            if os.environ.get(n):
                return os.environ[n]
        return None

    def _ask_http(self, text: str) -> str:
        o = self.options
        url = o.base_url.rstrip("/") + "/chat/completions"
        messages = ([{"role": "system", "content": o.system}] if o.system else []) + [
            {"role": "user", "content": text}]
        body = json.dumps({"model": o.model, "messages": messages, "temperature": 0, "max_tokens": o.max_tokens,
                           "seed": self._seed}).encode()
        headers = {"Content-Type": "application/json"}
        key = self._api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        delay = 0.5
        for attempt in range(o.retries + 1):
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=o.timeout) as resp:
                    data = json.loads(resp.read().decode("utf-8"))
                try:
                    return data["choices"][0]["message"].get("content") or ""
                except (KeyError, IndexError, TypeError, AttributeError):
                    raise ScorerError(f"judge endpoint {url} returned no choices[0].message: "
                                      f"{json.dumps(data)[:200]}") from None
            except urllib.error.HTTPError as err:
                detail = err.read().decode("utf-8", "replace")[:200].replace("\n", " ")
                if (err.code == 429 or err.code >= 500) and attempt < o.retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                hint = " (check the API key)" if err.code in (401, 403) else ""
                raise ScorerError(f"judge endpoint {url} answered HTTP {err.code}{hint}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                if attempt < o.retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                reason = getattr(err, "reason", err)
                raise ScorerError(f"cannot reach the judge endpoint {url}: {reason}") from None
            except json.JSONDecodeError:
                raise ScorerError(f"judge endpoint {url} did not return JSON") from None
        raise AssertionError("unreachable")

    def ask(self, text: str) -> str:
        """The judge's raw answer to one prompt text."""
        if self._judge_fn is not None:
            return self._judge_fn(text)
        if self.options.judge == "http":
            return self._ask_http(text)
        return self._ask_backend(text)

    # -- protocol -------------------------------------------------------------------------------
    def render(self, item: PairItem, a_in_first: bool) -> str:
        r1, r2 = (item.response_a, item.response_b) if a_in_first else (item.response_b, item.response_a)
        fields = {"prompt": item.prompt, "response_1": r1, "response_2": r2, "aspect": item.aspect,
                  "aspect_name": item.aspect_name or item.aspect}
        out = self.options.template
        for k, v in fields.items():  # plain replace: responses may contain braces
            out = out.replace("{" + k + "}", v)
        return out

    def plan(self, item: PairItem) -> list[bool]:
        """The orders asked for ``item``: True = A in position 1."""
        first = a_first(self._seed, item.key)
        return [first, not first] if self.options.swap else [first]

    def combine(self, orders: list[bool], raw: list[str]) -> PairResult:
        answers = [parse_verdict(t) for t in raw]
        scores = [_score_a(a, o) for a, o in zip(answers, orders)]
        value = sum(scores) / len(scores)
        details: dict[str, Any] = {
            "orders": ["AB" if o else "BA" for o in orders],
            "answers": answers,
            "raw": [t.strip()[:80] for t in raw],
            "invalid": sum(a is None for a in answers),
            "first_position_wins": sum(a == 1 for a in answers),
        }
        if len(orders) == 2:
            details["consistent"] = None not in answers and scores[0] == scores[1]
        return PairResult(value=value, details=details)

    def compare(self, item: PairItem) -> PairResult:
        orders = self.plan(item)
        return self.combine(orders, [self.ask(self.render(item, o)) for o in orders])

    def compare_many(self, items: Sequence[PairItem]) -> list[PairResult]:
        if self.options.judge != "http" or self.options.concurrency == 1 or self._judge_fn is not None:
            return [self.compare(it) for it in items]
        with ThreadPoolExecutor(self.options.concurrency) as pool:
            return list(pool.map(self.compare, items))

    def close(self) -> None:
        if self._own_pj and self._pj is not None:
            self._pj.close()
        self._pj = None


@hookimpl
def register_scorers(register):
    register(PairwiseJudgeScorer)
