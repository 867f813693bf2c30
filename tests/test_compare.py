"""polyattn compare and polyattn sweep: end to end on tiny settings, resume, divergence, bad inputs."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest
import yaml
from synthetic_setting import TIMING_KEYS, comparable

from polyattn.cli import main
from polyattn.core.activations import get_activation
from polyattn.experiments.compare import BASE_CONFIG, base_overrides
from polyattn.training import load_config
from polyattn.training.grid import GridError, parse_activations, parse_seeds
from polyattn.utils import read_jsonl

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Digits, a 2-block dim-32 ViT, 4 steps per run: about a second per run.
TINY = ["train.max_steps=4", "model.overrides.depth=2", "model.overrides.dim=32", "model.overrides.num_heads=2"]


def compare_cli(out: Path, *extra: str, acts: str = "softmax,x^3/sqrt(N)", seeds: str = "2") -> int:
    argv = ["compare", "--out", str(out), "--activations", acts, "--seeds", seeds, "--epochs", "1", "--jobs", "1"]
    return main([*argv, "--norm-every", "1", "--no-progress", *extra, "--set", *TINY])


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


# --- arguments ------------------------------------------------------------------------------
def test_builtin_base_config_equals_the_repository_config():
    # The package carries the comparison's defaults so an installed polyattn needs no configs/ dir.
    from_file = load_config(REPO / "configs" / "digits_vit_micro.yaml")
    from_package = load_config(BASE_CONFIG)
    from_file.pop("description", None)
    assert from_package == from_file
    # --config FILE takes the file's settings; norms are switched on only where the file leaves them off.
    path, layers = base_overrides(REPO / "configs" / "digits_vit_micro.yaml", epochs=3, norm_every=5)
    cfg = load_config(path, layers)
    assert cfg["train"]["epochs"] == 3 and cfg["diagnostics"]["every"] == 5 and cfg["train"]["lr"] == 3e-3
    _, layers = base_overrides(None, overrides=["diagnostics.every=7"], norm_every=5)
    assert load_config(None, layers)["diagnostics"]["every"] == 7


def test_the_packaged_base_configs_are_package_data():
    # A non-editable install ships only the data files pyproject names: every config file in the package must match.
    from fnmatch import fnmatch

    tomllib = pytest.importorskip("tomllib")
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setup["package-data"]["polyattn"]
    files = [p.relative_to(REPO / "polyattn").as_posix() for p in (REPO / "polyattn").rglob("*.yaml")]
    assert "experiments/configs/compare.yaml" in files and "experiments/configs/recall.yaml" in files
    assert [f for f in files if not any(fnmatch(f, pat) for pat in patterns)] == []


def test_activation_and_seed_parsing():
    assert parse_activations(["softmax, x^3/sqrt(N)", "x/16.0"]) == ["softmax", "x^3/sqrt(N)", "x/16"]
    with pytest.raises(GridError, match="listed twice"):
        parse_activations("x^3/16,x^3/16.0")
    with pytest.raises(GridError, match=r"(?s)'x\^3/foo'.*accepted forms"):
        parse_activations("softmax,x^3/foo")
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("5,") == [5] and parse_seeds("0,7") == [0, 7]
    for bad in ("0", "a", "1,1", "-1,"):
        with pytest.raises(GridError, match="--seeds"):
            parse_seeds(bad)
    assert get_activation("x^3/sqrt(N)").slug == "x3_divsqrtN" and get_activation("x/0.5").slug == "x_div0p5"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--activations", "softmax,x^3/foo"], "bad activation spec 'x^3/foo'"),
        (["--set", "model.activation=x"], "use --activations"),
        (["--set", "train.epoch=3"], "unknown config key train.epoch"),
        (["--dataset", "nope"], "unknown dataset 'nope'"),
    ],
)
def test_bad_inputs_fail_before_any_training(tmp_path, capsys, extra, message):
    out = tmp_path / "cmp"
    code = main(["compare", "--out", str(out), "--no-progress", *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (out / "runs").exists()


# --- end to end --------------------------------------------------------------------------------
def test_compare_end_to_end_then_resume(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare_cli(out) == 0
    stdout = capsys.readouterr().out
    assert "softmax" in stdout and "x^3/sqrt(N)" in stdout and "2/2" in stdout

    results = json.loads((out / "results.json").read_text())
    assert [r["activation"] for r in results["table"]] == ["softmax", "x^3/sqrt(N)"]
    assert len(results["runs"]) == 4 and {r["status"] for r in results["runs"]} == {"trained"}
    assert results["metric"] == "top-1 accuracy on the test split at the epoch with the best validation accuracy"
    for row in results["table"]:
        # The table is computed from the runs' own summaries: test accuracy of the best-validation weights.
        summaries = [
            json.loads((out / "runs" / f"{get_activation(row['activation']).slug}-s{s}" / "summary.json").read_text())
            for s in (0, 1)
        ]
        assert all(s["select"] == "best_val" and s["test_acc"] is not None for s in summaries)
        tests = [s["test_acc"] for s in summaries]
        assert row["n"] == 2 and row["diverged"] == 0
        assert row["mean"] == pytest.approx(statistics.fmean(tests))
        assert row["std"] == pytest.approx(statistics.stdev(tests))

    run = out / "runs" / "x3_divsqrtN-s1"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    norms = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "norms"]
    assert {r["step"] for r in norms} == {0, 1, 2, 3} and {r["layer"] for r in norms} == {0, 1}
    # The report's norm table is the head- and layer-mean of seed 0's rows.
    rows0 = [r for r in read_jsonl(out / "runs" / "x3_divsqrtN-s0" / "metrics.jsonl") if r["kind"] == "norms"]
    last = [r["fro"] for r in rows0 if r["step"] == 3]
    assert results["norm_summary"]["x^3/sqrt(N)"]["fro_last"] == pytest.approx(statistics.fmean(last))
    assert results["tokens"] == 65

    figs = results["figures"]
    assert set(figs) == {"accuracy", "norms", "attention_layer2", "cls_attention"}
    report = (out / "report.md").read_text()
    for name in figs.values():
        assert is_png(out / name), name
        assert f"]({name})" in report
    assert "| softmax |" in report and "| x^3/sqrt(N) |" in report and "polyattn compare" in report

    # Without --resume the finished runs are not overwritten.
    assert compare_cli(out) == 2
    assert "--resume" in capsys.readouterr().err

    # --resume reuses finished runs (no training: checkpoints untouched) and finishes unfinished ones.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/checkpoints/last.pt")}
    (run / "summary.json").unlink()
    assert compare_cli(out, "--resume") == 0
    capsys.readouterr()
    again = json.loads((out / "results.json").read_text())
    status = {r["name"]: r["status"] for r in again["runs"]}
    assert status == {
        "softmax-s0": "reused",
        "softmax-s1": "reused",
        "x3_divsqrtN-s0": "reused",
        "x3_divsqrtN-s1": "resumed",
    }
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["table"] == results["table"]

    # Resuming with other settings would mix configs: refused, naming the key.
    assert main(["compare", "--out", str(out), "--activations", "softmax", "--seeds", "2", "--resume"]) == 2
    assert "train.epochs" in capsys.readouterr().err


def test_diverged_run_is_reported_not_raised(tmp_path, capsys):
    # 64 tokens, lr 1, no clipping or warmup: x^3 overflows within a few steps, softmax does not.
    hard = ["model.overrides.patch_size=1", "train.lr=1", "train.grad_clip=0", "train.warmup_epochs=0"]
    out = tmp_path / "cmp"
    code = main(
        ["compare", "--out", str(out), "--activations", "softmax,x^3", "--seeds", "0,", "--epochs", "1"]
        + ["--no-progress", "--set", *TINY, "train.max_steps=12", *hard]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    soft, cube = results["table"]
    assert soft["diverged"] == 0 and soft["n"] == 1
    assert cube["diverged"] == 1 and cube["n"] == 0 and cube["mean"] is None
    assert "all diverged" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "diverged: loss is" in report or "gradient norm is not finite" in report
    assert "no attention maps" in report  # x^3 never finished an epoch, so it has no checkpoint
    assert is_png(out / "accuracy.png") and is_png(out / "cls_attention.png")


# --- sweep -------------------------------------------------------------------------------------
def test_sweep_tiny_and_bad_patch_size(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--out", str(out), "--scales", "1,8", "--patch-sizes", "8,4", "--epochs", "1", "--no-progress"]
    argv += ["--jobs", "1"]
    assert main([*argv, "--set", "train.max_steps=2", "model.overrides.depth=1", "model.overrides.dim=32"]) == 0
    stdout = capsys.readouterr().out
    assert "k=1" in stdout and "k=8" in stdout and "softmax" in stdout
    results = json.loads((out / "results.json").read_text())
    # Digits resized to 16x16 by default: patch 8 and 4 give 4 and 16 patches.
    assert [(r["patch_size"], r["tokens"]) for r in results["table"]] == [(8, 4), (4, 16)]
    assert results["settings"]["image_size"] == [16, 16]
    assert all(set(r["cells"]) == {"1", "8"} and r["softmax"]["n"] == 1 for r in results["table"])
    names = sorted(os.listdir(out / "runs"))
    assert names == sorted(f"p{p}-{a}-s0" for p in (8, 4) for a in ("x3", "x3_div8", "softmax"))
    assert {r["activation"] for r in results["runs"]} == {"x^3", "x^3/8", "softmax"}
    assert is_png(out / "sweep.png") and "](sweep.png)" in (out / "report.md").read_text()

    assert main(["sweep", "--out", str(tmp_path / "bad"), "--patch-sizes", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "patch 3 does not tile the 16x16 images" in err and "[1, 2, 4, 8, 16]" in err
    # --image-size 0 keeps the config's own size (8x8 digits).
    assert main(["sweep", "--out", str(tmp_path / "bad"), "--patch-sizes", "3", "--image-size", "0"]) == 2
    assert "patch 3 does not tile the 8x8 images" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_statistics_intervals_and_paired_differences():
    from polyattn.experiments.compare import paired_difference, summarize, t_interval

    # t(0.975, 2) = 4.3027: mean 0.5, std 0.1, half width 4.3027 * 0.1 / sqrt(3).
    lo, hi = t_interval([0.4, 0.5, 0.6])
    assert (lo, hi) == pytest.approx((0.5 - 0.2484138, 0.5 + 0.2484138), abs=1e-6)
    assert t_interval([0.5]) is None
    a = {"0": 0.90, "1": 0.92, "2": 0.95, "3": None}  # seed 3 diverged: not paired
    b = {"0": 0.88, "1": 0.91, "2": 0.92, "3": 0.90}
    d = paired_difference(a, b)
    assert d["pairs"] == 3 and d["mean"] == pytest.approx(0.02)
    # Paired t = mean / (std / sqrt(3)) = 0.02 / (0.01 / sqrt(3)) = 3.464 with 2 dof: p = 0.0742.
    assert d["p"] == pytest.approx(0.0742, abs=5e-4) and d["ci95"][0] < 0 < d["ci95"][1]
    assert paired_difference({"0": 0.9}, {"0": 0.8}) is None
    records = [
        {"activation": act, "seed": s, "top1": acc, "diverged": acc is None, "best_val_acc": acc}
        for act, accs in (("softmax", b), ("x", a))
        for s, acc in accs.items()
    ]
    rows = summarize(records, ["softmax", "x"])
    assert rows[0]["vs_baseline"] is None and rows[1]["vs_baseline"]["baseline"] == "softmax"
    assert rows[1]["vs_baseline"]["mean"] == pytest.approx(0.02) and rows[1]["n"] == 3
    text = __import__("polyattn.experiments.report", fromlist=["format_table"]).format_table(rows, "metric")
    assert "vs softmax (paired)" in text and "+2.00 [" in text and "(baseline)" in text


def test_resume_reads_a_missing_key_as_its_default(tmp_path, capsys):
    # A run written before a key existed ran with that key's default: --resume reuses it.
    out = tmp_path / "cmp"
    assert compare_cli(out, acts="softmax", seeds="1") == 0
    saved = out / "runs" / "softmax-s0" / "config.yaml"
    cfg = yaml.safe_load(saved.read_text())
    assert cfg["train"].pop("eval_every") == 1  # the default
    saved.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert compare_cli(out, "--resume", acts="softmax", seeds="1") == 0
    cfg["train"]["label_smoothing"] = 0.3  # a real difference is still refused
    saved.write_text(yaml.safe_dump(cfg))
    assert compare_cli(out, "--resume", acts="softmax", seeds="1") == 2
    assert "label_smoothing" in capsys.readouterr().err


# --- runs side by side ----------------------------------------------------------------------------
def _numbers(out: Path) -> dict:
    """Every run's summary and metric rows without wall-clock fields: what must not depend on --jobs."""
    # The record names the process that trained the run (its command line and timings): a worker's differs.
    clock = {"time_s", "samples_per_s", "run_dir", "record"}
    runs = {}
    for run in sorted((out / "runs").iterdir()):
        summary = json.loads((run / "summary.json").read_text())
        rows = [{k: v for k, v in r.items() if k not in clock} for r in read_jsonl(run / "metrics.jsonl")]
        runs[run.name] = ({k: v for k, v in summary.items() if k not in clock}, rows)
    return runs


