"""Free-text columns on womens_reviews: do the models gain from reading them? (``make bench-text``)

Two comparisons on the same seeded splits of a subsample (train rows, test rows, splits below),
predicting the 5-level Rating:
- ContextTab from tiny random weights, fine-tuned (base-ft) with the same budget, reading the
  `Title` and `Review Text` columns as text, against the same with those columns dropped;
- nano (the shipped weights, zero-shot) with the text as numeric features (``text_features=8``:
  the leading principal components of the sentence embeddings, fitted on the training rows)
  against nano with the text dropped (``text_features=0``).
The sentence embeddings are computed once per distinct string for the whole run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

TABLE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "womens_reviews.parquet"
TEXT = ["Title", "Review Text"]
# from random weights the model must learn to read labels from the context (episodes relabel the classes):
# about 1,400 steps of 32 queries; 8 epochs of 64 left both ContextTab contenders at chance
TUNING = {"epochs": 30, "context_size": 256, "query_size": 32, "batch_size": 1, "learning_rate": 1e-3,
          "scheduler": "constant", "early_stopping_patience": None, "show_progress": False}


def contenders() -> dict:
    tiny = {"pretrained": False, "size": "tiny"}
    return {
        "contexttab base-ft, text read": dict(model_name="contexttab", tuning_strategy="base-ft",
                                              tuning_params=TUNING, model_params=tiny, drop=[]),
        "contexttab base-ft, text dropped": dict(model_name="contexttab", tuning_strategy="base-ft",
                                                 tuning_params=TUNING, model_params=tiny, drop=TEXT),
        "nano zero-shot, text as 8 features": dict(model_name="nano", text_features=8, drop=[]),
        "nano zero-shot, text dropped": dict(model_name="nano", text_features=0, drop=[]),
    }


def main() -> None:
    import torch
    from rich.console import Console
    from rich.table import Table

    from tabtune_cli import TabularPipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--test", type=int, default=750)
    parser.add_argument("--splits", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not TABLE.is_file():
        raise SystemExit(f"{TABLE} is absent (the shared real-data tables)")
    data = pd.read_parquet(TABLE).sample(n=args.train + args.test, random_state=0).reset_index(drop=True)
    rows = []
    for split in range(args.splits):
        order = np.random.default_rng(split).permutation(len(data))
        train, test = data.iloc[order[: args.train]], data.iloc[order[args.train:]]
        for name, spec in contenders().items():
            spec = dict(spec)
            drop = spec.pop("drop")
            X_train, y_train = train.drop(columns=["Rating", *drop]), train["Rating"].astype(str)
            X_test, y_test = test.drop(columns=["Rating", *drop]), test["Rating"].astype(str)
            torch.manual_seed(split)
            started = time.perf_counter()
            pipe = TabularPipeline(device="cpu", seed=split, **spec).fit(X_train, y_train)
            metrics = pipe.evaluate(X_test, y_test)
            rows.append({"contender": name, "split": split, "seconds": time.perf_counter() - started,
                         **{k: metrics[k] for k in ("roc_auc", "accuracy", "log_loss")}})
            print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    summary = frame.groupby("contender", sort=False)[["roc_auc", "accuracy", "log_loss", "seconds"]].mean()
    table = Table(title=f"womens_reviews, Rating (5 classes): {args.train} train / {args.test} test rows, "
                        f"{args.splits} splits, means")
    for col in ("contender", "ROC AUC", "accuracy", "log loss", "seconds"):
        table.add_column(col, justify="left" if col == "contender" else "right")
    for name, r in summary.iterrows():
        table.add_row(name, f"{r.roc_auc:.4f}", f"{r.accuracy:.4f}", f"{r.log_loss:.4f}", f"{r.seconds:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
