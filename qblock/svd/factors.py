"""SVD of the decoder's linear weights (plain or activation-whitened) and PivGa gauge-fixed factors.

For a weight ``W`` (``m x n``, output x input) the *plain* factorisation is the SVD
``W = U diag(s) V^T``; truncating it to rank ``r`` minimises ``||W - W_r||_F``. The *whitened* one
(as SVD-LLM does) first takes the input activations' second moment ``C = X^T X / T`` on calibration
data and its Cholesky factor ``C = S S^T``, then the SVD ``W S = U diag(s) V^T``; with
``B = V^T S^{-1}`` the product ``W = U diag(s) B`` is exact, and truncating it minimises the output
error on the calibration activations, ``||(W - W_r) X^T||_F`` (a small ridge, ``damp`` times the
mean of ``diag C``, keeps ``S`` invertible). Both are held as :class:`Factorisation`:
``W(g) = U diag(s * g) B``.

PivGa: a rank-``r`` product ``A B`` (``A`` ``m x r``, ``B`` ``r x n``) is stored gauge-fixed. Pick ``r``
rows of ``A`` that form a well-conditioned block ``A_P`` (QR with column pivoting of ``A^T``); then
``A B = (A A_P^{-1}) (A_P B)``, where the first factor has the identity in rows ``P``. Only its other
``m - r`` rows (``C``) and ``B' = A_P B`` are stored, ``r (m + n) - r^2`` numbers in all, plus the
``r`` row indices ``P``. The pair is lossless up to rounding.

Example:
    >>> import torch
    >>> W = torch.randn(6, 4, dtype=torch.float64)
    >>> f = Factorisation.plain("w", W)
    >>> bool(torch.allclose(f.weight(), W))
    True
    >>> P, C, B = pivga(f.U[:, :2] * f.s[:2], f.B[:2])
    >>> C.shape, B.shape, C.numel() + B.numel() == 2 * (6 + 4) - 2 * 2
    (torch.Size([4, 2]), torch.Size([2, 4]), True)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

__all__ = ["Factorisation", "find_linears", "input_moments", "factorise", "pivga", "pivga_weight",
           "pivga_count"]


def _torch():
    from qblock._lazy import require

    return require("torch", "llm")


@dataclass
class Factorisation:
    """``W = U diag(s) B`` for one linear weight (float64 tensors); ``rank = len(s)``, the numerical rank of
    ``W`` (singular values that are rounding noise are dropped; a zero matrix has rank 0)."""

    name: str
    U: Any  # (m, R)
    s: Any  # (R,)
    B: Any  # (R, n)
    whitened: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.U.shape[0]), int(self.B.shape[1])

    @property
    def rank(self) -> int:
        return int(self.s.numel())

    @classmethod
    def plain(cls, name: str, W) -> "Factorisation":
        torch = _torch()
        U, s, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        k = _numerical_rank(s, W.shape)
        return cls(name, U[:, :k], s[:k], Vh[:k])

    @classmethod
    def whitened_by(cls, name: str, W, moment, damp: float = 1e-4) -> "Factorisation":
        """SVD of ``W S`` with ``S S^T = moment + damp * mean(diag) I``; ``B = V^T S^{-1}``."""
        torch = _torch()
        C = moment.double()
        C = C + damp * float(C.diagonal().mean().clamp_min(1e-12)) * torch.eye(C.shape[0], dtype=C.dtype)
        S = torch.linalg.cholesky(C)
        U, s, Vh = torch.linalg.svd(W.double() @ S, full_matrices=False)
        k = _numerical_rank(s, W.shape)
        B = torch.linalg.solve_triangular(S, Vh[:k], upper=False, left=False)  # Vh S^{-1}
        return cls(name, U[:, :k], s[:k], B, whitened=True)

    def weight(self, keep: Any = None):
        """``U diag(s * keep) B`` (``keep``: a 0/1 or soft vector over the singular values; default all)."""
        s = self.s if keep is None else self.s * keep
        return (self.U * s) @ self.B

    def truncated(self, r: int):
        """The rank-``r`` weight ``U_r diag(s_r) B_r``."""
        return (self.U[:, :r] * self.s[:r]) @ self.B[:r]


def _numerical_rank(s, shape: tuple[int, ...]) -> int:
    """Singular values above ``max(m, n) * eps * s_max`` (as ``numpy.linalg.matrix_rank``).

    The rest are rounding noise of a rank-deficient matrix: kept, they would make the PivGa block
    ``A_P`` singular (a zero projection would not factorise at all); dropped, its rank is the true one
    (0 for a zero matrix), which caps every allocation.
    """
    torch = _torch()
    if s.numel() == 0:
        return 0
    tol = max(shape) * torch.finfo(s.dtype).eps * float(s.max())
    return int((s > tol).sum())


def find_linears(model) -> list[tuple[str, Any]]:
    """Every ``nn.Linear`` inside the decoder blocks (attention and MLP projections), in order.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
        >>> [n.split(".", 3)[-1] for n, _ in find_linears(m)]
        ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj', 'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj']
    """
    torch = _torch()
    from qblock.llm.blocks import find_blocks

    out = []
    for bname, block in find_blocks(model):
        for name, mod in block.named_modules():
            if isinstance(mod, torch.nn.Linear):
                out.append((f"{bname}.{name}", mod))
    if not out:
        raise ValueError(f"no nn.Linear layers found in the decoder blocks of {type(model).__name__}")
    return out


@contextmanager
def _moment_hooks(linears: Sequence[tuple[str, Any]], store: dict) -> Iterator[None]:
    """Forward hooks adding ``x^T x`` of each linear's input to ``store[name]`` (shared inputs computed once)."""
    torch = _torch()
    last: dict[str, Any] = {"x": None, "gram": None}  # q/k/v (gate/up) get the very same input tensor

    def hook(name):
        def fn(mod, args):
            if args[0] is not last["x"]:  # identity, not address: a freed tensor's memory is reused
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                last["x"], last["gram"], last["tokens"] = args[0], x.T @ x, x.shape[0]
            store[name] = store.get(name, 0) + last["gram"]
            store["__tokens__." + name] = store.get("__tokens__." + name, 0) + last["tokens"]
        return fn

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in linears]
    try:
        with torch.no_grad():
            yield
    finally:
        last.clear()
        for h in handles:
            h.remove()


