"""``python -m personajudge.bench --probe K ...``: the memory probe the bench runs in a fresh process."""

from __future__ import annotations

import argparse
import json
import sys

from personajudge.core.config import RunConfig
from personajudge.preferences import Preference

from . import memory_probe


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probe", type=int, required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--config-json", required=True)
    ap.add_argument("--views-json", help="the views, resolved (lists of Preference objects as JSON)")
    a = ap.parse_args(argv)
    cfg = RunConfig.model_validate_json(a.config_json)
    groups = [[Preference.model_validate(p) for p in v] for v in json.loads(a.views_json)] if a.views_json else None
    print(json.dumps(memory_probe(cfg, a.prompt, a.probe, groups)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
