"""Training and scoring one detector: ``polyattn detect``, read top to bottom.

A run directory holds the resolved ``config.yaml``, ``history.json`` (one row per epoch),
``checkpoints/last.pt`` (written atomically after every epoch), ``metrics.json`` (pycocotools'
12 stats for bbox and segm), ``report.md`` and ``predictions.png``. It is locked while a run
writes it. A resume continues from the last epoch exactly as the uninterrupted run would (the
batch order depends only on (seed, epoch); the RNG state, which draws the flips and scales, is
in the checkpoint). A non-finite loss stops training with a message; the checkpoint keeps the
last finite epoch. Without ``data.root`` the run trains on shapes generated in the COCO layout
(``polyattn data coco-shapes``) inside the run directory.

Under ``torchrun --nproc_per_node=K -m polyattn detect ...`` every process trains one
DistributedDataParallel replica on the GPU of its local rank (gloo on CPU): ``train.batch_size``
is the global batch, each step's images are dealt out across the processes, scoring is sharded
and gathered, and only rank 0 writes the run directory. The checkpoint keeps every rank's RNG
state, so a resume with as many processes continues exactly.
"""

from __future__ import annotations

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
    gather_rng_states,
    read_checkpoint,
    refuse_changes,
    set_rng_state,
)
from ...training.config import ConfigError
from ...training.distributed import (
    DistEnv,
    all_reduce_sum,
    broadcast_object,
    distributed_run,
    gather_objects,
    on_main,
    seed_rank,
    wrap_ddp,
)
from ...utils import RunDirError, RunDirLock, atomic_save, atomic_write_json, atomic_write_text, seed_everything
from ...utils.machine import machine_line
from .config import DETECT_CONFIG
from .evaluate import evaluate_coco, to_coco_results
from .model import build_mask_rcnn

__all__ = ["build_detector", "run_detect"]

_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "step", "rng", "history", "config")


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
    """Train and score one Mask R-CNN; returns the metrics also written to ``out_dir/metrics.json``.

    Under torchrun every process calls this and gets the metrics; only rank 0 writes files and shows bars.
    """
    cfg = DETECT_CONFIG.resolve(cfg)
    with distributed_run(cfg["train"]["device"], cfg["train"]["num_threads"]) as env:
        lock = None
        failed = True
        try:
            lock = on_main(lambda: RunDirLock(out_dir, "polyattn detect", command="detect").acquire(), env)
            metrics = _run(cfg, Path(out_dir), resume, progress and env.is_main, env)
            failed = False
            return metrics
        except KeyboardInterrupt:
            failed = False  # the checkpoint of the finished epochs stays for --resume
            raise
        finally:
            if lock is not None:
                # A run that failed before writing anything of its own leaves no .lock-only --out behind.
                lock.discard() if failed else lock.release()


def _datasets(cfg: dict, out: Path, env: DistEnv) -> tuple[CocoDetection, CocoDetection]:
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

        def generate() -> None:
            if not (root / "annotations").is_dir():
                generate_coco_shapes(root, d["gen_train"], d["gen_val"], d["gen_size"], seed=0)

        on_main(generate, env)  # rank 0 writes, the others wait for it
    train_tf = RandomHorizontalFlip(d["flip"]) if d["flip"] > 0 else None
    return CocoDetection(root, d["train_split"], train_tf), CocoDetection(root, d["val_split"])


def _lr_factor(cfg: dict, steps_per_epoch: int):
    t = cfg["train"]

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / t["warmup_steps"]) if t["warmup_steps"] else 1.0
        epoch = step // steps_per_epoch
        return warm * 0.1 ** sum(epoch >= e for e in t["lr_steps"])

    return factor