def test_parallel_runs_give_the_numbers_of_sequential_ones(tmp_path, capsys):
    seq, par = tmp_path / "seq", tmp_path / "par"
    assert compare_cli(seq, "--jobs", "1", seeds="0,1") == 0
    assert compare_cli(par, "--jobs", "2", seeds="0,1") == 0
    capsys.readouterr()
    assert _numbers(par) == _numbers(seq)
    results = json.loads((par / "results.json").read_text())
    assert results["settings"]["jobs"] == 2
    assert [r["name"] for r in results["runs"]] == ["softmax-s0", "softmax-s1", "x3_divsqrtN-s0", "x3_divsqrtN-s1"]
    # --resume with --jobs 2: the one unfinished run trains again, the others are reused.
    (par / "runs" / "softmax-s1" / "summary.json").unlink()
    assert compare_cli(par, "--resume", "--jobs", "2", seeds="0,1") == 0
    again = json.loads((par / "results.json").read_text())
    assert [r["status"] for r in again["runs"]] == ["reused", "resumed", "reused", "reused"]
    assert again["table"] == results["table"]


def test_jobs_argument_and_its_default(tmp_path, capsys, monkeypatch):
    from polyattn.training import grid as cmp

    for bad in ("0", "two", "-1", "1.5"):
        assert main(["compare", "--out", str(tmp_path / "x"), "--jobs", bad, "--no-progress"]) == 2
        assert "--jobs must be a positive integer or auto" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert cmp.check_jobs("auto") is None and cmp.check_jobs(None) is None and cmp.check_jobs("3") == 3

    def planned(n: int, threads: int, done: int = 0) -> list:
        cfg = {"train": {"num_threads": threads, "device": "cpu"}}
        return [
            cmp.PlannedRun(cmp.GridRun(f"r{i}", None, None), cfg, tmp_path, "done" if i < done else "new")
            for i in range(n)
        ]

    monkeypatch.setattr(cmp, "usable_cores", lambda: 4)
    assert cmp.default_jobs(planned(21, 1)) == 4  # one run per core
    assert cmp.default_jobs(planned(21, 2)) == 2  # two threads each
    assert cmp.default_jobs(planned(21, 0)) == 1  # 0 = a run takes every core
    assert cmp.default_jobs(planned(21, 1, done=19)) == 2  # never more than the runs left to train
    assert cmp.default_jobs(planned(3, 1, done=3)) == 1


