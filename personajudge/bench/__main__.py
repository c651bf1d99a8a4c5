"""``python -m personajudge.bench --probe K ...``: the memory probe the bench runs in a fresh process."""

from __future__ import annotations

import argparse
import json
import sys

from personajudge.core.config import RunConfig

from . import memory_probe


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probe", type=int, required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--config-json", required=True)
    a = ap.parse_args(argv)
    cfg = RunConfig.model_validate_json(a.config_json)
    print(json.dumps(memory_probe(cfg, a.prompt, a.probe)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
