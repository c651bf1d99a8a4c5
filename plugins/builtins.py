"""The project's own backends, encoders, methods and preferences, registered
through the same hooks a third-party plugin uses.

``pad`` is registered with reward-model support: the core's PAD takes its
reward policy from a session, and only the plugin layer can turn a backend
config into a loaded model.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from personajudge.backends.hf import HFBackend
from personajudge.backends.llama_cpp import LlamaCppBackend
from personajudge.backends.toy import ToyBackend
from personajudge.core.config import BackendConfig, validation_message
from personajudge.core.errors import ConfigError, UnknownPluginError
from personajudge.core.methods import BUILTIN_METHODS, Pad
from personajudge.preferences import BUILTIN_ENCODERS, builtin_preferences

from .hookspecs import hookimpl
from .manager import get_backend_class, load_backend

_REWARD_MODELS: dict[str, Any] = {}
_REWARD_LOCK = threading.Lock()


class PadWithRewardModel(Pad):
    """Options: ``weight``, ``beta``, ``k``, and ``reward_model``: a backend config
    (``{name = "hf", model = "...", options = {adapter = "..."}}``) for PAD's
    personalized reward model; omitted, the preference-prompted view of the
    same model stands in for it. The reward model must share the tokenizer."""

    def __init__(
        self, weight: float = 1.0, beta: float = 1.0, k: int | None = None, reward_model: dict[str, Any] | None = None
    ):
        super().__init__(weight, beta, k)
        self.reward_model: BackendConfig | None = None
        if reward_model is not None:
            try:
                self.reward_model = BackendConfig.model_validate(reward_model)
            except Exception as err:
                raise ConfigError(f"method_options.reward_model: {validation_message(err)}") from None
            try:  # a name no plugin registered can never load: said now, before either model loads
                get_backend_class(self.reward_model.name)
            except UnknownPluginError as err:
                raise ConfigError(f"method_options.reward_model: {err}") from None

    @property
    def batchable(self) -> bool:
        return self.reward_model is None

    def reward_session(self):
        if self.reward_model is None:
            return None
        key = json.dumps(self.reward_model.model_dump(), sort_keys=True)
        with _REWARD_LOCK:  # loaded once per process, like the main model
            backend = _REWARD_MODELS.get(key)
            if backend is None:
                backend = _REWARD_MODELS[key] = load_backend(self.reward_model)
        return backend.open(1)


@hookimpl
def register_backends(register):
    for cls in (ToyBackend, LlamaCppBackend, HFBackend):
        register(cls)


@hookimpl
def register_encoders(register):
    for cls in BUILTIN_ENCODERS:
        register(cls)


@hookimpl
def register_methods(register):
    for cls in BUILTIN_METHODS:
        register(PadWithRewardModel if cls is Pad else cls)


@hookimpl
def register_preferences(register):
    for pref in builtin_preferences():
        register(pref)
