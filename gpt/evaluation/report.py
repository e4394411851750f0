"""evaluate.py's report: the checkpoint's facts, metrics.json and the printed table of one evaluation, and
after `evaluate.py -m` one comparison table across the sweep's jobs (the ComparisonTable Hydra callback)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from gpt.config import write_json
from gpt.errors import UserError
from gpt.runs import job_labels, markdown_table, sweep_jobs


def checkpoint_info(ckpt: dict, model) -> dict:
    from gpt.quantize import num_params

    tok = ckpt["tokenizer"]
    return {"path": ckpt["path"], "step": int(ckpt["step"]), "params": num_params(model),
            "tokenizer": tok.get("name", tok.get("type")), "train_val_loss": ckpt.get("val_loss")}


def finish(report: dict, folder: Path, out) -> dict:
    """Write metrics.json and print the report's table."""
    write_json(folder / "metrics.json", report)
    info, data = report["checkpoint"], report["data"]
    if data.get("source") is None:
        scored = f"no corpus scored ({data.get('note')})"
    else:
        scored = f"{'all' if data['split'] == 'all' else data['split'] + ' split'} of {data['source']}"
    out.write(f"\n{info['path']} (step {info['step']}, {info['params']:,} parameters, tokenizer {info['tokenizer']})\n"
              f"data: {scored}\n\n")
    out.write(markdown_table(["metric", "value"], [[k, v] for k, v in report["metrics"].items()]))
    out.write(f"\nrun folder {folder}: metrics.json {' '.join(report['files'].values())}\n")
    out.flush()
    return report


def compare(sweep_dir: str | Path) -> tuple[Path, Path, str]:
    """One table across the evaluation jobs of a sweep folder (each job's metrics.json): a row per job,
    a column per metric. Writes comparison.md and comparison.csv there; -> (md path, csv path, markdown)."""
    sweep_dir = Path(sweep_dir)
    jobs = sweep_jobs(sweep_dir, "metrics.json")
    if not jobs:
        raise UserError(f"{sweep_dir} holds no <job>/metrics.json to compare")
    reports = [json.loads((j / "metrics.json").read_text()) for j in jobs]
    columns: list[str] = []
    for r in reports:
        columns += [k for k in r["metrics"] if k not in columns]
    header = ["job", "run", "checkpoint", "step", *columns]
    rows = [[j.name, label, r["checkpoint"]["path"], r["checkpoint"]["step"], *(r["metrics"].get(c) for c in columns)]
            for j, label, r in zip(jobs, job_labels(jobs), reports)]
    text = markdown_table(header, rows)
    md = sweep_dir / "comparison.md"
    md.write_text(text)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    path = sweep_dir / "comparison.csv"
    path.write_text(buf.getvalue())
    return md, path, text


class ComparisonTable(Callback):
    """Hydra callback (conf/evaluate.yaml): after `evaluate.py -m ...`, compare the jobs' metrics."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_jobs(sweep_dir, "metrics.json"):  # e.g. a multirun of plot=...
            return
        md, path, text = compare(sweep_dir)
        print(f"\n{text}\ncomparison: {md} {path}")
