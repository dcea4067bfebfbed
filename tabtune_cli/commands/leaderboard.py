"""``tabtune leaderboard``: run contenders on several tables (conf/leaderboard.yaml) and tabulate them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from .. import rundir
from ..data.builtin import BUILTIN, TARGET, load_builtin
from ..errors import TabTuneError
from ..hydra_conf import check_overrides, conf_dir, one_line_errors


def load_tables(names: list[str], shared_dir: Path) -> dict:
    """``name -> (X, y)`` for built-in tables and the tables of ``shared_dir``; absent ones are skipped."""
    manifest_path = shared_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    tables = {}
    for name in names:
        if name in BUILTIN:
            frame, target = load_builtin(name), TARGET
        elif name in manifest:
            frame, target = pd.read_parquet(shared_dir / manifest[name]["file"]), manifest[name]["target"]
        else:
            print(f"skipped {name}: not built in and not in {manifest_path}", file=sys.stderr)
            continue
        frame = frame[frame[target].notna()]
        tables[name] = (frame.drop(columns=target), frame[target])
    if not tables:
        raise TabTuneError(f"no tables to run: none of {names} is built in or in {manifest_path}")
    return tables


def run(argv: list[str]) -> int:
    import hydra

    check_overrides(argv, "leaderboard")
    sys.argv = ["tabtune leaderboard", *argv]
    main = hydra.main(config_path=str(conf_dir()), config_name="leaderboard", version_base="1.3")(one_line_errors(_job))
    main()
    return 0


def _job(cfg: DictConfig) -> None:
    from rich.progress import Progress

    from ..evaluation.leaderboard import TabularLeaderboard

    values = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    try:
        tables = load_tables(values["datasets"], Path(values["shared_dir"]))
    except TabTuneError:
        rundir.discard_if_empty(values["out_dir"])  # the folder Hydra made for this run
        raise
    board = TabularLeaderboard(tables, values["contenders"], splits=values["splits"], test_size=values["test_size"],
                               max_train_rows=values["max_train_rows"], max_test_rows=values["max_test_rows"],
                               seed=values["seed"])
    out = rundir.create(values["out_dir"])
    rundir.write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    total = len(tables) * values["splits"] * len(values["contenders"])
    with Progress() as progress:
        bar = progress.add_task("leaderboard", total=total)

        def on_result(row):
            rundir.append_jsonl(out / "results.jsonl", row)
            progress.update(bar, advance=1, description=f"{row['dataset']} · {row['contender']}")

        results = board.run(on_result=on_result)
    summary = TabularLeaderboard.summary(results)
    rundir.write_parquet(out / "results.parquet", results)
    rundir.write_json(out / "summary.json", summary.to_dict(orient="records"))
    rundir.write_text(out / "leaderboard.md", to_markdown(summary))
    rundir.finish(out, "complete")
    show(summary)
    Console().print(f"leaderboard: [bold]{out / 'leaderboard.md'}[/bold]")


def to_markdown(summary: pd.DataFrame) -> str:
    lines = ["| dataset | contender | ROC AUC | accuracy | log loss | seconds |", "|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        lines.append(f"| {r.dataset} | {r.contender} | {r.roc_auc:.4f} | {r.accuracy:.4f} | {r.log_loss:.4f} | "
                     f"{r.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def show(summary: pd.DataFrame) -> None:
    table = Table(title="leaderboard (mean over splits)")
    for col in ("dataset", "contender", "ROC AUC", "accuracy", "log loss", "seconds"):
        table.add_column(col, justify="left" if col in ("dataset", "contender") else "right")
    previous = None
    for r in summary.itertuples():
        if previous is not None and r.dataset != previous:
            table.add_section()
        previous = r.dataset
        table.add_row(r.dataset, r.contender, f"{r.roc_auc:.4f}", f"{r.accuracy:.4f}", f"{r.log_loss:.4f}",
                      f"{r.seconds:.1f}")
    Console().print(table)
