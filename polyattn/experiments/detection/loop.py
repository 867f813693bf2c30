"""Training and scoring one detector: ``polyattn detect``, read top to bottom.

A run directory holds the resolved ``config.yaml``, ``history.json`` (one row per epoch),
``checkpoints/last.pt`` (written atomically after every epoch), ``metrics.json`` (pycocotools'
12 stats for bbox and segm), ``report.md`` and ``predictions.png``. It is locked while a run
writes it. A resume continues from the last epoch exactly as the uninterrupted run would (the
batch order depends only on (seed, epoch); the RNG state, which draws the flips and scales, is
in the checkpoint). A non-finite loss stops training with a message; the checkpoint keeps the
last finite epoch. Without ``data.root`` the run trains on shapes generated in the COCO layout
(``polyattn data coco-shapes``) inside the run directory.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from ...data.coco import CocoDetection, RandomHorizontalFlip, generate_coco_shapes
from ...training.checkpoint import (
    CHECKPOINT,
    config_changes,
    divergence_advice,
    read_checkpoint,
    refuse_changes,
    rng_state,
    set_rng_state,
)
from ...training.config import ConfigError
from ...utils import RunDirError, RunDirLock, atomic_save, atomic_write_json, atomic_write_text, seed_everything
from ...utils.machine import machine_line
from .config import DETECT_CONFIG
from .evaluate import evaluate_coco, to_coco_results
from .model import build_mask_rcnn

__all__ = ["build_detector", "run_detect"]

_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "step", "rng", "history", "config")
# What a resume may change: how long it trains, how often it scores, its threads, where the data lives.
_FREE_ON_RESUME = ("train.epochs", "train.eval_every", "train.num_threads", "data.root", "preset")


def build_detector(cfg: dict, num_classes: int) -> torch.nn.Module:
    m, d = cfg["model"], cfg["data"]
    return build_mask_rcnn(
        m["activation"],
        num_classes=num_classes,
        backbone=m["backbone"],
        out_indices=tuple(m["out_indices"]),
        fpn_channels=m["fpn_channels"],
        # torchvision's transform resizes: a random shorter side of these per training batch, the last one
        # for scoring, and it maps predictions back to the original image size that the COCO json describes.
        min_size=tuple(d["short_side"]),
        max_size=d["max_size"],
        anchor_sizes=m["anchor_sizes"],
        detector_kwargs=m["detector_kwargs"],
        **m["backbone_kwargs"],
    )


def run_detect(cfg: dict, out_dir: str | os.PathLike, resume: bool = False, progress: bool = True) -> dict:
    """Train and score one Mask R-CNN; returns the metrics also written to ``out_dir/metrics.json``."""
    cfg = DETECT_CONFIG.resolve(cfg)
    before = torch.get_num_threads()
    if cfg["train"]["num_threads"]:
        torch.set_num_threads(cfg["train"]["num_threads"])
    try:
        with RunDirLock(out_dir, "polyattn detect"):
            return _run(cfg, Path(out_dir), resume, progress)
    finally:
        torch.set_num_threads(before)


def _datasets(cfg: dict, out: Path) -> tuple[CocoDetection, CocoDetection]:
    d = cfg["data"]
    root = d["root"]
    if root is None and cfg["preset"] == "paper":
        # The paper's recipe (XCiT-S12, 800-pixel images, batch 16) on generated 96-pixel shapes would
        # only exhaust the memory of a CPU machine: it is meant for COCO.
        raise ConfigError(
            "the paper preset trains on COCO: pass --data DIR (a COCO root with annotations/ and train2017/, "
            "val2017/) or set data.root; for generated shapes use --preset cpu"
        )
    if root is None:
        root = out / "data"
        if not (root / "annotations").is_dir():
            generate_coco_shapes(root, d["gen_train"], d["gen_val"], d["gen_size"], seed=0)
    train_tf = RandomHorizontalFlip(d["flip"]) if d["flip"] > 0 else None
    return CocoDetection(root, d["train_split"], train_tf), CocoDetection(root, d["val_split"])


def _lr_factor(cfg: dict, steps_per_epoch: int):
    t = cfg["train"]

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / t["warmup_steps"]) if t["warmup_steps"] else 1.0
        epoch = step // steps_per_epoch
        return warm * 0.1 ** sum(epoch >= e for e in t["lr_steps"])

    return factor


def _run(cfg: dict, out: Path, resume: bool, progress: bool) -> dict:
    t0 = time.perf_counter()
    train_ds, val_ds = _datasets(cfg, out)
    seed_everything(cfg["train"]["seed"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_detector(cfg, train_ds.num_classes).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["train"]["lr"], weight_decay=cfg["train"]["weight_decay"])
    bs = cfg["train"]["batch_size"]
    steps_per_epoch = math.ceil(len(train_ds) / bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg, steps_per_epoch))
    epoch, step, history = 0, 0, []
    if resume:
        ckpt = read_checkpoint(out, _CHECKPOINT_KEYS, "polyattn detect")
        _, refused = config_changes(ckpt["config"], cfg, lambda key: key not in _FREE_ON_RESUME)
        refuse_changes(out, refused)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        epoch, step, history = ckpt["epoch"], ckpt["step"], ckpt["history"]
        set_rng_state(ckpt["rng"], device)
    elif (out / CHECKPOINT).exists():
        raise RunDirError(
            f"{out} already holds a detection run ({CHECKPOINT}); continue it with --resume or use another --out"
        )
    atomic_write_text(DETECT_CONFIG.dump(cfg), out / "config.yaml")
    diverged = None
    while epoch < cfg["train"]["epochs"]:
        row, diverged = _train_epoch(cfg, model, opt, sched, train_ds, epoch, step, progress, device)
        if diverged is not None:
            break
        epoch, step = epoch + 1, row["step"]
        every = cfg["train"]["eval_every"]
        if every and epoch % every == 0 and epoch < cfg["train"]["epochs"]:
            row["val"] = {k: v["AP"] for k, v in _score(model, val_ds, device)[0].items()}
        history.append(row)
        atomic_save(
            {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "epoch": epoch, "step": step, "rng": rng_state(device), "history": history, "config": cfg},
            out / CHECKPOINT,
        )  # fmt: skip
        atomic_write_json(history, out / "history.json")
    stats, outputs = _score(model, val_ds, device)
    metrics = {
        "activation": cfg["model"]["activation"],
        "backbone": cfg["model"]["backbone"],
        **stats,
        "epochs": epoch,
        "steps": step,
        "diverged": diverged is not None,
        "diverged_message": diverged,
        "train_images": len(train_ds),
        "val_images": len(val_ds),
        "time_s": time.perf_counter() - t0,
        "machine": machine_line(device.type),
    }
    atomic_write_json(metrics, out / "metrics.json")
    from .report import detect_markdown, plot_predictions

    plot_predictions(val_ds, outputs, out / "predictions.png")
    atomic_write_text(detect_markdown(metrics, history, out), out / "report.md")
    return metrics


def _to(device: torch.device, images, targets) -> tuple[list, list]:
    """A batch on the model's device (image_id stays a plain int)."""
    moved = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
    return [im.to(device) for im in images], moved


