"""Backend-neutral core: acceptance algebra, transforms, scheduler, loops, config.

Imports neither torch nor llama_cpp; array code goes through the array API so
it runs on whatever array type the backend returns.
"""

from .acceptance import accept_mask, count_accepted, judge_token, residual, sample_from, verify_window
from .config import BackendConfig, DecodingConfig, RunConfig, build_config, load_config_file
from .contract import Backend, Session, Tokenizer
from .decoding import DecodeRequest, Forward, Truncate, drive, drive_many, persona_judge_loop, plain_loop
from .errors import (
    BackendUnavailableError,
    ConfigError,
    ContextLengthError,
    DeviceError,
    ModelLoadError,
    PersonaJudgeError,
    PluginError,
    PreferenceError,
    UnknownPluginError,
)
from .methods import Method
from .result import GenerationResult, Stats
from .scheduler import RoleScheduler
from .stopping import Emitter
from .transforms import SamplingParams, filtered_probs

__all__ = [
    "accept_mask",
    "count_accepted",
    "judge_token",
    "residual",
    "sample_from",
    "verify_window",
    "BackendConfig",
    "DecodingConfig",
    "RunConfig",
    "build_config",
    "load_config_file",
    "Backend",
    "Session",
    "Tokenizer",
    "DecodeRequest",
    "Forward",
    "Truncate",
    "drive",
    "drive_many",
    "persona_judge_loop",
    "plain_loop",
    "BackendUnavailableError",
    "ConfigError",
    "ContextLengthError",
    "DeviceError",
    "ModelLoadError",
    "PersonaJudgeError",
    "PluginError",
    "PreferenceError",
    "UnknownPluginError",
    "Method",
    "GenerationResult",
    "Stats",
    "RoleScheduler",
    "Emitter",
    "SamplingParams",
    "filtered_probs",
]