def batches_of(order: list[int], batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This process's share of each global batch of ``order``: images ``rank``, ``rank + world_size``, ...

    Every process draws the same ``order``, so the global batches are those of a single process. A last
    batch with fewer images than processes is dropped, since a process without images cannot step.
    """
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [b[rank::world_size] for b in batches if len(b) >= world_size]


def _run(cfg: dict, out: Path, resume: bool, progress: bool, env: DistEnv) -> dict:
    t0 = time.perf_counter()
    t = cfg["train"]
    if t["batch_size"] % env.world_size:
        raise ConfigError(
            f"train.batch_size ({t['batch_size']}) is the global batch and must be divisible by the number of "
            f"processes ({env.world_size}); change one of them"
        )
    train_ds, val_ds = _datasets(cfg, out, env)
    device = env.device
    model, net, opt, sched = _build_training(cfg, len(train_ds), train_ds.num_classes, env)
    epoch, step, history = 0, 0, []
    if resume:
        ckpt = read_checkpoint(out, _CHECKPOINT_KEYS, "polyattn detect")
        _, refused = config_changes(ckpt["config"], cfg, DETECT_CONFIG)  # by each key's resume rule
        refuse_changes(out, refused)
        states = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
        if len(states) != env.world_size:
            raise ConfigError(
                f"{out} was trained by {len(states)} process(es) and this resume has {env.world_size}: its "
                f"per-process random streams would not continue; resume with {len(states)} process(es)"
            )
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        epoch, step, history = ckpt["epoch"], ckpt["step"], ckpt["history"]
        set_rng_state(states[env.rank], device)
    elif (out / CHECKPOINT).exists():
        raise RunDirError(
            f"{out} already holds a detection run ({CHECKPOINT}); continue it with --resume or use another --out"
        )
    if env.is_main:
        atomic_write_text(DETECT_CONFIG.dump(cfg), out / "config.yaml")
    diverged = None
    while epoch < t["epochs"]:
        row, diverged = _train_epoch(cfg, net, opt, sched, train_ds, epoch, step, progress, env)
        if diverged is not None:
            break
        epoch, step = epoch + 1, row["step"]
        if t["eval_every"] and epoch % t["eval_every"] == 0 and epoch < t["epochs"]:
            row["val"] = {k: v["AP"] for k, v in _score(model, val_ds, env)[0].items()}
        history.append(row)
        _save_checkpoint(out, cfg, model, opt, sched, history, env)
    stats, outputs = _score(model, val_ds, env)
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
        "world_size": env.world_size,
        "time_s": time.perf_counter() - t0,
        "machine": machine_line(device.type),
    }
    if env.is_main:
        _write_results(out, metrics, history, val_ds, outputs)
    return metrics


def _build_training(
    cfg: dict, n_train: int, num_classes: int, env: DistEnv
) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """(detector, its DDP wrapper or itself, AdamW, the step schedule), the same weights on every process."""
    t = cfg["train"]
    seed_everything(t["seed"])  # the same initial weights on every process
    model = build_detector(cfg, num_classes).to(env.device)
    net = wrap_ddp(model, env)
    seed_rank(t["seed"], env)  # each process its own flips and RoI samples
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t["weight_decay"])
    steps_per_epoch = len(batches_of(list(range(n_train)), t["batch_size"], 0, env.world_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg, steps_per_epoch))
    return model, net, opt, sched


def _save_checkpoint(
    out: Path,
    cfg: dict,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LambdaLR,
    history: list[dict],
    env: DistEnv,
) -> None:
    """checkpoints/last.pt and history.json after an epoch (``history[-1]``); every rank calls it."""
    states = gather_rng_states(env)  # a collective
    if env.is_main:
        last = history[-1]
        atomic_save(
            {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "epoch": last["epoch"], "step": last["step"], "rng": states, "history": history, "config": cfg},
            out / CHECKPOINT,
        )  # fmt: skip
        atomic_write_json(history, out / "history.json")


def _write_results(out: Path, metrics: dict, history: list[dict], val_ds: CocoDetection, outputs: list[dict]) -> None:
    """metrics.json, predictions.png and report.md (rank 0)."""
    atomic_write_json(metrics, out / "metrics.json")
    from .report import detect_markdown, plot_predictions

    plot_predictions(val_ds, outputs, out / "predictions.png")
    atomic_write_text(detect_markdown(metrics, history, out), out / "report.md")


def _to(device: torch.device, images, targets) -> tuple[list, list]:
    """A batch on the model's device (image_id stays a plain int)."""
    moved = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
    return [im.to(device) for im in images], moved


def _train_epoch(cfg, net, opt, sched, ds: CocoDetection, epoch: int, step: int, progress: bool, env: DistEnv):
    """One epoch; returns (history row, None) or (None, divergence message)."""
    from tqdm.auto import tqdm

    t = cfg["train"]
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(t["seed"] * 100_003 + epoch)).tolist()
    batches = batches_of(order, t["batch_size"], env.rank, env.world_size)
    net.train()
    sums: dict[str, float] = {}
    start = time.perf_counter()
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{t['epochs']}", disable=not progress, leave=False, dynamic_ncols=True)
    for batch in bar:
        images, targets = _to(env.device, *zip(*(ds[i] for i in batch), strict=True))
        losses = net(images, targets)
        loss = sum(losses.values())
        # The mean over processes, known to all of them: they stop together or step together.
        shared = all_reduce_sum(torch.stack([v.detach() for v in losses.values()]).float(), env) / env.world_size
        if not torch.isfinite(shared).all():
            return None, (
                f"diverged at step {step + 1} (epoch {epoch + 1}): loss is {shared.sum().item()}; the checkpoint "
                f"keeps epoch {epoch}. Try {divergence_advice(cfg['model']['activation'])}a lower train.lr "
                f"(it is {t['lr']:g}), or train.grad_clip > 0 (it is {t['grad_clip']:g})."
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], t["grad_clip"])
        opt.step()
        sched.step()
        step += 1
        for k, v in zip(losses, shared.tolist(), strict=True):
            sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix(loss=f"{shared.sum().item():.3f}", refresh=False)
    n = max(len(batches), 1)
    row = {"epoch": epoch + 1, "step": step, "lr": opt.param_groups[0]["lr"], "time_s": time.perf_counter() - start}
    return {**row, **{k: v / n for k, v in sums.items()}}, None


@torch.no_grad()
def _score(model, ds: CocoDetection, env: DistEnv, batch_size: int = 8) -> tuple[dict, list[dict]]:
    """(pycocotools' stats for bbox and segm on ``ds``, the raw outputs of its first images).

    Each process scores a contiguous share of the images; rank 0 evaluates the gathered results and
    hands the stats to all. The outputs (for the figure) are rank 0's first batch, the first images.
    """
    model.eval()
    n = len(ds)
    mine = range(n * env.rank // env.world_size, n * (env.rank + 1) // env.world_size)
    results: list[dict[str, Any]] = []
    first: list[dict] = []
    for i in range(mine.start, mine.stop, batch_size):
        images, targets = zip(*(ds[j] for j in range(i, min(i + batch_size, mine.stop))), strict=True)
        outputs = [{k: v.cpu() for k, v in o.items()} for o in model([im.to(env.device) for im in images])]
        results += to_coco_results(outputs, [t["image_id"] for t in targets], ds.label_to_cat_id)
        if not first:
            first = outputs
    everything = [r for part in gather_objects(results, env) for r in part]
    stats = evaluate_coco(ds.ann_file, everything) if env.is_main else None
    return broadcast_object(stats, env), first
