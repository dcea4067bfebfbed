"""Startup: what a fresh ``tabtune`` process costs to list, to help and to validate (issue #15: under 1 s each).

Each command runs in a fresh process from a scratch folder, the commands interleaved (a round runs each
once), ``REPEATS`` rounds; wall seconds from spawn to exit and the command's own peak resident memory,
medians. A small launcher process (``LAUNCHER``) spawns each command and reports its ``ru_maxrss`` from
``os.wait4``: spawned from this process, a child's peak would start at this process's size (torch is
imported here), and ``RUSAGE_CHILDREN`` would be the largest child so far.
``python -c pass`` is the interpreter's floor and ``python -c "import torch"`` what any command that
imports torch pays at least. ``tabtune validate`` checks a copy of the shipped train config (``tabtune
cp train``): nano on breast_cancer, so reading that table (scikit-learn's loader) and its split are part of
the check. Which model packages a command imports is read once more, untimed, from ``python -X importtime``.

Run alone: ``python benchmarks/startup.py [--quick] [--out bench]``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPEATS, QUICK_REPEATS = 5, 2
TARGET_S = 1.0
MODEL_PACKAGES = ("torch", "tabicl", "tabpfn", "tabdpt", "peft", "transformers")
COMMAND = ".venv/bin/python benchmarks/bench.py --only startup --out bench"


def tabtune() -> list[str]:
    """The console script beside this interpreter (what a user runs), else ``python -m tabtune_cli``."""
    script = Path(sys.executable).parent / "tabtune"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "tabtune_cli"]


def commands() -> dict[str, list[str]]:
    python, cli = [sys.executable], tabtune()
    return {"python -c pass": [*python, "-c", "pass"],
            "python -c 'import torch'": [*python, "-c", "import torch"],
            "tabtune --help": [*cli, "--help"],
            "tabtune ls": [*cli, "ls"],
            "tabtune train --help": [*cli, "train", "--help"],
            "train's config checks (python -c)": [*python, "-c", CONFIG_CHECKS],
            "tabtune validate startup.yaml": [*cli, "validate", "startup.yaml"]}


# what `tabtune train` checks before it reads any data: compose the config, type and value checks, every model
CONFIG_CHECKS = ("from tabtune_cli.commands.train import plain_configs; from tabtune_cli.commands.hydra_conf import "
                 "check_overrides; check_overrides(['model=tabicl', 'strategy=peft'], 'train', validate=plain_configs)")


# spawns argv (output discarded), waits, prints [wall seconds, peak RSS in KiB, exit code] of that one child
LAUNCHER = """
import json, os, sys, time
quiet = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_WRONLY, 0) for fd in (1, 2)]
started = time.perf_counter()
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ, file_actions=quiet)
_, status, usage = os.wait4(pid, 0)
print(json.dumps([time.perf_counter() - started, usage.ru_maxrss, os.waitstatus_to_exitcode(status)]))
"""


def timed(argv: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one run of ``argv``; a failure raises."""
    launched = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], cwd=cwd, capture_output=True, text=True,
                              check=True)
    seconds, kib, code = json.loads(launched.stdout)
    if code != 0:  # once more, to show why
        failed = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
        raise RuntimeError(f"startup: {' '.join(argv)} exited {code}: {failed.stderr[-500:]}")
    return seconds, kib / 1024  # ru_maxrss is in KiB on Linux


def model_packages(argv: list[str], cwd: Path) -> list[str]:
    """The model packages ``argv`` imports (``-X importtime``; a console script is run as ``-m tabtune_cli``)."""
    if argv[0] != sys.executable:
        argv = [sys.executable, "-m", "tabtune_cli", *argv[1:]]
    result = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], cwd=cwd, capture_output=True, text=True)
    names = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    return [p for p in MODEL_PACKAGES if p in names]


def measure(quick: bool) -> dict:
    repeats = QUICK_REPEATS if quick else REPEATS
    runs = {name: [] for name in commands()}
    with tempfile.TemporaryDirectory() as folder:
        cwd = Path(folder)
        subprocess.run([*tabtune(), "cp", "train", "startup.yaml"], cwd=cwd, check=True, capture_output=True)
        for _ in range(repeats):  # interleaved: a slow moment of the machine touches every command alike
            for name, argv in commands().items():
                runs[name].append(timed(argv, cwd))
        imported = {name: model_packages(argv, cwd) for name, argv in commands().items()}
    rows = {}
    for name, pairs in runs.items():
        seconds = statistics.median(s for s, _ in pairs)
        rows[name] = {"seconds": seconds, "peak_rss_mb": statistics.median(m for _, m in pairs),
                      "target_ratio": seconds / TARGET_S, "model_packages": imported[name],
                      "runs_s": [s for s, _ in pairs], "runs_rss_mb": [m for _, m in pairs]}
    return {"repeats": repeats, "target_s": TARGET_S, "commands": rows}


def markdown(data: dict) -> str:
    lines = ["| command | wall s | peak RSS MB | / 1 s target | model packages imported |", "|---|---|---|---|---|"]
    for name, row in data["commands"].items():
        lines.append(f"| `{name}` | {row['seconds']:.2f} | {row['peak_rss_mb']:.0f} | {row['target_ratio']:.2f}x "
                     f"| {', '.join(row['model_packages']) or 'none'} |")
    table = "\n".join(lines)
    return f"""
Fresh processes, the commands interleaved, {data['repeats']} rounds, medians: wall time from spawn to exit
and the command's own peak RSS (`os.wait4` in a small launcher). `tabtune validate` checks a copy of the shipped train config
(nano on breast_cancer: reading the table with scikit-learn's loader is part of it).

{table}

Target (issue #15): listing, help and validation import no model package (torch, tabicl, tabpfn, tabdpt,
peft, transformers; `tests/test_cli.py` checks it for every command above and for the config checks
`tabtune train` makes) and answer within 1 s. The registry lists each model's torch-free spec
(`tabtune_cli/models/specs/`); an adapter, with torch and its model's package, is imported only when a
model is built; `train --help` is ours, from the config tree and one composition (Hydra's own composed
every group option: 5 s). {verdict(data)}
"""


def verdict(data: dict) -> str:
    ours = {name: row for name, row in data["commands"].items() if not name.startswith("python -c")}
    over = [f"`{name}` ({row['seconds']:.2f} s)" for name, row in ours.items() if row["seconds"] > TARGET_S]
    text = f"Under 1 s: {sum(r['seconds'] <= TARGET_S for r in ours.values())} of {len(ours)}"
    if not over:
        return text + "."
    return (text + f"; over: {', '.join(over)}. `tabtune validate` also reads and splits the table, as `train` "
            "does before its run directory: scikit-learn's import (its loader and the stratified split; about "
            "2 s, most of it scipy.stats) is the rest, which no config check needs.")


def run(out_dir: Path, quick: bool) -> dict:
    data = measure(quick)
    (Path(out_dir) / "startup.json").write_text(json.dumps(data, indent=2) + "\n")
    return {"title": "Startup: listing, help and validation without the models",
            "markdown": markdown(data), "data": data,
            "commands": [COMMAND + (" --quick" if quick else ""),
                         ".venv/bin/python -m pytest -q tests/test_cli.py -k import_no_model_package"]}


if __name__ == "__main__":
    from bench import standalone

    standalone(__doc__, run)
