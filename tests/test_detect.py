"""polyattn detect: a tiny run end to end, exact resume, divergence, the Table 3 layout and bad inputs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("pycocotools")

from synthetic_setting import TINY_DETECT as TINY  # noqa: E402

from polyattn.cli import main  # noqa: E402
from polyattn.experiments.detection.config import resolve_detect_config  # noqa: E402
from polyattn.experiments.detection.loop import batches_of, run_detect  # noqa: E402
from polyattn.training.config import ConfigError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
REPO = Path(__file__).resolve().parents[1]


def tiny(*extra: str) -> dict:
    return resolve_detect_config(None, [*TINY, *extra], preset="cpu")


def test_cli_trains_scores_and_reports(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["detect", "--preset", "cpu", "--activation", "x^3/sqrt(N)", "--out", str(out), "--no-progress"]
    assert main([*argv, "--set", *TINY, "train.epochs=1"]) == 0
    assert "box AP" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    stats = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
    assert set(metrics["bbox"]) == set(stats) and set(metrics["segm"]) == set(stats)
    assert metrics["activation"] == "x^3/sqrt(N)" and metrics["epochs"] == 1 and not metrics["diverged"]
    assert (out / "data" / "annotations" / "instances_train2017.json").is_file()  # generated in the run dir
    assert (out / "predictions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| box |" in report and "| mask |" in report and "](predictions.png)" in report
    # Training into a finished run without --resume is refused, naming the fix.
    assert main([*argv, "--set", *TINY, "train.epochs=1"]) == 2
    assert "--resume" in capsys.readouterr().err
    # The Table 3 layout over runs, with the paper's number where it has one.
    assert main(["detect", "--table", str(out)]) == 0
    assert "x^3/sqrt(N)" in capsys.readouterr().out
    assert main(["detect", "--table", str(tmp_path / "nope")]) == 2
    assert "a finished polyattn detect run directory" in capsys.readouterr().err


def test_resume_continues_exactly(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    a = run_detect(tiny("train.epochs=2"), whole, progress=False)
    run_detect(tiny("train.epochs=1"), split, progress=False)
    b = run_detect(tiny("train.epochs=2"), split, resume=True, progress=False)
    sa = torch.load(whole / "checkpoints" / "last.pt", weights_only=False)
    sb = torch.load(split / "checkpoints" / "last.pt", weights_only=False)
    assert sa["step"] == sb["step"] == 6
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    assert [r["loss_classifier"] for r in sa["history"]] == [r["loss_classifier"] for r in sb["history"]]
    assert a["bbox"] == b["bbox"]
    # A resume may not change what ran: refused, naming the key.
    with pytest.raises(Exception, match="train.lr"):
        run_detect(tiny("train.epochs=3", "train.lr=0.1"), split, resume=True, progress=False)


def test_divergence_stops_with_advice(tmp_path, monkeypatch):
    from polyattn.experiments.detection import loop

    real = loop.build_detector

    def poisoned(cfg, num_classes):
        model = real(cfg, num_classes)
        forward = model.forward

        def nan_loss(images, targets=None):
            out = forward(images, targets)
            if model.training:
                out["loss_mask"] = out["loss_mask"] * float("nan")
            return out

        model.forward = nan_loss
        return model

    monkeypatch.setattr(loop, "build_detector", poisoned)
    metrics = run_detect(tiny("train.epochs=2", "model.activation=x^3"), tmp_path / "run", progress=False)
    assert metrics["diverged"] and metrics["epochs"] == 0
    assert "diverged at step 1" in metrics["diverged_message"] and "scaled activation" in metrics["diverged_message"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--activation", "x^3/foo"], "bad activation spec"),
        (["--data", "/nonexistent/coco"], "instances_train2017.json"),
        (["--set", "model.out_indices=[1, 2]"], "model.out_indices must be 4 increasing block indices"),
        (["--set", "train.epoch=3"], "train.epoch"),
        (["--preset", "paper"], "the paper preset trains on COCO: pass --data DIR"),
    ],
)
def test_bad_inputs_are_named(tmp_path, capsys, extra, message):
    assert main(["detect", "--preset", "cpu", "--out", str(tmp_path / "run"), "--no-progress", *extra]) == 2
    assert message in capsys.readouterr().err


def test_table3_config_points():
    for point, act in (("softmax", "softmax"), ("x3_div14", "x^3/14"), ("x_div14", "x/14")):
        cfg = resolve_detect_config("configs/detect/table3.yaml", point=point)
        assert cfg["model"]["activation"] == act and cfg["model"]["backbone"] == "xcit_small_12_p16_224"
        assert (cfg["train"]["epochs"], cfg["train"]["lr"], cfg["train"]["weight_decay"]) == (36, 1e-4, 0.05)
        assert cfg["train"]["batch_size"] == 16 and cfg["data"]["short_side"] == [800]


# --- several processes (torchrun / DDP) ------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "-m", "polyattn", "detect", "--preset", "cpu", "--no-progress",
           "--activation", "x^3/sqrt(N)", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def test_torchrun_two_processes_train_and_resume_exactly(tmp_path):
    whole = _torchrun(tmp_path, "--set", *TINY, "train.epochs=2", "--out", "whole")
    assert whole.stdout.count("box AP") == 1  # only rank 0 reports
    _torchrun(tmp_path, "--set", *TINY, "train.epochs=1", "--out", "split")
    _torchrun(tmp_path, "--set", *TINY, "train.epochs=2", "--out", "split", "--resume")
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=False)
    assert len(a["rng"]) == 2 and a["step"] == b["step"] == 6  # 12 images, global batch 4
    assert not torch.equal(a["rng"][0]["torch"], a["rng"][1]["torch"])  # each process draws its own flips
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["history"] == [{**r, "time_s": a["history"][i]["time_s"]} for i, r in enumerate(b["history"])]
    metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs"] == 2
    # The per-process random streams cannot continue in another number of processes.
    with pytest.raises(ConfigError, match=r"trained by 2 process\(es\).*resume with 2"):
        run_detect(tiny("train.epochs=3", "model.activation=x^3/sqrt(N)"), tmp_path / "split", resume=True)


def test_batches_are_dealt_out_across_processes():
    order = list(range(10))
    assert batches_of(order, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    ranks = [batches_of(order, 4, r, 2) for r in (0, 1)]
    assert ranks == [[[0, 2], [4, 6], [8]], [[1, 3], [5, 7], [9]]]
    assert batches_of(order, 4, 0, 4) == [[0], [4]]  # the last batch of 2 cannot feed 4 processes
    with pytest.raises(ConfigError, match="divisible by the number of processes"):
        _batch_check(3, 2)


def _batch_check(batch_size: int, world_size: int) -> None:
    from polyattn.experiments.detection import loop
    from polyattn.training.distributed import DistEnv

    loop._run(tiny(f"train.batch_size={batch_size}"), Path("unused"), False, False, DistEnv(world_size=world_size))


class _Oracle(torch.nn.Module):
    """Predicts each image's ground truth (found by its pixels), so only a sharding error can lower AP."""

    def __init__(self, ds) -> None:
        super().__init__()
        self.truth = {ds[i][0].numpy().tobytes(): ds[i][1] for i in range(len(ds))}

    def forward(self, images):
        out = []
        for im in images:
            t = self.truth[im.numpy().tobytes()]
            n = len(t["labels"])
            out.append({"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(n),
                        "masks": t["masks"][:, None].float()})  # fmt: skip
        return out


