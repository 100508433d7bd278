"""Where a problem came from: one record, written by every path that makes a problem from a model and
read by every consumer.

The writers are :func:`qblock.llm.extract` (an in-memory model) and :func:`qblock.llm.extract_problem`
(a model spec, checkpointed); the readers are ``qblock validate`` (which model to load, which calibration
text to re-make and the token hash it must match), ``qblock prune --recommended``, ``qblock compare``
and the reports. In a problem's metadata the record is flat (``metadata["model"]``,
``metadata["gate"]``, ..., ``metadata["tokens_sha256"]``), next to the energy's own keys.

``model`` is always a dict: ``{"id": ..., "spec": ..., "source": ...}``; ``spec`` is what
:func:`qblock.llm.load_model` takes, or ``"<object>"`` when the problem was made from an in-memory model
(nothing to load). Files written before this record held ``model`` as a plain string (the model's
id) and the token hash only in ``metadata["extraction"]["manifest"]``; :meth:`Provenance.of` reads both.

Example:
    >>> p = Provenance(model={"id": "gpt2", "spec": "<object>"}, num_samples=2, num_tokens=7)
    >>> md = p.metadata()
    >>> md["model"], md["num_tokens"], "seed" in md
    ({'id': 'gpt2', 'spec': '<object>'}, 7, False)
    >>> Provenance.of(md) == p, Provenance.of(md).model_spec, Provenance.of({"model": "gpt2"}).model_name
    (True, None, 'gpt2')
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping

__all__ = ["Provenance", "OBJECT_SPEC", "model_record", "tokens_sha256"]

#: the ``spec`` of a model that was passed as an object (it cannot be loaded again from the record)
OBJECT_SPEC = "<object>"


def tokens_sha256(samples: Iterable[Any]) -> str:
    """The hash of calibration samples (1-D token-id tensors or arrays), in order.

    Kept with the problem, so a consumer that re-makes the calibration samples (``qblock validate``)
    can check it got the same tokens.

    Example:
        >>> import numpy as np
        >>> tokens_sha256([np.array([1, 2]), np.array([3])]) == tokens_sha256([np.array([1, 2]), np.array([3])])
        True
        >>> tokens_sha256([np.array([1, 2])]) == tokens_sha256([np.array([1]), np.array([2])])
        False
    """
    import numpy as np

    h = hashlib.sha256()
    for s in samples:
        arr = s.cpu().numpy() if hasattr(s, "cpu") else s
        h.update(np.asarray(arr, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def model_record(model: Any) -> dict[str, Any]:
    """A recorded model as the one dict shape (an old plain string is an id with nothing to load).

    Example:
        >>> model_record("gpt2"), model_record(None)
        ({'id': 'gpt2', 'spec': '<object>'}, {})
    """
    if isinstance(model, Mapping):
        return dict(model)
    if model is None:
        return {}
    return {"id": str(model), "spec": OBJECT_SPEC}


@dataclass(frozen=True)
class Provenance:
    """How a problem was made from a model (see the module docstring).

    Attributes:
        model: ``{"id", "spec", "source", ...}`` (:func:`qblock.llm.models.model_provenance`).
        gate, granularity: the gates the energy was measured with (:func:`qblock.llm.gated`).
        num_samples, seq_len, num_tokens: calibration counts.
        dtype, batch_size, seed: the extraction's settings (``None``: not recorded).
        data: the calibration data's provenance (:func:`qblock.llm.data.calibration_and_eval`).
        tokens_sha256: :func:`tokens_sha256` of the calibration samples.
        num_blocks: the model's number of blocks.
    """

    model: dict[str, Any]
    gate: str = "layer"
    granularity: str = "block"
    dtype: str | None = None
    num_samples: int | None = None
    seq_len: int | None = None
    num_tokens: int | None = None
    batch_size: int | None = None
    seed: int | None = None
    data: dict[str, Any] | None = None
    tokens_sha256: str | None = None
    num_blocks: int | None = None

    def metadata(self) -> dict[str, Any]:
        """The record as problem metadata keys (fields that are ``None`` are left out)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def of(cls, metadata: Mapping[str, Any] | None) -> "Provenance":
        """The record in a problem's metadata (any version of the file; missing keys are ``None``)."""
        md = dict(metadata or {})
        kw = {f.name: md.get(f.name) for f in fields(cls) if f.name in md}
        kw["model"] = model_record(md.get("model"))
        if not kw.get("tokens_sha256"):  # files written before the hash was kept at the top level
            manifest = (md.get("extraction") or {}).get("manifest") or {}
            kw["tokens_sha256"] = manifest.get("tokens_sha256")
        for key in ("gate", "granularity"):
            if kw.get(key) is None:
                kw.pop(key, None)
        return cls(**kw)

    @property
    def model_spec(self) -> str | None:
        """What to load the model with again, or ``None`` when the record has nothing loadable."""
        spec = self.model.get("spec")
        return None if not spec or spec == OBJECT_SPEC else str(spec)

    @property
    def model_name(self) -> str | None:
        """A short name of the model (its id, else its spec)."""
        return self.model.get("id") or self.model.get("spec")
