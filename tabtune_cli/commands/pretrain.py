"""``tabtune pretrain``: pretrain an in-context model (nano, TabICL) on synthetic tables, resumable.

``model=<name>`` picks the model's pretraining recipe, ``conf/pretrain_model/<name>.yaml`` (Hydra's ``model``
group is ``train``'s model settings, so the command line's ``model=`` is this group's choice)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ..errors import TabTuneError
from .hydra_conf import check_overrides, conf_dir, one_line_errors

# Real tables that pretraining is watched on. None of them is a classification table of the
# benchmark: regression targets split at the median, and letter (26 classes) as vowel or not.
TRACKING = {
    "california": ("MedHouseVal", "median"),
    "concrete": ("compressive_strength", "median"),
    "diamonds": ("price", "median"),
    "letter": ("lettr", "vowel"),
}


def tracking_tables(folder: Path, rows: int = 1024, seed: int = 0) -> dict:
    """``name -> (X, y)`` binary tasks from the tracking tables present in ``folder``."""
    import pandas as pd

    from ..data.preprocess import Preprocessor

    tables = {}
    for name, (target, rule) in TRACKING.items():
        path = folder / f"{name}.parquet"
        if not path.is_file():
            continue
        frame = pd.read_parquet(path).sample(n=rows, random_state=seed)
        y = frame.pop(target)
        labels = (y > y.median()) if rule == "median" else y.astype(str).str.upper().isin(list("AEIOU"))
        tables[name] = (Preprocessor().fit_transform(frame), labels.to_numpy().astype(np.int64))
    return tables


def make_evaluator(folder: Path, model_name: str, settings: dict):
    """Zero-shot ROC AUC of the model on each tracking table (half context, half query), and their mean;
    ``settings`` are the ``model.*`` keys the tracking predicts with (fewer members than a user's default)."""
    import torch
    from sklearn.metrics import roc_auc_score

    from ..models.base import Task
    from ..models.registry import get_adapter

    tables = tracking_tables(folder)
    if not tables:
        return None
    adapter = get_adapter(model_name)
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(adapter.config_class), settings))
    task = Task("classification", 2)

    def evaluate(model) -> dict:
        scores = {}
        for name, (X, y) in tables.items():
            half = len(y) // 2
            proba = adapter.predict(model, X[:half], y[:half], X[half:], task, config, torch.device("cpu"))
            scores[name] = round(float(roc_auc_score(y[half:], proba[:, 1])), 4)
        scores["mean"] = round(float(np.mean(list(scores.values()))), 4)
        return scores

    return evaluate


def run(argv: list[str]) -> int:
    import hydra

    argv = [f"pretrain_model={arg[len('model='):]}" if arg.startswith("model=") else arg for arg in argv]
    try:
        check_overrides(argv, "pretrain")
    except TabTuneError as exc:  # the group's name is the command line's `model`
        raise TabTuneError(str(exc).replace("pretrain_model", "model")) from None
    sys.argv = ["tabtune pretrain", *argv]
    main = hydra.main(config_path=str(conf_dir()), config_name="pretrain", version_base="1.3")(one_line_errors(_job))
    main()
    return 0


def _job(cfg: DictConfig) -> None:
    from ..tuning.pretrain import pretrain

    try:
        values = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    except Exception as exc:
        raise TabTuneError(str(exc).splitlines()[0]) from None
    evaluate = make_evaluator(Path(values["eval_tables"]), values["model"]["name"], values["eval_settings"])
    if evaluate is None:
        print(f"no tracking tables in {values['eval_tables']}: zero-shot quality is not tracked", file=sys.stderr)
    result = pretrain(values, evaluate=evaluate)
    print(f"pretrained to step {result.step}, loss {result.loss:.4f}; weights: {result.weights}")
