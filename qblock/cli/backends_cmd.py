"""``qblock backends``: list the solver backends and whether they can run here."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backends", help="list solver backends and their availability")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qblock import backends

    if args.json:
        print(json.dumps(backends.available(), indent=2))
    else:
        print(backends.describe())
    return 0
