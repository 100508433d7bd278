"""Evaluate removal candidates on one loaded model, without reloading it.

A candidate (a set of removed blocks) is applied with :func:`qblock.llm.gates.mask_blocks`, a
reversible context manager that turns the blocks into pass-throughs, so hundreds of candidates can be
scored on the same model object.

* :func:`heldout_loss`: token-weighted mean next-token negative log-likelihood over evaluation
  samples (padding never counted); perplexity is ``exp(loss)``.
* :func:`multiple_choice`: zero-shot multiple-choice accuracy by log-likelihood, as
  lm-evaluation-harness scores such tasks: the log-probability of each answer continuation given the
  context is summed; ``acc`` takes the argmax of the sum, ``acc_norm`` of the sum divided by the
  answer's length in characters (without a leading delimiter space, as lm-eval counts it).
* :class:`CandidateEvaluator`: both, with a cache keyed by the removal set.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> torch.manual_seed(0) and None
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2)).eval()
    >>> samples = [torch.randint(0, 50, (12,)) for _ in range(3)]
    >>> ev = CandidateEvaluator(model, samples)
    >>> full, pruned = ev.evaluate([]), ev.evaluate([1])
    >>> full["eval_tokens"], bool(full["heldout_loss"] != pruned["heldout_loss"])
    (33, True)
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from qblock._lazy import require
from qblock.problems.block_removal import removal_key

__all__ = ["heldout_loss", "multiple_choice", "encode_choices", "CandidateEvaluator", "PrefixCache", "prefix_order",
           "sample_tokens", "model_device"]


def _torch():
    return require("torch", "llm")


def model_device(model):
    """The device of the model's first parameter (where inputs must go)."""
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return _torch().device("cpu")


def _batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None):
    """Index batches over items sorted by length (longest first), so padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        longest = lengths[batch[0]] if batch else lengths[i]
        if batch and (len(batch) >= batch_size or (max_tokens and longest * (len(batch) + 1) > max_tokens)):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _pad(seqs, pad_id: int = 0):
    torch = _torch()
    T = max(int(s.numel()) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : s.numel()] = s
        mask[b, : s.numel()] = 1
    return ids, mask


def heldout_loss(model, samples: Sequence[Any], *, batch_size: int = 8, max_tokens: int | None = 8192,
                 progress: bool = False, desc: str = "held-out loss",
                 around_batch: Callable[[int], Any] | None = None,
                 sample_sums: list[float] | None = None) -> tuple[float, int]:
    """Token-weighted mean next-token NLL of ``model`` on ``samples`` (1-D token-id tensors).

    Every sample contributes ``len - 1`` predicted tokens; the loss is the sum of their NLLs divided by
    the total count, so long samples weigh more (the standard perplexity convention).

    ``around_batch(k)``, if given, returns a context manager entered around the forward pass of batch
    ``k`` (batches are deterministic for given samples; :class:`PrefixCache` uses this).

    ``sample_sums``, if given, is extended with each sample's NLL sum, in the order of the samples (those
    of two or more tokens): what paired comparisons of two removal sets on the same samples need.

    Returns:
        ``(mean_nll, num_predicted_tokens)``.

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)).eval()
        >>> loss, n = heldout_loss(m, [torch.arange(10), torch.arange(5)])
        >>> n, bool(loss > 0)
        (13, True)
    """
    torch = _torch()
    samples = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in samples]
    samples = [s for s in samples if s.numel() >= 2]
    if not samples:
        raise ValueError("heldout_loss needs at least one sample of two or more tokens")
    dev = model_device(model)
    total, count = 0.0, 0
    per = [0.0] * len(samples)
    batches = list(_batches([s.numel() for s in samples], batch_size, max_tokens))
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc=desc, unit="batch", leave=False)
    with torch.inference_mode():
        for k, b in enumerate(it):
            ids, mask = _pad([samples[i] for i in b])
            ids, mask = ids.to(dev), mask.to(dev)
            with (around_batch(k) if around_batch is not None else contextlib.nullcontext()):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            sums = _nll_sums(logits, ids, mask)
            for i, v in zip(b, sums.tolist()):
                per[i] = v
            total += float(sums.sum())
            count += int(mask[:, 1:].sum())
    if sample_sums is not None:
        sample_sums.extend(per)
    return total / count, count


def sample_tokens(samples: Sequence[Any]) -> list[int]:
    """Next-token predictions of each sample that has any (two or more tokens, as :func:`heldout_loss` keeps
    them): the weights of per-sample losses, in their order.

    Example:
        >>> sample_tokens([[5, 6, 7], [8], [1, 2]])
        [2, 1]
    """
    sizes = (int(s.numel()) if hasattr(s, "numel") else len(s) for s in samples)
    return [n - 1 for n in sizes if n >= 2]


def forward_tokens(samples: Sequence[Any]) -> int:
    """Tokens one forward pass over ``samples`` runs on: every token of each sample with two or more (the
    ones :func:`heldout_loss` keeps; a one-token sample predicts nothing and is never run). The one count of
    selection cost.

    Example:
        >>> forward_tokens([[5, 6, 7], [8], [1, 2]])
        5
    """
    return sum(t + 1 for t in sample_tokens(samples))  # a sample of n >= 2 tokens predicts n - 1


def _nll_sums(logits, ids, mask):
    """Each row's sum of next-token NLLs over its real targets, float64 (:func:`qblock.llm.gradients.nll_sums`)."""
    from qblock.llm.gradients import nll_sums

    return nll_sums(logits, ids, mask)[0].double()


