"""``personajudge plugins`` and ``personajudge preferences``: what is registered."""

from __future__ import annotations

import argparse
import json

from personajudge.plugins import list_plugins, registry


def cmd_plugins(args: argparse.Namespace) -> int:
    data = list_plugins()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for kind, rows in data.items():
        if kind == "preference":
            print(f"{kind}s: {len(rows)} (list them with `personajudge preferences`)")
            continue
        print(f"{kind}s:")
        width = max((len(r["name"]) for r in rows), default=0)
        for r in rows:
            dist = f"{r['distribution']} {r['version']}".strip() or r["plugin"]
            where = f"{dist}, entry point {r['entry_point']}" if r["entry_point"] else dist
            print(f"  {r['name']:<{width}}  {r['description']}  [{where}]")
    return 0


def cmd_preferences(args: argparse.Namespace) -> int:
    rows = [p for _, p in registry("preference").items()]
    if args.json:
        print(json.dumps([p.model_dump() for p in rows], indent=2))
        return 0
    width = max(len(p.name) for p in rows)
    for p in rows:
        alias = f" (also: {', '.join(p.aliases)})" if p.aliases else ""
        print(f"{p.name:<{width}}  {p.description}{alias}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("plugins", help="list registered backends, encoders, methods, scorers")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("preferences", help="list the named preferences")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_preferences)
