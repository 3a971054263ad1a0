"""`python -m bench.capture [--examples 2000] [--scales 1,10] [--out bench-output/capture.json]`.

Capture throughput and memory: a small BERT (4 layers x 256 hidden, 4 heads, random init, a
word-level tokenizer, built here) captured by `repscope capture` (one checkpoint, in its own
process, every hidden state as token rows) on generated sentences of 16-96 words, at each
scale of the inputs. Reports tokens/s of the capture (the model's forward passes and the
store's writes; loading excluded) and the peak memory of the process (sampled every 0.1 s),
which must not grow with the inputs: a capture holds one shard buffer per unit, never the
probe set. Needs the capture and bench extras (torch, transformers, psutil).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.run import PeakRSS

VOCAB = [f"w{i}" for i in range(1000)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_checkpoint(folder: Path, layers: int = 4, hidden: int = 256) -> Path:
    """A random-init BERT and its word-level tokenizer, saved with save_pretrained."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(SPECIAL + VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=128,
    ).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=4 * hidden,
                        max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    return folder


def write_text(path: Path, examples: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as fp:
        for length in rng.integers(16, 97, size=examples):
            fp.write(" ".join(VOCAB[i] for i in rng.integers(0, len(VOCAB), size=length)))
            fp.write("\n")


def forward_only(checkpoint: Path, text: Path, batch_size: int = 32) -> float:
    """Tokens/s of the model's forward passes alone (the same batches, no store), in this
    process: what capture costs on top of it is the store's share."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(checkpoint, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    lines = text.read_text().splitlines()
    tokens, start = 0, time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(lines), batch_size):
            enc = tokenizer(lines[i : i + batch_size], padding=True, return_tensors="pt")
            model(**enc, output_hidden_states=True)
            tokens += int(enc["attention_mask"].sum())
    return tokens / (time.perf_counter() - start)


def run(checkpoint: Path, text: Path, store: Path) -> dict:
    """`repscope capture` in a child process; its summary plus wall time and peak memory."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "repscope.jobs.cli", "capture", str(store), "bert",
         "--hf", str(checkpoint), "--text", str(text), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    with PeakRSS(proc.pid) as peak:
        out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"repscope capture exited with {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])["captured"][0]
    return {**result, "wall_seconds": round(time.perf_counter() - start, 2),
            "peak_rss": peak.peak, "peak_pss": peak.peak_pss}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="examples at scale 1")
    parser.add_argument("--scales", default="1,10", help="comma-separated input scales")
    parser.add_argument("--out", default="bench-output/capture.json")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="repscope-bench-capture-") as tmp:
        root = Path(tmp)
        checkpoint = build_checkpoint(root / "bert-4x256")
        for scale in (int(s) for s in args.scales.split(",")):
            text = root / f"probes-{scale}x.txt"
            write_text(text, args.examples * scale)
            result = run(checkpoint, text, root / f"acts-{scale}x.zarr")
            if not rows:  # the forward passes' rate does not depend on the scale: once
                forward = round(forward_only(checkpoint, text), 1)
            result["forward_tokens_per_second"] = forward
            rows.append({"scale": scale, "examples": args.examples * scale, **result})
            print(f"{scale:>3}x: {args.examples * scale:>7,} examples, {result['tokens']:>10,} "
                  f"tokens, capture {result['seconds']:7.1f} s, "
                  f"{result['tokens_per_second']:8,.0f} tokens/s (forward alone "
                  f"{result['forward_tokens_per_second']:,.0f}), store "
                  f"{result['bytes'] / 2**30:6.2f} GiB, peak RSS "
                  f"{result['peak_rss'] / 2**20:6.0f} MiB (PSS {result['peak_pss'] / 2**20:.0f} "
                  f"MiB), wall {result['wall_seconds']:.1f} s", flush=True)
            shutil.rmtree(root / f"acts-{scale}x.zarr")  # free the disk as we go
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
