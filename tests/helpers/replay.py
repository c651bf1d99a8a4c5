"""Rebuilding a run's config from what the run reports (``GenerationResult.settings``, ``--json``, a
batch row): the README says a run can be repeated exactly from its settings, and tests check it."""

from __future__ import annotations

import json
from typing import Any


def config_from_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The config someone would rebuild from a run's ``settings`` alone (after a JSON round trip, as a
    file or a server would carry them)."""
    s = json.loads(json.dumps(settings))
    return {
        "backend": {"name": s["backend"], "options": s["backend_options"]},
        "method": s["method"],
        "method_options": s["method_options"],
        "views": s["views"],
        "encoder": s["encoder"],
        "encoder_options": s["encoder_options"],
        "system": s["system"],
        "decoding": dict(s["decoding"]),
    }
