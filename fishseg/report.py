"""Human-readable reports of an evaluated run, written from metrics, run and history alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fishseg.runtime import atomic_path

REPORT_MD = "report.md"
RANDOM_INIT_NOTE = ("**Backbone is random-init**: these numbers measure the pipeline, "
                    "not what DINOv3 features can do.")


def _markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def markdown(metrics: dict[str, Any], run: dict[str, Any], history: dict[str, Any]) -> str:
    """The report as Markdown: summary, per-class table and the epoch log."""
    config = run["train_config"]
    lines = [
        "# fishseg report", "",
        f"- backbone: `{metrics['backbone']}`" + (" (random-init)" if metrics["random_init"] else ""),
        f"- cache fingerprint: `{metrics['cache_fingerprint']}`",
        f"- decoder: {config['decoder']}, {config['epochs']} epochs, batch {config['batch_size']}, "
        f"lr {config['lr']}, seed {config['seed']}",
        f"- split: {run['split']['method']}, {run['split']['n_train']} train / {run['split']['n_val']} val",
        f"- checkpoint: {metrics['checkpoint']} (epoch {metrics['epoch']}), threshold {metrics['threshold']}",
        f"- **mean IoU {metrics['mean_iou']:.4f}, mean Dice {metrics['mean_dice']:.4f}** "
        f"over {metrics['n_images']} validation images",
    ]
    if metrics["random_init"]:
        lines += ["", RANDOM_INIT_NOTE]
    lines += ["", "## Per class", ""]
    lines += _markdown_table(["class", "images", "mean IoU", "mean Dice"], [
        [name, c["n_images"], f"{c['mean_iou']:.4f}", f"{c['mean_dice']:.4f}"]
        for name, c in metrics["per_class"].items()])
    lines += ["", "## Epochs", ""]
    lines += _markdown_table(["epoch", "train loss", "train IoU", "val loss", "val IoU", "seconds"], [
        [e["epoch"], f"{e['train_loss']:.4f}", f"{e['train_iou']:.4f}", f"{e['val_loss']:.4f}",
         f"{e['val_iou']:.4f}", f"{e['seconds']:.1f}"] for e in history["epochs"]])
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, metrics: dict[str, Any], run: dict[str, Any], history: dict[str, Any]) -> Path:
    path = out_dir / REPORT_MD
    with atomic_path(path) as tmp:
        tmp.write_text(markdown(metrics, run, history), encoding="utf-8")
    return path
