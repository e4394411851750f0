"""Loss and learning-rate plots of a run folder, or of all the runs of a sweep folder overlaid.

Plots are drawn from metrics.jsonl alone (gpt.tracking), so they work without W&B, for finished and
running jobs alike. Figures are rendered with matplotlib's Agg canvas directly: no pyplot, no global
backend switch, no display needed.

    loss.png  train and val loss against optimizer step (left) and tokens seen (right)
    lr.png    learning rate against step
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gpt.errors import UserError
from gpt.runs import job_labels, read_metrics, sweep_jobs


@dataclass
class Curves:
    """One run's series, each a pair of equal-length lists (x values, y values)."""

    label: str
    train_by_step: tuple[list, list]
    val_by_step: tuple[list, list]
    train_by_tokens: tuple[list, list]
    val_by_tokens: tuple[list, list]
    lr_by_step: tuple[list, list]


def curves(rows: list[dict], label: str = "") -> Curves:
    """Series of a run from its metrics.jsonl rows.

    Eval rows carry no token count; the trainer counts a fixed number of tokens per step
    (`tokens` = step x tokens per step), so an eval's tokens are its step times that rate.
    """
    def series(key: str, x: str = "step") -> tuple[list, list]:
        picked = [r for r in rows if r.get(key) is not None and r.get(x) is not None]
        return [r[x] for r in picked], [r[key] for r in picked]

    per_step = next((r["train/tokens"] / r["step"] for r in rows if r.get("train/tokens") and r.get("step")), None)
    val_steps, val_loss = series("val/loss")
    val_tokens = ([s * per_step for s in val_steps], val_loss) if per_step else ([], [])
    return Curves(label, series("train/loss"), (val_steps, val_loss), series("train/loss", "train/tokens"), val_tokens,
                  series("train/lr"))


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    tmp.replace(path)  # a reader never sees half a PNG
    return path


def _quiet_font_cache() -> None:
    """Import matplotlib's font manager with its "building the font cache" warning silenced: a first run on a fresh
    machine would print it into the end-of-run summary, and the cache is built either way."""
    import logging

    font_log = logging.getLogger("matplotlib.font_manager")
    level = font_log.level
    font_log.setLevel(logging.ERROR)
    try:
        import matplotlib.font_manager  # noqa: F401  (the cache is built on first import)
    finally:
        font_log.setLevel(level)


def plot_curves(runs: list[Curves], out_dir: str | Path) -> list[Path]:
    """Write loss.png and lr.png for one or more runs (one colour per run) into out_dir; -> their paths."""
    _quiet_font_cache()
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    fig = Figure(figsize=(12, 4.5))
    by_step, by_tokens = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        name = f"{run.label} " if run.label else ""
        for ax, train, val in ((by_step, run.train_by_step, run.val_by_step),
                               (by_tokens, run.train_by_tokens, run.val_by_tokens)):
            if train[0]:
                ax.plot(*train, color=color, alpha=0.8, label=f"{name}train")
            if val[0]:
                ax.plot(*val, color=color, linestyle="--", marker="o", markersize=3, label=f"{name}val")
    for ax, xlabel in ((by_step, "step"), (by_tokens, "tokens")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
    by_step.set_title("loss by step")
    by_tokens.set_title("loss by tokens seen")
    fig.tight_layout()
    paths = [_save(fig, out_dir / "loss.png")]

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for i, run in enumerate(runs):
        if run.lr_by_step[0]:
            ax.plot(*run.lr_by_step, color=f"C{i % 10}", label=run.label or "lr")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("learning rate")
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize="small")
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "lr.png"))
    return paths


def plot_folder(folder: str | Path) -> list[Path]:
    """Plots for a run folder (its metrics.jsonl) or a sweep folder (every job's, overlaid and labelled by
    the overrides that differ between jobs), written into that folder; -> the PNG paths."""
    folder = Path(str(folder)).expanduser()
    if (folder / "metrics.jsonl").is_file():
        runs = [curves(read_metrics(folder / "metrics.jsonl"))]
    else:
        jobs = sweep_jobs(folder)
        if not jobs:
            raise UserError(f"plot={str(folder)!r} holds no metrics.jsonl, nor do its subfolders; pass a run "
                            f"folder (outputs/<date>/<time>) or a sweep folder (multirun/<date>/<time>)")
        runs = [curves(read_metrics(j / "metrics.jsonl"), label) for j, label in zip(jobs, job_labels(jobs))]
    if not any(r.train_by_step[0] or r.val_by_step[0] for r in runs):
        raise UserError(f"plot={str(folder)!r}: metrics.jsonl has no train/loss or val/loss rows yet")
    return plot_curves(runs, folder)