def _score_shard(rank: int, world_size: int, root: str, init: str, result: str) -> None:
    import torch.distributed as dist

    from polyattn.data.coco import CocoDetection
    from polyattn.experiments.detection import loop
    from polyattn.training.distributed import DistEnv

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    try:
        ds = CocoDetection(root, "val")
        stats, first = loop._score(_Oracle(ds), ds, DistEnv(rank, world_size, backend="gloo"), batch_size=2)
        Path(result, f"{rank}.json").write_text(json.dumps({"stats": stats, "first": len(first)}))
    finally:
        dist.destroy_process_group()


def test_sharded_scoring_covers_every_image_once(tmp_path):
    from polyattn.data.coco import generate_coco_shapes

    generate_coco_shapes(tmp_path / "data", 2, 7, 48, seed=0)  # 7 images: shares of 3 and 4
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_score_shard, args=(2, str(tmp_path / "data"), init, str(tmp_path)), nprocs=2, join=True)
    rows = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert rows[0]["stats"] == rows[1]["stats"]  # every process gets rank 0's evaluation
    assert rows[0]["stats"]["bbox"]["AP"] == 1.0 and rows[0]["stats"]["segm"]["AP"] == 1.0
    assert rows[0]["stats"]["bbox"]["AR100"] == 1.0  # no image left out
