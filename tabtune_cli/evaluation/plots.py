"""Pictures a person would rather look at than read: training curves."""

from __future__ import annotations

from pathlib import Path

from .. import rundir


def training_curves(history: list[dict], path: Path, title: str) -> Path | None:
    """Training loss per step and the validation metric per epoch, one PNG; None when nothing trained."""
    steps = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val_key = next((k for h in history for k in h if k.startswith("val_")), None)
    if not steps or val_key is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [(h["step"], h[val_key]) for h in history if val_key in h]
    fig, loss_axis = plt.subplots(figsize=(7, 4), dpi=110)
    loss_axis.plot(*zip(*steps), color="tab:blue", alpha=0.8, label="training loss (per step)")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    val_axis = loss_axis.twinx()
    val_axis.plot(*zip(*epochs), color="tab:orange", marker="o", label=f"{val_key} (per epoch; step 0 = start)")
    best = min(epochs, key=lambda e: e[1])
    val_axis.scatter([best[0]], [best[1]], s=120, facecolors="none", edgecolors="tab:red", zorder=3,
                     label="best (kept)")
    val_axis.set_ylabel(val_key, color="tab:orange")
    lines = loss_axis.get_legend_handles_labels()[0] + val_axis.get_legend_handles_labels()[0]
    labels = loss_axis.get_legend_handles_labels()[1] + val_axis.get_legend_handles_labels()[1]
    loss_axis.legend(lines, labels, loc="upper right", fontsize=8)
    loss_axis.set_title(title)
    fig.tight_layout()
    rundir.write_file(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
