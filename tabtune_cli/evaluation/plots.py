"""Pictures a person would rather look at than read: training curves, and runs side by side (tabtune report)."""

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
    from .metrics import HIGHER_IS_BETTER

    best = (max if val_key.removeprefix("val_") in HIGHER_IS_BETTER else min)(epochs, key=lambda e: e[1])
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    rundir.write_file(path, lambda tmp: fig.savefig(tmp, format="png"))
    _pyplot().close(fig)
    return path


def rank_tradeoff(points, metric: str, better: str, path: Path, title: str) -> Path:
    """The peft guide's memory–speed–accuracy trade-off of a LoRA rank sweep, one PNG of four panels against
    rank: ``metric``, fit seconds, peak memory and trainable parameters. ``points``: a DataFrame with columns
    ``rank``, ``metric``, ``fit_seconds``, ``peak_memory_mb``, ``trainable_params`` and ``series`` (one line
    per series: what else varied); ``better``: "higher" or "lower"."""
    plt = _pyplot()
    panels = [("metric", f"test {metric} ({better} is better)", "{:.3f}"), ("fit_seconds", "fit seconds", "{:.3g}"),
              ("peak_memory_mb", "peak memory (MiB)", "{:,.0f}"), ("trainable_params", "trainable parameters", "{:,.0f}")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.2), dpi=110)
    ranks = sorted(points["rank"].unique())
    groups = list(points.groupby("series", sort=False))
    for axis, (column, label, fmt) in zip(axes.flat, panels):
        for name, group in groups:
            group = group.sort_values("rank")
            line = group["rank"].is_unique  # several runs a rank (a search): points, not a line
            axis.plot(group["rank"], group[column], marker="o", linestyle="-" if line else "none",
                      alpha=1 if line else 0.6, label=name or None)
            if len(groups) == 1 and line:  # one line: its values written beside its points
                for x, y in zip(group["rank"], group[column]):
                    axis.annotate(fmt.format(y), (x, y), textcoords="offset points", xytext=(0, 7), ha="center",
                                  fontsize=8)
        if column in ("peak_memory_mb", "trainable_params"):
            axis.yaxis.set_major_formatter("{x:,.0f}")
        axis.set_xscale("log", base=2)
        axis.set_xticks(ranks, [str(r) for r in ranks])
        axis.minorticks_off()
        axis.set_xlabel("LoRA rank (lora.r)")
        axis.set_ylabel(label)
        axis.margins(x=0.08, y=0.18)
        axis.grid(alpha=0.3)
    if len(groups) > 1:
        axes.flat[0].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def runs_overview(runs, metric: str, better: str, path: Path, title: str) -> Path:
    """Every run's test ``metric`` (a bar each; a run without metrics is marked with its status) beside the
    metric against fit seconds, one PNG. ``runs``: a DataFrame with columns ``label`` ("<job>: <what varied>"),
    ``status``, ``metric`` and ``fit_seconds``, in the table's order."""
    plt = _pyplot()
    n = len(runs)
    fig, (bars, scatter) = plt.subplots(1, 2, figsize=(11, max(3.2, 0.38 * n + 1.6)), dpi=110,
                                        gridspec_kw={"width_ratios": [1.3, 1]})
    y = list(range(n))[::-1]  # the first run on top, as in the table
    done = runs["metric"].notna().to_numpy()
    values = runs["metric"].fillna(0).to_numpy()
    bars.barh([p for p, d in zip(y, done) if d], values[done], color="tab:blue", alpha=0.8)
    top = max(values[done], default=1.0) or 1.0
    for position, value, ok, status in zip(y, values, done, runs["status"]):
        text, color = (f"{value:.4f}", "black") if ok else (status, "tab:red")
        bars.text((value if ok else 0) + top * 0.01, position, text, va="center", fontsize=8, color=color)
    bars.set_yticks(y, runs["label"], fontsize=8)
    bars.set_ylim(-0.6, n - 0.4)
    bars.set_xlim(0, top * 1.18)
    bars.set_xlabel(f"test {metric} ({better} is better)")
    bars.grid(axis="x", alpha=0.3)
    complete = runs[done]
    scatter.scatter(complete["fit_seconds"], complete["metric"], color="tab:blue")
    for _, row in complete.iterrows():  # the label's head (a job number): the bars beside say the rest
        scatter.annotate(row["label"].split(":")[0], (row["fit_seconds"], row["metric"]),
                         textcoords="offset points", xytext=(4, 4), fontsize=8)
    scatter.set_xlabel("fit seconds")
    scatter.set_ylabel(f"test {metric}")
    scatter.margins(0.15)
    scatter.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


# ---- tabtune leaderboard --------------------------------------------------------------------------------

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def _entry_styles(entries: list[str]) -> dict[str, tuple[str, str]]:
    """Each leaderboard entry's (colour, marker), the same in every plot of a board."""
    colours = _pyplot().get_cmap("tab10").colors
    return {e: (colours[i % len(colours)], _MARKERS[i % len(_MARKERS)]) for i, e in enumerate(entries)}


def _panels(n: int, panel_width: float, panel_height: float, **kwargs):
    """A figure of ``n`` panels, at most three a row; the unused ones hidden."""
    import math

    plt = _pyplot()
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_width * ncols + 1.2, panel_height * nrows + 0.9),
                             dpi=110, squeeze=False, **kwargs)
    for axis in axes.flat[n:]:
        axis.set_visible(False)
    return fig, list(axes.flat[:n])


