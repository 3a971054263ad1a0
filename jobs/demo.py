"""`make demo`: the seed paper's heatmaps in miniature, end to end.

Trains three small MLPs (four hidden layers) on scikit-learn's digits that differ only in
their random seed, ingests their hidden-layer activations on held-out digits into a local
store, runs a job with linear_cka, pwcca and procrustes, and writes the results store and
heatmaps (CKA and PWCCA of seed 0 vs seed 1 side by side) with the interactive report.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

SEEDS = (0, 1, 2)
HIDDEN = (64, 64, 64, 64)


def hidden_activations(mlp, x: np.ndarray) -> list[np.ndarray]:
    """ReLU outputs of each hidden layer of a fitted MLPClassifier: list of (rows, width)."""
    out = []
    h = x
    for w, b in zip(mlp.coefs_[:-1], mlp.intercepts_[:-1], strict=True):
        h = np.maximum(h @ w + b, 0.0)
        out.append(h)
    return out


def train_models(seeds=SEEDS):
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.4, random_state=0)
    models = {}
    for seed in seeds:
        mlp = MLPClassifier(hidden_layer_sizes=HIDDEN, max_iter=200, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            mlp.fit(x_train, y_train)
        models[f"mlp-seed{seed}"] = (mlp, mlp.score(x_test, y_test))
    return models, x_test


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo-output", help="folder for store, results, report")
    args = parser.parse_args(argv)

    from repscope.jobs.cli import main as cli_main

    out = Path(args.out).absolute()
    store_url, results_url, report_dir = out / "acts.zarr", out / "results.zarr", out / "report"
    t0 = time.perf_counter()
    print(f"training {len(SEEDS)} MLPs {HIDDEN} on digits (seeds {SEEDS}) ...", flush=True)
    models, x_test = train_models()

    from repscope.store import ActivationStore, ingest_array

    store = ActivationStore.create(str(_fresh(store_url)))
    scores = ["model,score"]
    for name, (mlp, accuracy) in models.items():
        for k, acts in enumerate(hidden_activations(mlp, x_test)):
            ingest_array(store, name, f"layer{k + 1}", acts)
        scores.append(f"{name},{accuracy}")
        print(f"  {name}: test accuracy {accuracy:.3f}, 4 hidden layers ingested", flush=True)
    (out / "scores.csv").write_text("\n".join(scores) + "\n")  # for `repscope ground`
    checkpoints = write_checkpoints(out)

    spec = out / "demo-job.yaml"
    spec.write_text(
        f"store: {store_url}\n"
        "metrics: [linear_cka, pwcca, procrustes]\n"
        f"output: {results_url}\n"
        "compute: {precision: float64}\n"
    )
    code = cli_main(["run", str(spec), "--overwrite"])
    if code:
        return code
    from repscope.jobs.report import write_report
    from repscope.jobs.report_html import write_html
    from repscope.jobs.results import open_results

    ds = open_results(str(results_url))
    files = write_report(ds, report_dir)
    page = write_html(ds, report_dir, source=str(results_url))
    side_by_side = report_dir / "mlp-seed0__vs__mlp-seed1.png"
    print(
        f"\nstore:    {store_url}\nspec:     {spec}\nresults:  {results_url}"
        f"  (xarray.open_zarr)\nreport:   {page} (interactive) and {len(files)} PNG heatmaps "
        f"in {report_dir}\n"
        f"seed 0 vs seed 1 (CKA, PWCCA, Procrustes side by side): {side_by_side}\n"
        f"{checkpoints}\n"
        f"demo finished in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    return 0


# A small corpus for the checkpoints' probe set: short sentences of a few dozen words.
_WORDS = ("the a one two three four five six seven eight nine zero digit written small big "
          "round straight line loop top bottom left right closed open stroke curve").split()


def write_checkpoints(out: Path, seeds=SEEDS) -> str:
    """Tiny BERT checkpoints (random init, one per seed, a word-level tokenizer) and a probe
    text, for the README's capture step: ``out/checkpoints/tiny-bert-seed<k>/`` and
    ``out/probes.txt``. Needs the capture extra; without it, says so and writes nothing."""
    try:
        import torch
        from tokenizers import Tokenizer, models, pre_tokenizers, processors
        from transformers import BertConfig, BertModel, PreTrainedTokenizerFast
    except ImportError:
        return "checkpoints: skipped (pip install 'repscope[capture]' for the capture step)"
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {word: i for i, word in enumerate(special + _WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]",
                                   unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   mask_token="[MASK]", model_max_length=64)
    folder = out / "checkpoints"
    for seed in seeds:
        torch.manual_seed(seed)
        config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4,
                            num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=64)
        path = folder / f"tiny-bert-seed{seed}"
        BertModel(config).save_pretrained(path)
        fast.save_pretrained(path)
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(_WORDS, size=rng.integers(4, 16))) for _ in range(300)]
    (out / "probes.txt").write_text("\n".join(lines) + "\n")
    return f"checkpoints: {folder} ({len(seeds)} tiny BERTs) and {out / 'probes.txt'}"


def _fresh(store_url: Path) -> Path:
    """The demo's store, written anew each run: an earlier demo's store is removed (it is the
    demo's own: a repscope store in the demo's folder); anything else there is refused."""
    import shutil

    from repscope.errors import InputError
    from repscope.store import ActivationStore

    if store_url.exists():
        try:
            ActivationStore.open(str(store_url))
        except Exception:
            raise InputError(f"{store_url} exists and is not the demo's store; move it away "
                             "or run the demo with --out elsewhere") from None
        shutil.rmtree(store_url)
    return store_url


if __name__ == "__main__":
    sys.exit(main())
