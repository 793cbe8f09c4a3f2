"""The runs behind docs/results.md, and the tables and figures made from them.

    python benchmarks/results.py                  # run what is missing, then write the report
    python benchmarks/results.py --only repeat    # one section (repeat, hard, listops, param)
    python benchmarks/results.py --report-only    # tables and figures from the runs on disk

Every run is one ``sbmt train`` (or ``benchmarks/parameterisation.py``) process writing its own
run directory under ``--out`` (default ``runs/results``); a run whose ``summary.json`` exists is
not run again (``--rerun`` forces it). ``--jobs 2`` runs two at a time with
``OMP_WAIT_POLICY=PASSIVE`` (on 2 cores both then take about twice as long per step: compare
times within a table only). The report goes to ``docs/results-tables.md`` and the figures to
``docs/results-*.png``; docs/results.md quotes them and says what they mean.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SBMT = [sys.executable, "-m", "sbm_transformer.cli"]
PARAM = [sys.executable, str(ROOT / "benchmarks" / "parameterisation.py")]

# The demo's task and model (sbm_transformer.demo.REPEAT_TASK), and the baselines' sizes.
REPEAT = [
    "data.min_length=48", "data.max_length=64", "data.vocab=64", "data.train_size=16000",
    "data.val_size=1000", "data.test_size=1000", "model.num_clusters=16", "train.batch_size=32",
    "train.lr=2e-3", "train.warmup=80", "train.sparsity_weight=1e-4", "train.steps=2500",
    "train.eval_every=500", "model.linformer_k=32", "model.nystrom_landmarks=16",
    "model.performer_features=64",
]  # fmt: skip
# Twice as long and twice the vocabulary: the harder variant.
HARD = [*REPEAT, "data.min_length=96", "data.max_length=128", "data.vocab=128"]
# ListOps from the LRA generator at lengths 50-200, the original LRA model (preset lra).
LISTOPS_DATA = [
    "data.min_length=50", "data.max_length=200", "data.train_size=20000", "data.val_size=1000",
    "data.test_size=1000",
]  # fmt: skip
LISTOPS = [
    *LISTOPS_DATA, "data.max_len=200", "train.batch_size=32", "train.lr=5e-4",
    "train.warmup=150", "train.steps=1500", "train.eval_every=300",
]  # fmt: skip

SBM_FORMS = {
    "sbm": [],  # the default: learned rate scale from a dense start, Poisson edges
    "sbm-paper": ["model.sbm=paper"],
    "sbm-original": ["model.sbm=original"],
}


@dataclass
class Arm:
    name: str
    attention: str  # a mechanism name, or "simplex" for benchmarks/parameterisation.py
    extra: list[str] = field(default_factory=list)


@dataclass
class Section:
    name: str
    title: str
    task: str
    preset: str
    settings: list[str]
    arms: list[Arm]
    seeds: tuple[int, ...]


def _forms(names: Sequence[str]) -> list[Arm]:
    return [Arm(n, "sbm", SBM_FORMS[n]) for n in names]


SECTIONS = {
    "repeat": Section(
        "repeat", "Repeated tokens, the demo's setting (lengths 48-64, vocabulary 64)",
        "repeat", "tiny", REPEAT,
        [*_forms(["sbm", "sbm-paper", "sbm-original"]), Arm("softmax", "softmax")], (0, 1, 2),
    ),
    "param": Section(
        "param", "Repeated tokens: simplex memberships and an unbounded block matrix",
        "repeat", "tiny", REPEAT, [Arm("sbm-simplex", "simplex")], (0, 1, 2),
    ),
    "hard": Section(
        "hard", "Repeated tokens, harder (lengths 96-128, vocabulary 128)", "repeat", "tiny",
        HARD,
        [*_forms(["sbm"]), *(Arm(a, a) for a in (
            "softmax", "linear", "performer", "nystromformer", "linformer", "none"))],
        (0, 1, 2),
    ),
    "listops": Section(
        "listops", "ListOps (LRA generator, lengths 50-200, LRA model)", "listops", "lra",
        LISTOPS,
        [
            *_forms(["sbm", "sbm-original"]),
            Arm("sbm-sparse-start", "sbm", ["model.init_density=0.1"]),
            Arm("softmax", "softmax"),
        ],
        (0,),
    ),
}  # fmt: skip


def run_dir(out: Path, section: Section, arm: Arm, seed: int) -> Path:
    return out / section.name / f"{arm.name}-s{seed}"


def command(out: Path, section: Section, arm: Arm, seed: int) -> list[str]:
    settings = [*section.settings, f"train.seed={seed}", *arm.extra]
    if section.task == "listops":
        settings.append(f"data.dir={out / 'data' / 'listops'}")
    target = run_dir(out, section, arm, seed)
    if arm.attention == "simplex":
        return [*PARAM, "--seed", str(seed), "--out", str(target), "--set", *settings]
    return [
        *SBMT, "train", "--task", section.task, "--preset", section.preset, "--quiet",
        "--overwrite", "--attention", arm.attention, "--run-dir", str(target), "--set", *settings,
    ]  # fmt: skip


def run_all(
    out: Path,
    sections: list[Section],
    jobs: int,
    rerun: bool,
    seeds: Sequence[int] | None = None,
    arms: Sequence[str] | None = None,
) -> None:
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    if (
        any(s.task == "listops" for s in sections)
        and not (out / "data" / "listops" / "basic_test.tsv").exists()
    ):
        subprocess.run(
            [*SBMT, "data", "listops", "--preset", "lra", "--out", str(out / "data" / "listops"),
             "--set", *LISTOPS_DATA],
            check=True, env=env,
        )  # fmt: skip
    todo = [
        (s, a, seed)
        for s in sections
        for seed in s.seeds
        for a in s.arms
        if (seeds is None or seed in seeds) and (arms is None or a.name in arms)
        if rerun or not (run_dir(out, s, a, seed) / "summary.json").exists()
    ]

    def one(item: tuple[Section, Arm, int]) -> None:
        s, a, seed = item
        target = run_dir(out, s, a, seed)
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"run: {s.name} {a.name} seed {seed}", flush=True)
        with open(target.parent / f"{a.name}-s{seed}.log", "w") as log:
            done = subprocess.run(
                command(out, s, a, seed), stdout=log, stderr=subprocess.STDOUT, env=env
            )
        if done.returncode != 0:
            print(f"FAILED ({done.returncode}): {s.name} {a.name} seed {seed}; see its log")

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, todo))


# ----------------------------------------------------------------------------------- report
def _summaries(out: Path, section: Section, arm: Arm) -> list[dict]:
    found = []
    for seed in section.seeds:
        path = run_dir(out, section, arm, seed) / "summary.json"
        if path.exists():
            found.append(json.loads(path.read_text()))
    return found


def _mean_spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    mean, low, high = (format(v, fmt) for v in (statistics.mean(values), min(values), max(values)))
    return f"{mean} ({low}-{high})"


def section_table(out: Path, section: Section) -> str:
    lines = [
        f"### {section.title}",
        "",
        "| attention | runs | test accuracy: mean (min-max) | per seed | density: mean (min-max) "
        "| ms / step |",
        "|---|---:|---|---|---|---:|",
    ]
    majority = None
    for arm in section.arms:
        runs = _summaries(out, section, arm)
        if not runs:
            lines.append(f"| {arm.name} | 0 | not run | | | |")
            continue
        majority = majority or runs[0].get("majority_accuracy")
        acc = [r["test_accuracy"] for r in runs]
        dens = [r["test_density"] for r in runs if r.get("test_density") is not None]
        density = _mean_spread([100 * d for d in dens], ".1f") + " %" if dens else (
            "0 (none)" if arm.attention == "none" else "1 (full)"
        )  # fmt: skip
        ms = statistics.mean(r["seconds_per_step"] * 1000 for r in runs)
        lines.append(
            f"| {arm.name} | {len(runs)} | {_mean_spread(acc, '.4f')} | "
            f"{', '.join(f'{a:.4f}' for a in acc)} | {density} | {ms:.0f} |"
        )
    if majority:
        lines += ["", f"Always predicting the most common label scores {majority:.4f}."]
    return "\n".join(lines)


def _density_rows(path: Path) -> dict[tuple[int, int], tuple[list[int], list[float]]]:
    curves: dict[tuple[int, int], tuple[list[int], list[float]]] = {}
    if not path.exists():
        return curves
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r["split"] != "train":
                continue
            steps, values = curves.setdefault((int(r["layer"]), int(r["head"])), ([], []))
            steps.append(int(r["step"]))
            values.append(float(r["density"]))
    return curves


def plot_density_curves(out: Path, section: Section, path: Path) -> Path | None:
    """One panel per SBM arm: every layer's and head's density over training, every seed."""
    arms = [a for a in section.arms if a.attention in ("sbm", "simplex")]
    if not arms:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(arms), figsize=(4.2 * len(arms), 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, arm in zip(axes[0], arms, strict=True):
        for seed in section.seeds:
            curves = _density_rows(run_dir(out, section, arm, seed) / "density.csv")
            for i, (key, (steps, values)) in enumerate(sorted(curves.items())):
                label = f"layer {key[0]}, head {key[1]}" if seed == section.seeds[0] else None
                ax.plot(steps, values, color=colors[i % len(colors)], lw=0.8, alpha=0.8,
                        label=label)  # fmt: skip
        ax.set_title(arm.name)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("edge density (train batches)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{section.title}: density per layer and head, {len(section.seeds)} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(out: Path, sections: list[Section], docs: Path) -> None:
    parts = [
        "# Results tables (generated)",
        "",
        "Written by `python benchmarks/results.py` from the runs under its `--out` directory; "
        "see [results.md](results.md) for the settings and what the numbers mean. Test accuracy "
        "is that of the checkpoint with the best validation accuracy; density = sampled edges / "
        "(query, key) pairs on the test set, averaged over layers and heads; ms / step = "
        "training wall time / steps (evaluation included), averaged over the runs.",
        "",
    ]
    for section in sections:
        parts += [section_table(out, section), ""]
        figure = plot_density_curves(out, section, docs / f"results-{section.name}-density.png")
        if figure is not None:
            parts += [f"![density per layer and head]({figure.name})", ""]
    (docs / "results-tables.md").write_text("\n".join(parts))
    print(f"report: {docs / 'results-tables.md'}")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/results", help="where the runs go")
    p.add_argument("--docs", default=str(ROOT / "docs"), help="where the report goes")
    p.add_argument("--only", nargs="*", choices=list(SECTIONS), help="these sections only")
    p.add_argument("--seeds", type=int, nargs="*", help="these seeds only")
    p.add_argument("--arms", nargs="*", help="these arms only (e.g. sbm softmax)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--rerun", action="store_true", help="run again even where results exist")
    p.add_argument("--report-only", action="store_true", help="write the report, run nothing")
    a = p.parse_args(argv)
    sections = [SECTIONS[n] for n in (a.only or SECTIONS)]
    out = Path(a.out)
    if not a.report_only:
        run_all(out, sections, a.jobs, a.rerun, a.seeds, a.arms)
    report(out, list(SECTIONS.values()), Path(a.docs))


if __name__ == "__main__":
    main()
