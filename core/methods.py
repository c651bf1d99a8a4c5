"""Decoding methods: which views to build and which loop to run.

A method turns the user's preference views into the views it actually
prompts (``plan``) and then decodes (``decode``). The built-in ones are
registered through the ``register_methods`` hook like any plugin's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Annotated, Any, ClassVar, Protocol, runtime_checkable

from pydantic import ConfigDict, Field

from .config import Options, take_options
from .contract import Session
from .decoding import DecodeRequest, Loop, drive, persona_judge_loop, plain_loop
from .mod import mod_loop, normalize_weights
from .nocache import NoCacheSession
from .pad import pad_loop
from .routed import RoutedSession

#: A view is the list of preferences its prefix carries (opaque to the core).
View = list[Any]


@runtime_checkable
class Method(Protocol):
    """A decoding method, registered through ``register_methods``: which views it prompts (``plan``) and
    the loop that decodes one request with them (``loop``, a generator of ``Forward``/``Truncate`` ops, so
    the engine can batch many requests in one forward). ``decode`` is optional: a method that must run
    alone drives its own loop there and sets ``batchable = False``."""

    name: ClassVar[str]
    description: ClassVar[str]

    def plan(self, views: Sequence[View]) -> list[View]:
        """The views this method prompts, given the user's preference views."""
        ...

    def loop(self, req: DecodeRequest) -> Loop:
        """The decoding loop for one request (a generator of backend ops).

        Loops yield ops instead of calling the session, so one driver can run
        many requests in lockstep with one batched forward per step.
        """
        ...

    def decode(self, session: Session, req: DecodeRequest) -> None:
        """Generate into ``req.emitter`` (usually ``drive(session, self.loop(req))``)."""
        ...


class _Driven:
    loop: Callable[[DecodeRequest], Loop]  # each method defines its loop

    def decode(self, session: Session, req: DecodeRequest) -> None:
        drive(session, self.loop(req))


class PersonaJudge(_Driven):
    name = "persona-judge"
    description = "Views draft and judge each other; roles alternate every iteration."
    roles = "alternate"
    #: below this many views the method degenerates (to plain sampling of the one view)
    min_views = 2
    #: the engine may run this method's interleaved schedule in
    #: :class:`~personajudge.core.batched.BatchedJudge` (same tokens, one host read per step for
    #: all such requests); a subclass that overrides ``loop`` is not taken for one unless it says so again
    batched = True

    def plan(self, views: Sequence[View]) -> list[View]:
        return [list(v) for v in views] or [[]]

    def loop(self, req: DecodeRequest) -> Loop:
        return persona_judge_loop(req if req.roles is not None else dataclasses.replace(req, roles=self.roles))


class PersonaJudgeBase(PersonaJudge):
    name = "persona-judge-base"
    description = "Persona-judge with fixed roles: the first view drafts, the second judges."
    roles = "fixed"


class Reference(PersonaJudge):
    name = "reference"
    description = "Persona-judge without KV cache, batch size 1, literal window: the correctness oracle (slow)."

    batchable = False
    batched = False

    def loop(self, req: DecodeRequest) -> Loop:
        return super().loop(dataclasses.replace(req, schedule="windowed"))

    def decode(self, session: Session, req: DecodeRequest) -> None:
        drive(NoCacheSession(session), self.loop(req))


def _flat(views: Sequence[View]) -> View:
    """The preferences of all ``views`` as one view, each once (first place kept): a preference two
    views share (``--view concise,humor --view concise``) would otherwise be shown twice in it."""
    out: View = []
    for v in views:
        out.extend(p for p in v if p not in out)
    return out


class Prompt(_Driven):
    """Its one view carries every preference of the user's views once (a preference two views share
    appears once)."""

    name = "prompt"
    description = "Direct prompting: all preferences in one prompt, plain sampling."

    def plan(self, views: Sequence[View]) -> list[View]:
        return [_flat(views)]

    def loop(self, req: DecodeRequest) -> Loop:
        return plain_loop(req)


class Base(_Driven):
    name = "base"
    description = "No preferences: the prompt alone, plain sampling."
    #: the API warns when preferences are given to a method that ignores them
    uses_preferences = False

    def plan(self, views: Sequence[View]) -> list[View]:
        return [[]]

    def loop(self, req: DecodeRequest) -> Loop:
        return plain_loop(req)


class _ModOptions(Options):
    model_config = ConfigDict(strict=False)  # a tuple or numpy floats are fine here
    weights: list[Annotated[float, Field(ge=0.0)]] | None = Field(None, min_length=1)


class _PadOptions(Options):
    # finite and bounded: NaN or an overflowing w * beta would turn every score into NaN
    weight: float = Field(1.0, ge=-1e6, le=1e6)
    beta: float = Field(1.0, ge=-1e6, le=1e6)
    k: int | None = Field(None, ge=1)


class Mod(_Driven):
    """Options: ``weights`` (one per view; default the preferences' weights)."""

    name = "mod"
    description = "MOD-style logit mixing: sample from the weighted mixture of the views' log-probabilities."
    min_views = 2

    def __init__(self, weights: Sequence[float] | None = None):
        opts = take_options({"weights": weights}, _ModOptions, owner=self.name, where="method_options")
        self.weights = opts["weights"]

    def plan(self, views: Sequence[View]) -> list[View]:
        planned = [list(v) for v in views] or [[]]
        if self.weights is None:
            self.weights = [sum(getattr(p, "weight", 1.0) for p in v) or 1.0 for v in planned]
        else:  # one weight per view: said as the views are planned (before the model loads, where they are known)
            normalize_weights(self.weights, len(planned))
        return planned

    def loop(self, req: DecodeRequest) -> Loop:
        return mod_loop(req, self.weights or [1.0] * len(req.contexts))


class Pad(_Driven):
    """Options: ``weight`` (w, default 1.0), ``beta`` (default 1.0), ``k`` (candidates; default: top_k or 10).

    The reward policy pi_rm is the preference-prompted view of the same model
    (training-free) unless a subclass supplies ``reward_session()``: a session
    of a separate personalized reward model sharing the tokenizer, to which
    the preference view is then routed. The preference view carries every preference of the user's
    views once (a preference two views share appears once), as ``prompt``'s does.
    """

    name = "pad"
    description = (
        "PAD-style reward-guided decoding: re-rank the base view's top-k by a token-level "
        "personalized reward (default: the preference-prompted view as reward policy)."
    )

    def __init__(self, weight: float = 1.0, beta: float = 1.0, k: int | None = None):
        opts = take_options(
            {"weight": weight, "beta": beta, "k": k}, _PadOptions, owner=self.name, where="method_options"
        )
        self.weight, self.beta, self.k = float(opts["weight"]), float(opts["beta"]), opts["k"]

    def reward_session(self) -> Session | None:
        return None

    def plan(self, views: Sequence[View]) -> list[View]:
        return [[], _flat(views)]

    def loop(self, req: DecodeRequest) -> Loop:
        k = self.k if self.k is not None else (req.params.top_k or 10)
        return pad_loop(req, weight=self.weight, beta=self.beta, k=k)

    def decode(self, session: Session, req: DecodeRequest) -> None:
        rm = self.reward_session() if self.weight != 0 else None
        if rm is None:
            drive(session, self.loop(req))
            return
        with rm:
            drive(RoutedSession(session, rm, routed=[1]), self.loop(req))


BUILTIN_METHODS = (PersonaJudge, PersonaJudgeBase, Prompt, Base, Reference, Mod, Pad)
