"""Shared test settings (offline, headless, seeded) and the tiny models every LLM test builds on.

The factories are plain functions (``from conftest import tiny_model``); they import torch and
transformers when called, so the core suite runs without the llm extra.
"""

import os
import sys
from pathlib import Path

import pytest

#: the repository root (tests live in folders that mirror the package: tests/qblock/llm/... for qblock/llm/...)
ROOT = Path(__file__).resolve().parents[1]
# the root ahead of tests/ on sys.path, so the folder tests/qblock/ can never stand in for the package
# (a plain `pytest` puts tests/ first and leaves the root out)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:  # tiny test models gain nothing from intra-op threads, and a busy 2-core box loses a lot
    import torch

    torch.set_num_threads(1)
except ImportError:  # the core suite runs without the llm extra
    pass


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests, restored after (a test elsewhere may have changed it):
    tiny matrices gain nothing from more, and lose a lot on busy cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ random tiny models
ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma3", "gpt2", "opt", "qwen3_moe", "mixtral"]
VOCAB = 97


def tiny_model(arch: str, layers: int = 4, seed: int = 0, **overrides):
    """A randomly initialised tiny causal LM of the given family (no download), in eval mode."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    common.update(overrides)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif arch == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=8, **common))
    elif arch == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**common))
    elif arch == "gemma3":
        # sliding_window smaller than the test sequences, so local and global layers really differ
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(head_dim=8, sliding_window=4, sliding_window_pattern=2, **common))
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=128,
            bos_token_id=1, eos_token_id=2,
        ))
    elif arch == "opt":
        model = tf.OPTForCausalLM(tf.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=layers, num_attention_heads=4,
            max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2, eos_token_id=2,
            **{k: v for k, v in overrides.items() if k == "do_layer_norm_before"},
        ))
    elif arch == "qwen3_moe":
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
            head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, **common))
    elif arch == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common))
    else:
        raise ValueError(arch)
    return model.eval()


def random_samples(n: int, lo: int = 3, hi: int = 20, seed: int = 0):
    """``n`` token-id tensors of random lengths in ``[lo, hi)`` over the tiny vocabulary."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g)
    return [torch.randint(0, VOCAB, (int(k),), generator=g) for k in lengths]


def small_llama(layers: int, vocab_size: int = 40, seed: int = 0):
    """A random Llama of hidden size 16 (two heads), seeded, in eval mode: the smallest the tests use."""
    import torch
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2)).eval()


# ------------------------------------------------------------------------------ a tiny saved model
def word_tokenizer():
    """A word-level tokenizer over ``w0 .. w61`` (ids 2..63; 0 unknown, 1 end of text), built offline."""
    import transformers
    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers

    vocab = {"[UNK]": 0, "[EOS]": 1, **{f"w{i}": i + 2 for i in range(62)}}
    t = Tokenizer(tmodels.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", eos_token="[EOS]")


def save_tiny_llama(path, layers=3, seed=0, max_position_embeddings=128):
    """A random tiny Llama (vocabulary 64) with :func:`word_tokenizer`, saved as a Hugging Face folder."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                   num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=max_position_embeddings)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


# ------------------------------------------------------------------------------ the tiny trained model
# a Llama trained on a synthetic sequence task whose blocks 3, 4, 5 are exact identities (validator and
# healing tests): removing them changes nothing, so every sensible method picks them first
TASK_VOCAB, TASK_EOS = 40, 40
TASK_IDENTITY = (3, 4, 5)
TASK_BLOCKS = 8


def task_passage(rng) -> list[int]:
    # x_{t+1} = (x_t + x_{t-1}) mod V: needs attention to the previous token
    x = [int(rng.integers(TASK_VOCAB)), int(rng.integers(TASK_VOCAB))]
    while len(x) < int(rng.integers(16, 40)):
        x.append((x[-1] + x[-2]) % TASK_VOCAB)
    return x


def task_stream(rng, n_tok: int) -> list[int]:
    s: list[int] = []
    while len(s) < n_tok:
        if s:
            s.append(TASK_EOS)
        s += task_passage(rng)
    return s[:n_tok]


def trained_task_model():
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=TASK_BLOCKS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=TASK_EOS, eos_token_id=TASK_EOS, pad_token_id=TASK_EOS)
    model = LlamaForCausalLM(cfg)
    for i in TASK_IDENTITY:
        layer = model.model.layers[i]
        for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
            torch.nn.init.zeros_(w)
            w.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(150):
        ids = torch.tensor([task_stream(rng, 32) for _ in range(16)])
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def task_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(TASK_VOCAB)}
    vocab.update({"<eos>": TASK_EOS, "<unk>": TASK_EOS + 1})
    tk = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")
