"""Shared test settings: offline, headless, seeded."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:  # tiny test models gain nothing from intra-op threads, and a busy 2-core box loses a lot
    import torch

    torch.set_num_threads(1)
except ImportError:  # the core suite runs without the llm extra
    pass
