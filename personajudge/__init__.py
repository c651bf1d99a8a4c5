"""persona-judge: personalize what a language model writes at decoding time.

    import personajudge as pj

    result = pj.generate("Why is the sky blue?", preferences=["concise", "humor"])
    print(result.text, result.stats.acceptance_rate)

    model = pj.PersonaJudge({"backend": {"name": "llama-cpp"}})   # load once, generate many
    for piece in model.stream("Tell me about owls", preferences=["friendly"]):
        print(piece, end="")

The layers, each importing only those before it:
``personajudge.core`` (the algebra, loops, contract, config) <-
``personajudge.backends`` and ``personajudge.preferences`` <-
``personajudge.plugins`` (hook specs, manager, the built-ins' registrations) <-
this package's API (:mod:`personajudge.api`) <- the CLI (:mod:`personajudge.cli`),
the evaluation harness (:mod:`personajudge.evaluation`), the bench and the
plugin author's kit (:mod:`personajudge.testing`).
"""

from importlib.metadata import PackageNotFoundError, version

from personajudge.core.config import BackendConfig, DecodingConfig, RunConfig, build_config, load_config_file
from personajudge.core.contract import Backend, ForwardCall, Session, Tokenizer
from personajudge.core.decoding import DecodeRequest, Forward, Truncate
from personajudge.core.errors import (
    BackendUnavailableError,
    ChatTemplateError,
    ChatTemplateFatalError,
    ConfigError,
    ContextLengthError,
    DeviceError,
    ModelLoadError,
    NumericalError,
    PersonaJudgeError,
    PersonaJudgeWarning,
    PluginError,
    PreferenceError,
    PromptTokenError,
    SessionError,
    TooManyViewsError,
    UnknownPluginError,
    UnknownPreferenceError,
)
from personajudge.core.files import OutputError
from personajudge.core.methods import Method
from personajudge.core.result import GenerationResult, Stats
from personajudge.plugins import PluginWarning, hookimpl, list_plugins, register_plugin, unregister_plugin
from personajudge.preferences import Encoder, EncoderOptions, Preference

from .api import PersonaJudge, generate, stream
from .engine import EngineClosedError, EngineFailedError, QueueFullError, RequestCancelled

try:
    __version__ = version("persona-judge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    # the API
    "PersonaJudge",
    "generate",
    "stream",
    "GenerationResult",
    "Stats",
    # configuration
    "RunConfig",
    "BackendConfig",
    "DecodingConfig",
    "build_config",
    "load_config_file",
    # writing plugins
    "hookimpl",
    "register_plugin",
    "unregister_plugin",
    "list_plugins",
    "Backend",
    "Session",
    "ForwardCall",
    "Tokenizer",
    "Encoder",
    "EncoderOptions",
    "Method",
    "DecodeRequest",
    "Forward",
    "Truncate",
    "Preference",
    # errors and warnings
    "PersonaJudgeError",
    "ConfigError",
    "TooManyViewsError",
    "UnknownPluginError",
    "PluginError",
    "PreferenceError",
    "UnknownPreferenceError",
    "ModelLoadError",
    "BackendUnavailableError",
    "ContextLengthError",
    "PromptTokenError",
    "DeviceError",
    "SessionError",
    "NumericalError",
    "ChatTemplateError",
    "ChatTemplateFatalError",
    "QueueFullError",
    "EngineClosedError",
    "EngineFailedError",
    "RequestCancelled",
    "OutputError",
    "PersonaJudgeWarning",
    "PluginWarning",
]