def _encode(tokenizer, text: str) -> list[int]:
    if hasattr(tokenizer, "encode"):
        try:
            return list(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return list(tokenizer.encode(text))
    return list(tokenizer(text)["input_ids"])


def encode_choices(tokenizer, context: str, choices: Sequence[str], *, delimiter: str = " ",
                   max_length: int = 1024) -> list[tuple[list[int], int]]:
    """Token ids of ``context + delimiter + choice`` for each choice, and how many trailing ids are the answer.

    Follows lm-evaluation-harness: trailing whitespace of the context moves to the continuation, the
    pair is encoded jointly and the context's own encoding length splits it (so merges across the
    boundary are scored as part of the answer), and an empty context is prefixed by the BOS (or EOS)
    token. Over-long inputs are cut on the left to ``max_length`` tokens.
    """
    prefix: list[int] = []
    stripped = context.rstrip()
    moved = context[len(stripped):]
    out = []
    if not stripped:
        tok_id = getattr(tokenizer, "bos_token_id", None)
        if tok_id is None:
            tok_id = getattr(tokenizer, "eos_token_id", None)
        if tok_id is None:
            raise ValueError("an empty context needs a tokenizer with a BOS or EOS token")
        prefix = [int(tok_id)]
    ctx_ids = _encode(tokenizer, stripped) if stripped else []
    for choice in choices:
        cont = moved + choice if moved else (choice if (not stripped or choice[:1].isspace()) else delimiter + choice)
        whole = _encode(tokenizer, stripped + cont) if stripped else _encode(tokenizer, cont)
        n_ctx = len(ctx_ids)
        if whole[:n_ctx] != ctx_ids:  # tokenizer merged across the boundary differently: encode apart
            whole = ctx_ids + _encode(tokenizer, cont)
        n_cont = len(whole) - n_ctx
        if n_cont < 1:
            raise ValueError(f"choice {choice!r} encodes to no tokens")
        ids = prefix + whole
        if len(ids) > max_length + 1:
            ids = ids[-(max_length + 1):]
        out.append((ids, min(n_cont, len(ids) - 1)))
    return out


def multiple_choice(model, tokenizer, items: Sequence[Mapping[str, Any]], *, batch_size: int = 16,
                    max_tokens: int | None = 8192, max_length: int = 1024, delimiter: str = " ",
                    progress: bool = False, desc: str = "multiple choice") -> dict[str, Any]:
    """Zero-shot multiple-choice accuracy by log-likelihood on items ``{"context", "choices", "label"}``.

    Items that carry ``"contexts"`` and ``"continuation"`` (WinoGrande, see
    :func:`qblock.llm.data.load_benchmark`) are scored lm-eval's partial way: the log-likelihood of the
    shared continuation after each option's context.

    Returns:
        ``{"acc", "acc_norm", "num_items", "loglik": per-item list of per-choice summed log-probs}``.

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> class Tok:  # one token per character
        ...     eos_token_id = 0
        ...     def encode(self, s, add_special_tokens=False):
        ...         return [1 + (ord(c) % 30) for c in s]
        >>> m = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)).eval()
        >>> r = multiple_choice(m, Tok(), [{"context": "ab", "choices": ["c", "dd"], "label": 0}])
        >>> r["num_items"], r["acc"] in (0.0, 1.0), len(r["loglik"][0])
        (1, True, 2)
    """
    torch = _torch()
    reqs: list[tuple[int, int, list[int], int]] = []  # (item, choice, ids, n_cont)
    norm_len: list[list[int]] = []
    for i, it in enumerate(items):
        if it.get("contexts"):
            # partial scoring (WinoGrande): the option sits in the context, the shared continuation is scored
            cont = str(it["continuation"])
            for j, ctx in enumerate(it["contexts"]):
                ids, n_cont = encode_choices(tokenizer, str(ctx), [cont], delimiter=delimiter,
                                             max_length=max_length)[0]
                reqs.append((i, j, ids, n_cont))
            norm_len.append([len(cont)] * len(it["contexts"]))
            continue
        for j, (ids, n_cont) in enumerate(encode_choices(tokenizer, str(it["context"]), list(it["choices"]),
                                                         delimiter=delimiter, max_length=max_length)):
            reqs.append((i, j, ids, n_cont))
        # lm-eval divides by the answer's length without the delimiter that joins it to the context
        norm_len.append([len(str(c)[1:]) if str(c).startswith(" ") else len(str(c)) for c in it["choices"]])
    if not reqs:
        return {"acc": None, "acc_norm": None, "num_items": 0, "loglik": []}
    dev = model_device(model)
    scores: dict[tuple[int, int], float] = {}
    lengths = [len(r[2]) - 1 for r in reqs]
    batches = list(_batches(lengths, batch_size, max_tokens))
    it_b = batches
    if progress:
        from tqdm.auto import tqdm

        it_b = tqdm(batches, desc=desc, unit="batch", leave=False)
    with torch.inference_mode():
        for b in it_b:
            seqs = [torch.tensor(reqs[k][2][:-1], dtype=torch.long) for k in b]
            ids, mask = _pad(seqs)
            ids, mask = ids.to(dev), mask.to(dev)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for row, k in enumerate(b):
                full = reqs[k][2]
                n_cont = reqs[k][3]
                L = len(full) - 1
                pos = torch.arange(L - n_cont, L, device=dev)
                tgt = torch.tensor(full[-n_cont:], dtype=torch.long, device=dev)
                lp = torch.log_softmax(logits[row, pos].float(), dim=-1)
                scores[(reqs[k][0], reqs[k][1])] = float(lp.gather(1, tgt[:, None]).sum())
    correct = correct_norm = 0
    loglik = []
    for i, it in enumerate(items):
        ll = [scores[(i, j)] for j in range(len(norm_len[i]))]
        loglik.append(ll)
        label = int(it["label"])
        best = max(range(len(ll)), key=lambda j: ll[j])
        norm = [ll[j] / max(1, norm_len[i][j]) for j in range(len(ll))]
        best_n = max(range(len(norm)), key=lambda j: norm[j])
        correct += int(best == label)
        correct_norm += int(best_n == label)
    n = len(items)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "num_items": n, "loglik": loglik}


