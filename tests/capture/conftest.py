"""Tiny Hugging Face checkpoints built here (random init, saved with save_pretrained), text
inputs, and the hidden states computed directly, to check capture against. Nothing is
downloaded: the hub is switched off for the whole session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch", reason="the capture extra (torch) is not installed: "
                            "pip install 'repscope[capture]'")
pytest.importorskip("transformers", reason="the capture extra (transformers) is not "
                    "installed: pip install 'repscope[capture]'")

# Tiny models are all thread overhead: with two torch threads on a busy 2-core machine each op
# waits for the other thread (10x slower). Captures in this process and the direct
# computations they are checked against run single-threaded alike.
torch.set_num_threads(1)

WORDS = ("the a cat dog sat on mat ran fast slow big small red blue bird saw under over "
         "tree house end").split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LINES = [
    "the cat sat on the mat",
    "a dog ran",
    "the big red bird saw a small blue cat under the tree",
    "dog",
    "a slow cat ran fast over the house",
    "the end",
    "zebra the dog",  # an unknown word: [UNK]
    "big big big dog sat on a red mat under the blue tree",
]


def make_checkpoint(
    folder: Path,
    seed: int,
    *,
    layers: int = 2,
    hidden: int = 16,
    max_positions: int = 32,
    words: tuple[str, ...] | list[str] = WORDS,
) -> Path:
    """A randomly initialised BERT and a word-level tokenizer, saved as a checkpoint."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(SPECIAL + list(words))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_positions)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden,
                        max_position_embeddings=max_positions)
    BertModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def direct_hidden_states(folder: Path, lines: list[str], batch_size: int, pool: str = "none",
                         threads: int | None = None):
    """Hidden states computed straight from transformers, batch by batch as capture runs
    them (each batch padded to its longest example): {unit: (rows, features) float32}.

    ``threads``: torch's intra-op threads, as the capture had them (GEMMs split over another
    number of threads round differently in the last bit)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    if threads is not None and threads != torch.get_num_threads():
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return direct_hidden_states(folder, lines, batch_size, pool)
        finally:
            torch.set_num_threads(saved)

    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    units: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(lines), batch_size):
        enc = tokenizer(lines[start : start + batch_size], padding=True, return_tensors="pt")
        with torch.no_grad():
            states = model(**enc, output_hidden_states=True).hidden_states
        keep = enc["attention_mask"].numpy().astype(bool)
        for i, state in enumerate(states):
            name = "embeddings" if i == 0 else f"layer{i}"
            x = state.numpy()
            if pool == "none":
                rows = x[keep]
            elif pool == "mean":
                rows = np.stack([x[e][keep[e]].astype(np.float64).mean(axis=0)
                                 for e in range(len(x))])
            elif pool == "first":
                rows = x[:, 0]
            else:
                rows = np.stack([x[e, keep[e].sum() - 1] for e in range(len(x))])
            units.setdefault(name, []).append(rows)
    return {name: np.concatenate(parts) for name, parts in units.items()}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """seed0 and seed1: the same architecture and tokenizer, different seeds; other_vocab:
    a tokenizer whose word ids differ; bert3: three layers."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "seed0": make_checkpoint(root / "seed0", 0),
        "seed1": make_checkpoint(root / "seed1", 1),
        "other_vocab": make_checkpoint(root / "other_vocab", 2, words=WORDS[::-1]),
        "bert3": make_checkpoint(root / "bert3", 3, layers=3, hidden=8),
    }


@pytest.fixture
def probes(tmp_path) -> Path:
    path = tmp_path / "probes.txt"
    path.write_text("\n".join(LINES) + "\n")
    return path
