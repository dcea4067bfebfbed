"""``make bench``: every performance figure of tabtune, measured side by side in one run.

Writes ``bench/results.md`` (a section per topic, with the commands that reproduce it),
``bench/results.json`` and the plots. Each topic is a module ``benchmarks/<topic>.py`` with

    def run(out_dir: pathlib.Path, quick: bool) -> dict:
        return {"title": ..., "markdown": ..., "data": {...}, "commands": [...]}

Timings are medians of interleaved repeats, reported as ratios; nothing here is asserted.
``--only a,b`` runs some topics and keeps the others' last results (each section says when and
where it was measured); ``--quick`` shrinks sizes and repeats (a smoke check of the benchmark itself,
not figures to quote).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# in the order results.md shows them
TOPICS = ["startup", "inference_tabicl", "inference_tabpfn", "inference_tabdpt", "context_memory", "inference_nano",
          "finetune_nano", "context_tuning", "peft_memory", "flights", "precision", "distributed"]


def timed(call) -> tuple[float, object]:
    """``(seconds, result)`` of ``call()``."""
    started = time.perf_counter()
    out = call()
    return time.perf_counter() - started, out


def binary_table(n: int, n_features: int, seed: int = 0):
    """``n`` rows of normal features and a noisy yes/no label read from x0 and x1: the inference topics' table."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(n, n_features)), columns=[f"x{i}" for i in range(n_features)])
    y = pd.Series(np.where(X["x0"] + 0.5 * X["x1"] + rng.normal(scale=0.5, size=n) > 0, "yes", "no"), name="label")
    return X, y


def standalone(doc: str, run) -> None:
    """One topic alone, as a script: ``python benchmarks/<topic>.py [--quick] [--out DIR]``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="bench")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(run(Path(args.out), args.quick)["markdown"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench", help="output folder (default: bench)")
    parser.add_argument("--only", default="", help="comma-separated topics (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat: checks the benchmark runs")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [t for t in args.only.split(",") if t] or TOPICS
    unknown = [t for t in chosen if t not in TOPICS]
    if unknown:
        parser.error(f"unknown topic {unknown[0]!r} (topics: {', '.join(TOPICS)})")
    sys.path.insert(0, str(HERE))
    json_path = out / "results.json"

    def saved() -> dict:  # re-read before each write: another `--only` run may have added its topics meanwhile
        return json.loads(json_path.read_text()) if json_path.is_file() else {}

    # topics not run this time keep their last results (a full run on a 2-core machine takes hours)
    results = saved() if args.only else {}
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
               f"{torch.__version__}, CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}"
               f"{', QUICK (not figures to quote)' if args.quick else ''}")
    for topic in chosen:
        if not (HERE / f"{topic}.py").is_file():
            continue
        started = time.perf_counter()
        print(f"bench: {topic} ...", flush=True)
        result = importlib.import_module(topic).run(out, args.quick)
        results = {**(saved() if args.only else results), topic: {
            **result, "seconds": time.perf_counter() - started,
            "measured": f"{time.strftime('%Y-%m-%d %H:%M')}, {machine}"}}
        json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    render(out, saved() if args.only else results)
    print(f"bench: wrote {out / 'results.md'}")
    return 0


def render(out: Path, results: dict) -> None:
    """``results.md`` from the topics' results (``results.json``'s content), in the order of ``TOPICS``."""
    sections = []
    for topic in TOPICS:
        if topic not in results:
            sections.append(f"## {topic}\n\nNot measured: `make bench ONLY={topic}`"
                            f"{'' if (HERE / f'{topic}.py').is_file() else f' (benchmarks/{topic}.py does not exist)'}.\n")
            continue
        r = results[topic]
        commands = "\n".join(r.get("commands", [])) or f"make bench ONLY={topic}"
        sections.append(f"## {r['title']}\n\n{r['markdown'].strip()}\n\nReproduce:\n\n```bash\n{commands}\n```\n\n"
                        f"_(measured {r['measured']}; {r['seconds']:.0f} s)_\n")
    (out / "results.md").write_text(
        "# tabtune benchmark\n\nWritten by `make bench` (every topic) or `make bench ONLY=a,b` (those topics; the "
        "others keep their last results). Each section ends with the command that reproduces it and when, on "
        "what and for how long it was measured; `results.json` holds the raw figures.\n\n" + "\n".join(sections))


if __name__ == "__main__":
    sys.exit(main())