class PrefixCache:
    """Held-out loss of many removal sets, skipping the blocks they share with a base model or the last set.

    A model that removes ``T`` computes exactly what the base model (removing ``base``) computes in
    every block before ``first = min(T ^ base)``. One recorded pass of the base model stores each
    block's output per batch; a candidate's pass then replays those outputs for blocks
    ``0 .. first-1`` (their forward returns the stored output at once) and computes only the rest.
    Each candidate's own block outputs are kept too, until the next one: a set that agrees with the
    previous one on more leading blocks than with the base replays from it instead, so sets measured in
    sorted order (:func:`prefix_order`) compute only past their first difference, as a walk down a
    trie of removal sets. The result equals a plain masked pass (the same batches, the same operations
    after ``first``).

    Args:
        model: the model.
        samples: token-id tensors.
        base: blocks removed in the base model.
        batch_size: as :func:`heldout_loss`.
        max_bytes: the stored outputs' budget (the base's and the last set's); above it, nothing is
            stored and every candidate is computed in full (the results are the same, only slower).
        gate: gate mode of :func:`qblock.llm.gates.mask_blocks`.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> torch.manual_seed(0) and None
        >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2)).eval()
        >>> xs = [torch.randint(0, 50, (10,)) for _ in range(3)]
        >>> pc = PrefixCache(m, xs)
        >>> from qblock.llm.gates import mask_blocks
        >>> with mask_blocks(m, [2]):
        ...     plain = heldout_loss(m, xs)[0]
        >>> abs(pc.loss([2])[0] - plain) < 1e-6
        True
        >>> pc.loss([1, 2])[0] == pc.loss([1, 3])[0], pc.computed_from  # [1, 3] replayed [1, 2]'s block 1
        (False, 2)
    """

    def __init__(self, model, samples: Sequence[Any], base: Iterable[int] = (), *, batch_size: int = 8,
                 max_bytes: float = 2e9, gate: str = "layer", progress: bool = False) -> None:
        from qblock.llm.blocks import find_blocks
        from qblock.llm.gates import mask_blocks

        torch = _torch()
        self.model = model
        self.samples = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in samples]
        self.base = removal_key(base)
        self.batch_size = int(batch_size)
        self.gate = gate
        self.blocks = [mod for _, mod in find_blocks(model)]
        cfg = getattr(model, "config", None)
        d = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 4096
        tokens = sum(int(s.numel()) for s in self.samples)
        param = next(model.parameters())
        one = len(self.blocks) * tokens * int(d) * param.element_size()
        self.enabled = one <= max_bytes
        self._rolling = 2 * one <= max_bytes
        self._last: tuple[tuple[int, ...], list[list[Any]], tuple[float, int]] | None = None
        self._sums: tuple[tuple[int, ...], list[float]] | None = None  # the last set's per-sample NLL sums
        #: next-token predictions of each sample that has any (what :meth:`sample_losses` averages over)
        self.sample_tokens = sample_tokens(self.samples)
        self.computed_from = 0  # the first block the last :meth:`loss` computed (what it replayed before)
        self._outputs: list[list[Any]] = []
        if self.enabled:
            # branch gates discover their plan with a probe forward on first use: run it now, before
            # the hooks exist, so the probe never lands in the recorded outputs
            from qblock.llm.gates import gate_sites

            gate_sites(model, gate=gate)
        self._base_sums: list[float] = []
        with mask_blocks(model, self.base, gate=gate), self._recording(self._outputs, self.enabled) as record:
            self.base_loss, self.num_tokens = heldout_loss(model, self.samples, batch_size=self.batch_size,
                                                           progress=progress, around_batch=record,
                                                           sample_sums=self._base_sums)

    @contextlib.contextmanager
    def _recording(self, into: list[list[Any]], on: bool, replay: list[list[Any]] | None = None, upto: int = 0):
        """Hooks that store every block's output per batch into ``into``; yields the ``around_batch`` of
        :func:`heldout_loss`, which also replays ``replay``'s outputs for blocks ``0 .. upto-1``."""
        handles = []

        def make(j):
            def hook(module, args, output):
                into[-1][j] = output
            return hook

        def around(k):
            if on:
                into.append([None] * len(self.blocks))
            return self._replay(replay, k, upto) if upto else contextlib.nullcontext()

        try:
            if on:
                handles = [blk.register_forward_hook(make(j)) for j, blk in enumerate(self.blocks)]
            yield around if (on or upto) else None
        finally:
            for h in handles:
                h.remove()

    def _replay(self, outputs: list[list[Any]], k: int, upto: int):
        """Blocks ``0 .. upto-1`` return their recorded output of batch ``k`` at once."""
        from qblock.llm.blocks import patched_forwards

        return patched_forwards((self.blocks[j], (lambda o: (lambda *a, **kw: o))(outputs[k][j]))
                                for j in range(upto))

    def loss(self, removed: Iterable[int]) -> tuple[float, int]:
        """``(mean_nll, tokens)`` of the model that removes ``removed`` (computed from the first block it
        does not share with the base or with the previous set)."""
        from qblock.llm.gates import mask_blocks

        key = removal_key(removed)
        diff = set(key) ^ set(self.base)
        if not diff:
            return self.base_loss, self.num_tokens
        if self._last is not None and self._last[0] == key:
            return self._last[2]
        upto, source = (min(diff), self._outputs) if self.enabled else (0, None)
        if self._rolling and self._last is not None:
            last = min(set(key) ^ set(self._last[0]))
            if last > upto:
                upto, source = last, self._last[1]
        mine: list[list[Any]] = []
        self._last = None  # its outputs may be replayed below, but are replaced after
        sums: list[float] = []
        with mask_blocks(self.model, key, gate=self.gate), \
                self._recording(mine, self._rolling, source, upto) as around:
            out = heldout_loss(self.model, self.samples, batch_size=self.batch_size, around_batch=around,
                               sample_sums=sums)
        self._sums = (key, sums)
        self.computed_from = upto
        if self._rolling:
            self._last = (key, mine, out)
        return out

    def sample_losses(self, removed: Iterable[int]) -> list[float]:
        """Each sample's mean next-token NLL with ``removed`` removed (samples of two or more tokens, in
        order); measured by :meth:`loss` unless it was the base or the last set measured."""
        key = removal_key(removed)
        if key == self.base:
            sums = self._base_sums
        else:
            if self._sums is None or self._sums[0] != key:
                self.loss(key)
            sums = self._sums[1]
        return [v / n for v, n in zip(sums, self.sample_tokens)]