def input_moments(model, samples: Sequence[Any], linears=None, *, progress: bool = False) -> dict[str, Any]:
    """``X^T X / T`` of every decoder linear's input over the calibration ``samples`` (float64)."""
    torch = _torch()
    from tqdm.auto import tqdm

    linears = find_linears(model) if linears is None else linears
    store: dict[str, Any] = {}
    with _moment_hooks(linears, store):
        for ids in tqdm(samples, desc="activation moments", disable=not progress, leave=False):
            model(input_ids=torch.as_tensor(ids).reshape(1, -1), use_cache=False)
    return {name: store[name] / store["__tokens__." + name] for name, _ in linears}


def factorise(model, samples: Sequence[Any] | None = None, *, whiten: bool = True, damp: float = 1e-4,
              progress: bool = False) -> list[Factorisation]:
    """:class:`Factorisation` of every decoder linear, plain or whitened on ``samples``.

    Raises:
        ValueError: ``whiten`` without calibration ``samples``.
    """
    from tqdm.auto import tqdm

    if whiten and not samples:  # before input_moments, which fails on None or no samples less clearly
        raise ValueError("whitened SVD needs calibration samples")
    linears = find_linears(model)
    moments = input_moments(model, samples, linears, progress=progress) if whiten else {}
    out = []
    for name, mod in tqdm(linears, desc="SVD", disable=not progress, leave=False):
        W = mod.weight.detach()
        out.append(Factorisation.whitened_by(name, W, moments[name], damp) if whiten else Factorisation.plain(name, W))
    return out


def pivga(A, B):
    """Gauge-fixed factors of ``A B``: ``(P, C, B')`` with ``A B = [rows P: B'; other rows: C B']``.

    ``P`` (``r`` int64 row indices) comes from QR with column pivoting of ``A^T``; ``C = A_rest A_P^{-1}``
    (``(m - r) x r``), ``B' = A_P B`` (``r x n``).
    """
    torch = _torch()
    import scipy.linalg

    m, r = A.shape
    if r == 0:
        return torch.zeros(0, dtype=torch.long), A.new_zeros((m, 0)), B.new_zeros((0, B.shape[1]))
    _, _, piv = scipy.linalg.qr(A.T.double().cpu().numpy(), mode="economic", pivoting=True)
    P = torch.as_tensor(piv[:r].copy(), dtype=torch.long)
    rest = torch.as_tensor(sorted(set(range(m)) - set(piv[:r].tolist())), dtype=torch.long)
    AP = A[P].double()
    C = torch.linalg.solve(AP, A[rest].double(), left=False)  # A_rest A_P^{-1}
    return P, C, AP @ B.double()


def pivga_weight(P, C, B, m: int):
    """The dense ``m x n`` weight of gauge-fixed factors (in their dtype)."""
    torch = _torch()
    W = B.new_zeros((m, B.shape[1]))
    rest = torch.as_tensor(sorted(set(range(m)) - set(P.tolist())), dtype=torch.long)
    if P.numel():
        W[P] = B
        W[rest] = C @ B
    return W


def pivga_count(r: int, m: int, n: int) -> int:
    """Numbers stored for a rank-``r`` ``m x n`` pair: ``r (m + n) - r^2``.

    Example:
        >>> pivga_count(2, 6, 4)
        16
    """
    return r * (m + n) - r * r
