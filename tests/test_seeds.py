"""The guides' Python snippets, run as written.

Every ```python block of ../shared/seeds/{tuning-strategies,peft-lora}.md that calls
TabularPipeline or TabularLeaderboard is read at test time (nothing of them is copied
here) and run with only these changes: 'cuda' -> 'cpu', every `'epochs': N` -> 1, and
each model at tiny random weights (the official checkpoints need a download). The
names the snippets assume (X_train, y_train, load_your_dataset, a fitted `pipeline`,
...) are provided, and so are CPU stand-ins for the two torch.cuda memory queries one
snippet prints. What each snippet prints is checked.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

import tabtune_cli.pipeline as pipeline_module
from tabtune_cli.memory import peak_mb
from tabtune_cli.config import group_defaults

SEEDS = Path(__file__).resolve().parents[1].parent / "shared" / "seeds"
GUIDES = ("tuning-strategies.md", "peft-lora.md")


def snippets() -> list:
    if not SEEDS.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"{SEEDS} is absent: the guides are not here"))]
    found = []
    for guide in GUIDES:
        blocks = re.findall(r"```python\n(.*?)```", (SEEDS / guide).read_text(), re.S)
        for i, code in enumerate(blocks):
            if "TabularPipeline" in code or "TabularLeaderboard" in code:
                found.append(pytest.param(code, id=f"{guide.split('.')[0]}-{i}"))
    return found


def as_run_here(code: str) -> str:
    code = code.replace("'cuda'", "'cpu'")
    return re.sub(r"'epochs':\s*\d+", "'epochs': 1", code)


@pytest.fixture(scope="module")
def data():
    X, y = load_breast_cancer(return_X_y=True, as_frame=True)
    X, y = X.iloc[:, :8].iloc[::3], y.iloc[::3]  # 190 rows, 8 columns: seconds per fit at tiny size
    return X, y


@pytest.fixture
def namespace(data, monkeypatch):
    """The names the snippets assume, and tiny random weights for every model but the shipped nano."""
    def tiny_defaults(group, option):
        values = group_defaults(group, option)
        if group == "model" and option != "nano":
            values.update(pretrained=False, size="tiny", n_estimators=1, max_context_rows=256)
        if group == "strategy" and option != "inference":  # (a snippet's own keys still win)
            values.update(context_size=64, query_size=32, steps_per_epoch=5)
        return values

    monkeypatch.setattr(pipeline_module, "group_defaults", tiny_defaults)
    X, y = data
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    fitted = pipeline_module.TabularPipeline(model_name="TabICL", tuning_strategy="peft",
                                             tuning_params={"epochs": 1, "show_progress": False})
    # the machine's memory and the process's peak in place of a GPU's (one snippet prints them)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: type("Props", (), {"total_memory": 24e9})())
    monkeypatch.setattr(torch.cuda, "max_memory_allocated",
                        lambda *a: peak_mb(torch.device("cpu")) * 2**20)
    return {"X_train": X_train, "X_test": X_test, "y_train": y_train, "y_test": y_test,
            "X_val": X_test, "y_val": y_test, "load_your_dataset": lambda: (X, y),
            "TabularPipeline": pipeline_module.TabularPipeline, "torch": torch,
            "pipeline": fitted.fit(X_train, y_train)}


EXPECTED = {  # what a snippet prints, line by line (None: prints nothing)
    "tuning-strategies-0": None,
    "tuning-strategies-1": [r"(TabPFN|TabICL|TabDPT|Mitra|ContextTab|OrionMSP|OrionBix) - Accuracy: 0\.\d{4}"] * 7,
    "tuning-strategies-2": None,
    "tuning-strategies-3": [r"Validation Accuracy: 0\.\d{4}"],
    "tuning-strategies-4": None,
    "tuning-strategies-5": [rf"Rank {r}: Accuracy = 0\.\d{{4}}" for r in (4, 8, 16)],
    "peft-lora-8": None,
    "peft-lora-9": None,
    "peft-lora-13": [r"Available GPU memory: \d+\.\d GB", r"LoRA Accuracy: 0\.\d{4}"],
    "peft-lora-14": "ranking",
    "peft-lora-15": [rf"{name:12} \| Rank: {r:2} \| Time: +\d+\.\ds \| Memory: +\d+\.\dGB \| Accuracy: 0\.\d{{4}}"
                     for name, r in (("Ultra-Light", 2), ("Light", 4), ("Medium", 8), ("Heavy", 16))],
    "peft-lora-18": None,
}


@pytest.mark.parametrize("code", snippets())
def test_guide_snippet_runs_as_written(code, namespace, request, tmp_path, monkeypatch):
    name = request.node.callspec.id
    monkeypatch.chdir(tmp_path)  # snippets write best_model.pt, *.joblib
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(as_run_here(code), name, "exec"), namespace)  # noqa: S102 - the guides' own code
    # the progress bar (show_progress=True) aside, what the snippet printed
    lines = [line for line in out.getvalue().splitlines() if line.strip() and not line.startswith("fine-tuning")]
    expected = EXPECTED[name]
    if expected is None:
        assert lines == [], lines
    elif expected == "ranking":  # a DataFrame, best first: four contenders ranked 1..4, accuracies in (0, 1]
        ranking = namespace["lb"].get_ranking()
        assert list(ranking.index) == [1, 2, 3, 4]
        assert sorted(ranking["contender"]) == sorted(f"LoRA-r{r}" for r in (2, 4, 8, 16))
        assert ranking["error"].isna().all() and ranking["accuracy"].is_monotonic_decreasing
        assert ranking["accuracy"].between(0.5, 1).all()
        assert all(f"LoRA-r{r}" in out.getvalue() for r in (2, 4, 8, 16)) and "accuracy" in out.getvalue()
    else:
        assert len(lines) == len(expected), lines
        for line, pattern in zip(lines, expected):
            assert re.fullmatch(pattern, line), (pattern, line)
    if name == "tuning-strategies-3":  # save_checkpoint_path and the .joblib save are safe formats
        from safetensors.torch import load_file

        assert load_file("best_model.pt")  # safetensors, whatever the extension says
        reloaded = namespace["TabularPipeline"].load("fintuned_pipeline.joblib")
        X_val = namespace["X_val"]
        np.testing.assert_array_equal(reloaded.predict_proba(X_val), namespace["pipeline"].predict_proba(X_val))
    if name == "peft-lora-18":
        np.testing.assert_array_equal(namespace["predictions"], namespace["pipeline"].predict(namespace["X_test"]))
