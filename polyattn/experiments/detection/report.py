"""What a detection run shows a person: report.md, predictions.png, and the Table 3 layout over runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

__all__ = ["detect_markdown", "detect_table", "plot_predictions"]

# The paper's Table 3 (Mask R-CNN, XCiT-S12/16, COCO, 36 epochs): AP^b / AP^m.
PAPER_TABLE3 = {"softmax": (44.9, 40.1), "x^3/14": (44.8, 40.1), "x/14": (44.8, 40.1)}


def plot_predictions(ds, outputs: list[dict], path: str | os.PathLike, score: float = 0.5, n: int = 4) -> None:
    """The first ``n`` validation images with the predicted masks and boxes scoring >= ``score``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(outputs))
    fig, axes = plt.subplots(1, max(n, 1), figsize=(3.2 * max(n, 1), 3.4), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, i in zip(axes[0], range(n), strict=False):
        image, _ = ds[i]
        ax.imshow(image.permute(1, 2, 0).numpy())
        out = outputs[i]
        keep = (out["scores"] >= score).nonzero().flatten().tolist()
        overlay = np.zeros((*image.shape[1:], 4))
        for j in keep:
            label = int(out["labels"][j])
            mask = out["masks"][j, 0].numpy() >= 0.5
            overlay[mask] = (*colours(label % 10)[:3], 0.45)
            x1, y1, x2, y2 = out["boxes"][j].tolist()
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=colours(label % 10), lw=1.2))
            name = ds.classes[label] if 0 < label < len(ds.classes) else str(label)
            ax.text(x1, y1, f"{name} {float(out['scores'][j]):.2f}", fontsize=6, color="white",
                    bbox={"facecolor": colours(label % 10), "pad": 1, "lw": 0})  # fmt: skip
        ax.imshow(overlay)
        ax.set_title(f"val image {i}: {len(keep)} >= {score:g}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ap(stats: dict | None, key: str = "AP") -> str:
    return "-" if not stats else f"{100 * stats[key]:.1f}"


def detect_markdown(metrics: dict, history: list[dict], out: Path) -> str:
    b, m = metrics.get("bbox"), metrics.get("segm")
    lines = [
        f"# Mask R-CNN, {metrics['backbone']} backbone, activation {metrics['activation']}",
        "",
        f"{metrics['epochs']} epochs ({metrics['steps']} steps) on {metrics['train_images']} training images, "
        f"scored on {metrics['val_images']} validation images by pycocotools. {metrics['machine']}; "
        f"{metrics['time_s'] / 60:.1f} min.",
        "",
    ]
    if metrics["diverged"]:
        lines += [f"**Diverged**: {metrics['diverged_message']}", ""]
    lines += [
        "| | AP | AP50 | AP75 | APs | APm | APl |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *(
            f"| {name} | " + " | ".join(_ap(s, k) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")) + " |"
            for name, s in (("box", b), ("mask", m))
        ),
        "",
        "![predictions](predictions.png)",
        "",
        "| epoch | step | lr | loss (sum) | time |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in history:
        total = sum(v for k, v in row.items() if k.startswith("loss"))
        lines.append(f"| {row['epoch']} | {row['step']} | {row['lr']:.2e} | {total:.3f} | {row['time_s']:.0f} s |")
    lines += ["", "`metrics.json` holds all 12 stats for bbox and segm; `history.json` every epoch's losses.", ""]
    return "\n".join(lines)


def detect_table(run_dirs: list[str | os.PathLike]) -> str:
    """Runs side by side as the paper's Table 3: AP^b and AP^m per run (its number in parentheses)."""
    rows = ["run                       activation      AP^b   AP^m   paper AP^b / AP^m   epochs"]
    for run in run_dirs:
        path = Path(run) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {run} a finished polyattn detect run directory?")
        mt = json.loads(path.read_text(encoding="utf-8"))
        paper = PAPER_TABLE3.get(mt["activation"])
        ref = "-" if paper is None else f"{paper[0]} / {paper[1]}"
        status = " (diverged)" if mt.get("diverged") else ""
        rows.append(
            f"{Path(run).name:<25} {mt['activation']:<14} {_ap(mt.get('bbox')):>5}  {_ap(mt.get('segm')):>5}   "
            f"{ref:<19} {mt['epochs']}{status}"
        )
    return "\n".join(rows)