def test_ctrl_c_stops_parallel_runs_and_resume_finishes_them(tmp_path, capsys):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "cmp"
    args = ["compare", "--out", str(out), "--activations", "softmax,x", "--seeds", "1", "--epochs", "30"]
    args += ["--no-progress", "--norm-every", "0", "--set", "model.overrides.patch_size=4"]
    args += ["model.overrides.depth=1", "model.overrides.dim=32", "model.overrides.num_heads=2"]
    # A session of its own: the signal goes to the whole group, as a terminal's Ctrl-C does. A shell
    # starts background jobs with SIGINT ignored, and children inherit that: the child restores the
    # default (Python's KeyboardInterrupt) so the test also holds when pytest itself runs in the background.
    proc = subprocess.Popen(
        [sys.executable, "-m", "polyattn", *args, "--jobs", "2"],
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    checkpoints = [out / "runs" / name / "checkpoints" / "last.pt" for name in ("softmax-s0", "x-s0")]
    deadline = time.monotonic() + 120
    while not all(c.is_file() for c in checkpoints):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoints after 120 s"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted: finished runs are kept; continue with the same command plus --resume" in err
    assert not any((c.parent.parent / "summary.json").exists() for c in checkpoints)

    assert main([*args, "--jobs", "1", "--resume"]) == 0
    capsys.readouterr()
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["status"], r["epochs"]) for r in runs] == [("resumed", 30), ("resumed", 30)]

    # The same numbers as the comparison never stopped: per run, and every epoch row.
    straight = tmp_path / "straight"
    assert main([*args[:2], str(straight), *args[3:], "--jobs", "1"]) == 0
    capsys.readouterr()
    drop = TIMING_KEYS | {"status"}
    whole = json.loads((straight / "results.json").read_text())
    assert [{k: v for k, v in r.items() if k not in drop} for r in whole["runs"]] == [
        {k: v for k, v in r.items() if k not in drop} for r in runs
    ]
    for name in ("softmax-s0", "x-s0"):
        assert comparable(read_jsonl(straight / "runs" / name / "metrics.jsonl")) == comparable(
            read_jsonl(out / "runs" / name / "metrics.jsonl")
        ), name
