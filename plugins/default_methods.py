"""Registers the built-in decoding methods through the public hook.

``pad`` is registered with reward-model support: the core's PAD takes its
reward policy from a session, and only this layer can turn a backend config
into a loaded model.
"""

from __future__ import annotations

import json
from typing import Any

from personajudge.core.config import BackendConfig
from personajudge.core.errors import ConfigError
from personajudge.core.methods import BUILTIN_METHODS, Pad

from .hookspecs import hookimpl

_REWARD_MODELS: dict[str, Any] = {}


class PadWithRewardModel(Pad):
    """Options: ``weight``, ``beta``, ``k``, and ``reward_model``: a backend config
    (``{name = "hf", model = "...", options = {adapter = "..."}}``) for PAD's
    personalized reward model; omitted, the preference-prompted view of the
    same model stands in for it. The reward model must share the tokenizer."""

    def __init__(self, weight: float = 1.0, beta: float = 1.0, k: int | None = None,
                 reward_model: dict[str, Any] | None = None):
        super().__init__(weight, beta, k)
        if reward_model is not None:
            try:
                reward_model = BackendConfig.model_validate(reward_model)
            except Exception as err:
                raise ConfigError(f"method_options.reward_model: {str(err).splitlines()[-1].strip()}") from None
        self.reward_model = reward_model

    @property
    def batchable(self) -> bool:
        return self.reward_model is None

    def reward_session(self):
        if self.reward_model is None:
            return None
        from .api import load_backend

        key = json.dumps(self.reward_model.model_dump(), sort_keys=True)
        backend = _REWARD_MODELS.get(key)
        if backend is None:  # loaded once per process, like the main model
            backend = _REWARD_MODELS[key] = load_backend(self.reward_model)
        return backend.open(1)


@hookimpl
def register_methods(register):
    for cls in BUILTIN_METHODS:
        register(PadWithRewardModel if cls is Pad else cls)