def _train_epoch(cfg, model, opt, sched, ds: CocoDetection, epoch: int, step: int, progress: bool, device):
    """One epoch; returns (history row, None) or (None, divergence message)."""
    from tqdm.auto import tqdm

    t = cfg["train"]
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(t["seed"] * 100_003 + epoch)).tolist()
    batches = [order[i : i + t["batch_size"]] for i in range(0, len(order), t["batch_size"])]
    model.train()
    sums: dict[str, float] = {}
    start = time.perf_counter()
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{t['epochs']}", disable=not progress, leave=False, dynamic_ncols=True)
    for batch in bar:
        images, targets = _to(device, *zip(*(ds[i] for i in batch), strict=True))
        losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            return None, (
                f"diverged at step {step + 1} (epoch {epoch + 1}): loss is {loss.item()}; the checkpoint keeps "
                f"epoch {epoch}. Try {divergence_advice(cfg['model']['activation'])}a lower train.lr "
                f"(it is {t['lr']:g}), or train.grad_clip > 0 (it is {t['grad_clip']:g})."
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], t["grad_clip"])
        opt.step()
        sched.step()
        step += 1
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    n = max(len(batches), 1)
    row = {"epoch": epoch + 1, "step": step, "lr": opt.param_groups[0]["lr"], "time_s": time.perf_counter() - start}
    return {**row, **{k: v / n for k, v in sums.items()}}, None


@torch.no_grad()
def _score(model, ds: CocoDetection, device: torch.device, batch_size: int = 8) -> tuple[dict, list[dict]]:
    """(pycocotools' stats for bbox and segm on ``ds``, the raw outputs of its first images)."""
    model.eval()
    results: list[dict[str, Any]] = []
    first: list[dict] = []
    for i in range(0, len(ds), batch_size):
        images, targets = zip(*(ds[j] for j in range(i, min(i + batch_size, len(ds)))), strict=True)
        outputs = [{k: v.cpu() for k, v in o.items()} for o in model([im.to(device) for im in images])]
        results += to_coco_results(outputs, [t["image_id"] for t in targets], ds.label_to_cat_id)
        if not first:
            first = outputs
    return evaluate_coco(ds.ann_file, results), first
