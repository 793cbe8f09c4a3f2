"""Run directories: checks before anything is written, the saved configuration, metrics rows."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

from sbm_transformer.config import RunConfig, from_dict


class RunDirError(ValueError):
    """A run directory cannot be used as asked (exists without --resume/--overwrite, ...)."""


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Raise RunDirError unless ``run_dir`` can be used as asked; changes nothing on disk."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other")
    if resume:
        if not (run_dir / "config.yaml").exists():
            runs = sorted(p.parent.name for p in run_dir.glob("*/config.yaml"))
            hint = (
                f"; it holds the runs {', '.join(runs)} of a comparison: continue it with "
                f"sbmt compare ... --out {run_dir} --resume"
                if runs
                else ""
            )
            raise RunDirError(
                f"cannot resume {run_dir}: it has no config.yaml (not a run directory){hint}"
            )
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunDirError(
                f"run directory {run_dir} exists; pass --resume to continue it or --overwrite "
                "to replace it"
            )
        if not (run_dir / "config.yaml").exists():
            raise RunDirError(
                f"refusing to overwrite {run_dir}: it is not a run directory (no config.yaml)"
            )


def create_run_dir(run_dir: Path, *, overwrite: bool) -> None:
    """Make ``run_dir`` (after :func:`check_run_dir`), replacing an old run when ``overwrite``."""
    if overwrite and run_dir.exists() and any(run_dir.iterdir()):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def checkpoint_step(ckpt_dir: Path, name: str) -> int | None:
    """The step of checkpoint ``name`` in ``ckpt_dir`` from its index, None when unreadable."""
    try:
        return int(json.loads((ckpt_dir / f"{name}.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def no_last_checkpoint(run_dir: Path, cfg: RunConfig) -> RunDirError:
    """The error for ``--resume`` on a run without ``checkpoints/last.json``: what is there, and
    how to start over (resuming from step 0 would silently discard its metrics)."""
    found = []
    best = checkpoint_step(run_dir / "checkpoints", "best")
    if best is not None:
        found.append(f"a best checkpoint at step {best} (sbmt eval {run_dir} evaluates it)")
    steps = [int(r["step"]) for r in metric_rows(run_dir / "metrics.csv")]
    if steps:
        found.append(f"metrics up to step {max(steps)}")
    what = "; it has " + " and ".join(found) if found else "; nothing was trained yet"
    return RunDirError(
        f"cannot resume {run_dir}: it has no last checkpoint (checkpoints/last.json){what}. "
        f"To start over: sbmt train --task {cfg.data.task} --attention {cfg.model.attention} "
        f"--config {run_dir / 'config.yaml'} --run-dir {run_dir} --overwrite"
    )


def metric_rows(path: Path) -> list[dict[str, str]]:
    """Complete rows of a metrics.csv (a row cut short by a crash is dropped)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    complete = []
    for row in rows:
        try:
            int(row["step"])
        except (TypeError, ValueError, KeyError):
            continue
        if None not in row.values():
            complete.append(row)
    return complete


def load_run_config(run_dir: Path) -> RunConfig:
    """The configuration saved in a run directory."""
    path = run_dir / "config.yaml"
    if not path.exists():
        raise RunDirError(f"{run_dir} is not a run directory (no config.yaml)")
    return from_dict(_load_yaml(path), source=str(path))


def config_differences(a: RunConfig, b: RunConfig) -> set[str]:
    """The ``section.key`` names whose values differ."""
    da, db = a.to_dict(), b.to_dict()
    return {f"{s}.{k}" for s in da for k in da[s] if da[s][k] != db[s][k]}


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RunDirError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(values, dict):
        raise RunDirError(f"{path}: expected a mapping of sections")
    return values