def prefix_order(sets: Iterable[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Removal sets in the order that shares the most leading blocks between neighbours.

    A depth-first walk of the trie of block choices (block 0 removed or kept, then block 1, ...): sets
    that agree on blocks ``0 .. j`` are adjacent, the order in which :class:`PrefixCache` recomputes
    least.

    Example:
        >>> prefix_order([(3, 9), (1,), (1, 5), (1, 3)])
        [(1, 3), (1, 5), (1,), (3, 9)]
    """
    sets = [tuple(s) for s in sets]
    n = 1 + max((max(s) for s in sets if s), default=0)
    return sorted(sets, key=lambda s: tuple(i not in s for i in range(n)))


class CandidateEvaluator:
    """Score removal sets on one model: held-out loss/perplexity and optional benchmark accuracy.

    Args:
        model: a causal LM (Hugging Face ``...ForCausalLM``), already on its device, in eval mode.
        eval_samples: held-out token-id tensors, disjoint from the calibration data.
        tokenizer: needed only for benchmarks.
        benchmarks: ``{task_name: items}`` with items ``{"context", "choices", "label"}``.
        batch_size: evaluation batch size.
        gate: gate mode used for masking (``"layer"``: removed blocks are pass-throughs).

    Results are cached per removal set (and task list), so a set proposed by several methods is
    evaluated once.
    """

    def __init__(self, model, eval_samples: Sequence[Any], tokenizer=None,
                 benchmarks: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                 batch_size: int = 8, gate: str = "layer", progress: bool = False) -> None:
        if not eval_samples:
            raise ValueError("CandidateEvaluator needs at least one evaluation sample")
        self.model = model
        self.eval_samples = list(eval_samples)
        self.tokenizer = tokenizer
        self.benchmarks = dict(benchmarks or {})
        if self.benchmarks and tokenizer is None:
            raise ValueError("benchmarks need a tokenizer")
        self.batch_size = int(batch_size)
        self.gate = gate
        self.progress = progress
        self._loss_cache: dict[tuple[int, ...], dict[str, Any]] = {}
        self._task_cache: dict[tuple[tuple[int, ...], str], dict[str, Any]] = {}
        self.num_evaluations = 0
        self._prefix: PrefixCache | None = None  # full-model block outputs, to skip unchanged prefixes
        #: next-token predictions of each held-out sample that has any, in :meth:`sample_losses`' order
        self.sample_tokens = sample_tokens(self.eval_samples)

    def evaluate(self, removed: Iterable[int], tasks: bool | Sequence[str] = False) -> dict[str, Any]:
        """``{"heldout_loss", "perplexity", "eval_tokens", "eval_seconds", "acc_<task>", "acc_norm_<task>"}``.

        Args:
            removed: block indices to remove.
            tasks: ``True`` for every loaded benchmark, a list of names for some, ``False`` for none.
        """
        from qblock.llm.gates import mask_blocks

        key = removal_key(removed)
        names = list(self.benchmarks) if tasks is True else list(tasks or [])
        unknown = [t for t in names if t not in self.benchmarks]
        if unknown:
            raise ValueError(f"benchmark(s) {unknown} not loaded; loaded: {sorted(self.benchmarks)}")
        need_loss = key not in self._loss_cache
        need_tasks = [t for t in names if (key, t) not in self._task_cache]
        if need_loss:
            t0 = time.perf_counter()
            if self._prefix is None:  # recorded on the full model, outside any mask
                self._prefix = PrefixCache(self.model, self.eval_samples, (), batch_size=self.batch_size,
                                           gate=self.gate)
            loss, n = self._prefix.loss(key)
            self.num_evaluations += 1
            self._loss_cache[key] = {"heldout_loss": loss, "perplexity": math.exp(loss),
                                     "eval_tokens": n, "eval_seconds": time.perf_counter() - t0,
                                     "sample_losses": self._prefix.sample_losses(key)}
        if need_tasks:
            with mask_blocks(self.model, key, gate=self.gate):
                for t in need_tasks:
                    r = multiple_choice(self.model, self.tokenizer, self.benchmarks[t],
                                        batch_size=max(self.batch_size, 8), progress=self.progress, desc=t)
                    self._task_cache[(key, t)] = {"acc": r["acc"], "acc_norm": r["acc_norm"],
                                                  "num_items": r["num_items"]}
        out = {k: v for k, v in self._loss_cache[key].items() if k != "sample_losses"}
        for t in names:
            r = self._task_cache[(key, t)]
            out[f"acc_{t}"] = r["acc"]
            out[f"acc_norm_{t}"] = r["acc_norm"]
        return out

    def sample_losses(self, removed: Iterable[int]) -> list[float]:
        """Each held-out sample's mean next-token NLL with ``removed`` removed (measured if not yet): two
        sets compared sample by sample give a paired standard error of their difference."""
        key = removal_key(removed)
        if key not in self._loss_cache:
            self.evaluate(key)
        return list(self._loss_cache[key]["sample_losses"])

    def evaluate_many(self, sets: Iterable[Iterable[int]], *, executor: Any = None,
                      on_result: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Held-out loss of many removal sets (no benchmarks), each distinct set measured once.

        Args:
            sets: removal sets.
            executor: :mod:`qblock.executor` (``None``/local: one after another here; Ray: the sets not
                cached yet are spread over model actors, each with its own replica and prefix cache, and
                give the same numbers).
            on_result: ``on_result(k, result)`` as each distinct uncached set (k-th) is measured.

        Returns:
            One :meth:`evaluate` dictionary per set, in order.

        Example:
            >>> import torch
            >>> from transformers import LlamaConfig, LlamaForCausalLM
            >>> torch.manual_seed(0) and None
            >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
            ...     num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2)).eval()
            >>> ev = CandidateEvaluator(m, [torch.randint(0, 50, (12,)) for _ in range(3)])
            >>> [r["heldout_loss"] == ev.evaluate(s)["heldout_loss"] for s, r in zip([[0], [1]], ev.evaluate_many([[0], [1]]))]
            [True, True]
        """
        from qblock.executor import is_local

        keys = [removal_key(s) for s in sets]
        todo = prefix_order(k for k in dict.fromkeys(keys) if k not in self._loss_cache)
        if is_local(executor):
            for j, k in enumerate(todo):
                r = self.evaluate(k)
                if on_result is not None:
                    on_result(j, r)
        else:
            workers, skey = executor.bind_model(self.model), f"heldout:{id(self)}"
            self._workers = (executor, workers, skey)
            setup = functools.partial(_remote_evaluator, samples=self.eval_samples, batch_size=self.batch_size,
                                      gate=self.gate)

            def done(j: int, r: dict[str, Any]) -> None:
                self._loss_cache[todo[j]] = r
                self.num_evaluations += 1
                if on_result is not None:
                    on_result(j, self.evaluate(todo[j]))

            workers.map(_remote_loss, todo, setup=setup, key=skey, on_result=done)
        return [self.evaluate(k) for k in keys]


def _remote_evaluator(model, *, samples, batch_size, gate) -> CandidateEvaluator:
    """The evaluator a model actor builds once (its own prefix cache of the full model)."""
    return CandidateEvaluator(model, samples, batch_size=batch_size, gate=gate)


def _remote_loss(evaluator: CandidateEvaluator, key: tuple[int, ...]) -> dict[str, Any]:
    return dict(evaluator.evaluate(key), sample_losses=evaluator.sample_losses(key))