def _better(metric: str) -> str:
    from .metrics import HIGHER_IS_BETTER

    return "higher" if metric in HIGHER_IS_BETTER else "lower"


def _suptitle(fig, title: str) -> None:
    """``title`` above every panel, its lines wrapped to the figure's width."""
    import textwrap

    width = int(fig.get_figwidth() * 13)
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in title.splitlines()), fontsize=9)


def leaderboard_scores(board, metrics: dict, path: Path, title: str) -> Path:
    """Each entry's mean ``metrics[table]`` over the folds with ± one standard deviation as error bars, one
    panel per table, the entries in the board's order (first on top), each value written right of the
    panel (the best in bold); an entry that failed on every fold says so. ``board``:
    ``TabularLeaderboard.aggregate``'s rows."""
    import math

    entries = list(dict.fromkeys(board["contender"]))
    tables = list(dict.fromkeys(board["dataset"]))
    styles = _entry_styles(entries)
    fig, axes = _panels(len(tables), 5.2, 0.42 * len(entries) + 1.2, sharey=True)
    positions = {e: len(entries) - 1 - i for i, e in enumerate(entries)}
    for axis, table in zip(axes, tables):
        metric = metrics[table]
        rows = board[board["dataset"] == table].set_index("contender")
        means = rows[f"{metric}_mean"].astype(float)
        stds = rows[f"{metric}_std"].astype(float).fillna(0.0)
        scored = means.dropna()
        best = None if scored.empty else (scored.idxmax() if _better(metric) == "higher" else scored.idxmin())
        values = axis.get_yaxis_transform()  # x in axes units, y in data units: the column right of the panel
        for entry in entries:
            y = positions[entry]
            mean = means.get(entry, math.nan)
            if math.isnan(mean):
                axis.text(1.03, y, "failed", transform=values, color="tab:red", va="center", fontsize=8)
                continue
            colour, marker = styles[entry]
            axis.errorbar(mean, y, xerr=stds[entry], fmt=marker, color=colour, ecolor=colour, elinewidth=1.6,
                          capsize=4, markersize=7)
            text = f"{mean:.4f}" + (f" ± {stds[entry]:.4f}" if stds[entry] else "")
            axis.text(1.03, y, text, transform=values, va="center", fontsize=8,
                      fontweight="bold" if entry == best else "normal")
        axis.margins(x=0.08)
        axis.locator_params(axis="x", nbins=5)  # few enough ticks for four-decimal labels not to touch
        axis.set_ylim(-0.6, len(entries) - 0.4)
        axis.set_yticks(list(positions.values()), list(positions))
        axis.set_xlabel(f"{metric} ({_better(metric)} is better)")
        axis.set_title(table, fontsize=10)
        axis.grid(axis="x", alpha=0.3)
    _suptitle(fig, title)
    return _save(fig, path)


def leaderboard_fit_time(board, metrics: dict, path: Path, title: str) -> Path:
    """Each entry's mean ``metrics[table]`` against its mean fit seconds, ± one standard deviation both
    ways, one panel per table and one legend for all (a log time axis where times span more than 20x)."""
    from matplotlib.colors import to_rgba

    entries = list(dict.fromkeys(board["contender"]))
    tables = list(dict.fromkeys(board["dataset"]))
    styles = _entry_styles(entries)
    fig, axes = _panels(len(tables), 4.4, 3.6)
    for axis, table in zip(axes, tables):
        metric = metrics[table]
        rows = board[board["dataset"] == table].set_index("contender")
        times = rows["fit_seconds_mean"].astype(float)
        for entry in entries:
            if entry not in rows.index or rows[f"{metric}_mean"].isna()[entry] or times.isna()[entry]:
                continue
            colour, marker = styles[entry]
            spread = 0.0 if rows["fit_seconds_std"].isna()[entry] else rows.loc[entry, "fit_seconds_std"]
            # below zero seconds there is nothing to draw (nor on a log axis): the bar stops at a tenth of the mean
            xerr = [[min(spread, 0.9 * times[entry])], [spread]]
            # the bars faint, the points solid: the folds' spread is shared by entries scored on the same
            # folds, and would otherwise hide which point is whose
            axis.errorbar(times[entry], rows.loc[entry, f"{metric}_mean"], xerr=xerr,
                          yerr=0 if rows[f"{metric}_std"].isna()[entry] else rows.loc[entry, f"{metric}_std"],
                          fmt=marker, color=colour, ecolor=to_rgba(colour, 0.4), elinewidth=1.2, capsize=3,
                          markersize=8, markeredgecolor="black", markeredgewidth=0.6, label=entry)
        shown = times.dropna()
        if len(shown) and shown.min() > 0 and shown.max() / shown.min() > 20:
            axis.set_xscale("log")
        axis.locator_params(axis="y", nbins=6)
        axis.set_xlabel("fit seconds (mean over folds)")
        axis.set_ylabel(f"{metric} ({_better(metric)} is better)")
        axis.set_title(table, fontsize=10)
        axis.margins(0.15)
        axis.grid(alpha=0.3)
    handles = {}
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    _suptitle(fig, title)
    fig.tight_layout()
    if handles:  # one legend for every panel, on the right, outside them
        fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5),
                   fontsize=8, frameon=False)
    rundir.write_file(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    _pyplot().close(fig)
    return path
