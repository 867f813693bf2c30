"""polyattn detect: a tiny run end to end, exact resume, divergence, the Table 3 layout and bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("pycocotools")

from polyattn.cli import main  # noqa: E402
from polyattn.experiments.detection.config import resolve_detect_config  # noqa: E402
from polyattn.experiments.detection.loop import run_detect  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# A nano XCiT cut to 4 narrow blocks on 12 generated 64-pixel images: a few seconds per epoch.
TINY = [
    "model.backbone_kwargs={embed_dim: 48, depth: 4, num_heads: 4}",
    "model.out_indices=[0, 1, 2, 3]",
    "model.fpn_channels=32",
    "data.gen_train=12",
    "data.gen_val=6",
    "data.gen_size=64",
    "data.short_side=[64]",
    "data.max_size=64",
    "train.batch_size=4",
    "train.warmup_steps=2",
]


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
