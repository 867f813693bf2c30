"""Every command's --out: a new or empty folder, its own run, or a one-line refusal that touches nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from synthetic_setting import small_vit, synthetic_run

from polyattn.cli import main
from polyattn.utils.outdir import OutDirError, check_out_dir, marked_command, prepare_out_dir

TRAIN = synthetic_run(16, *small_vit(1, 16), "train.epochs=1")

# Each command with arguments that would train or measure: the refusal must come before any of it.
Q = "--no-progress"
COMMANDS = {
    "train": (["train", "--set", *TRAIN, Q], "train"),
    "train --all-points": (["train", "--all-points", "--config", "configs/table2.yaml", Q], "train --all-points"),
    "compare": (["compare", "--epochs", "1", Q], "compare"),
    "sweep": (["sweep", Q], "sweep"),
    "recall": (["recall", Q], "recall"),
    "lra": (["lra", "--task", "listops", Q], "train"),
    "pinn": (["pinn", "--quick", Q], "pinn"),
    "detect": (["detect", "--preset", "cpu", Q], "detect"),
    "bench": (["bench", "--quick", Q], "bench"),
    "theory": (["theory", "--quick", Q], "theory"),
    "data listops": (["data", "listops", "--train", "4", "--val", "2", "--test", "2", Q], "data listops"),
    "data pathfinder": (["data", "pathfinder", "--num", "4", "--workers", "1", Q], "data pathfinder"),
    "data coco-shapes": (["data", "coco-shapes", "--train", "2", "--val", "1", "--size", "48"], "data coco-shapes"),
}
USER_FILES = ["config.yaml", "summary.json", "metrics.jsonl", "report.md", "results.json", "notes.txt"]


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def run(argv: list[str], out: Path) -> int:
    return main([*argv, "--out", str(out)])


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_folder_of_the_users_files_is_refused_and_left_as_it_was(tmp_path, capsys, name):
    argv, _ = COMMANDS[name]
    out = tmp_path / "mine"
    out.mkdir()
    for i, f in enumerate(USER_FILES):
        (out / f).write_text(f"the user's own {f} {i}\n")
    before = snapshot(out)
    assert run(argv, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "Traceback" not in err
    assert "not empty" in err and "another --out" in err and str(out) in err
    assert "config.yaml" in err or "results.json" in err  # names what it would overwrite
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == sorted(USER_FILES)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_an_out_that_is_a_file_is_one_clear_line(tmp_path, capsys, name):
    argv, _ = COMMANDS[name]
    f = tmp_path / "taken.txt"
    f.write_text("mine")
    assert run(argv, f) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file" in err and str(f) in err and "--out" in err
    assert f.read_text() == "mine"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_another_commands_run_is_refused_naming_it(tmp_path, capsys, name):
    argv, command = COMMANDS[name]
    out = tmp_path / "other"
    other = "theory" if command != "theory" else "bench"
    prepare_out_dir(out, other)
    (out / "results.json").write_text("{}")
    assert run(argv, out) == 2
    assert f"is a polyattn {other} run, not a {command} run" in capsys.readouterr().err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_one_clear_line(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert run(COMMANDS["compare"][0], out) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        out.chmod(0o700)


def test_train_writes_into_an_empty_folder_and_marks_it(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert run(COMMANDS["train"][0], out) == 0
    assert marked_command(out) == "train" and (out / "summary.json").is_file()
    # Its own run: refused without --resume as before (a checkpoint is there), continued with it.
    assert run(COMMANDS["train"][0], out) == 2
    assert main(["train", "--resume", str(out), Q, "--set", "train.epochs=2"]) == 0


def test_compare_writes_into_an_empty_folder(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    tiny = ["train.max_steps=2", "model.overrides.depth=1", "model.overrides.dim=16", "model.overrides.num_heads=2"]
    argv = ["compare", "--activations", "softmax", "--seeds", "1", "--epochs", "1", "--jobs", "1", Q, "--set", *tiny]
    assert run(argv, out) == 0
    assert marked_command(out) == "compare" and (out / "results.json").is_file()
    assert marked_command(next((out / "runs").iterdir())) == "train"
    assert run([*argv, "--resume"], out) == 0  # its own run, reused


@pytest.mark.parametrize("command", sorted({c for _, c in COMMANDS.values()}))
def test_the_rule_for_each_command(tmp_path, command):
    assert check_out_dir(tmp_path / "new" / "deeper", command) is True
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".lock").write_text("")  # left by a killed run: no data
    assert check_out_dir(empty, command) is True
    own = prepare_out_dir(tmp_path / "own", command)
    (own / "results.json").write_text("{}")
    assert check_out_dir(own, command) is False
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(OutDirError, match="notes.txt"):
        check_out_dir(user, command)


@pytest.mark.parametrize(
    ("command", "files"),
    [
        ("train", ["config.yaml", "checkpoints/last.pt"]),
        ("compare", ["runs/softmax-s0/summary.json", "report.md"]),
        ("sweep", ["runs/x/summary.json"]),
        ("recall", ["base_config.yaml"]),
        ("pinn", ["config.yaml", "checkpoints/last.pt"]),
        ("detect", ["config.yaml", "checkpoints/last.pt"]),
        ("bench", ["config.yaml", "results.json", "report.txt"]),
        ("theory", ["config.yaml", "results.json", "report.txt"]),
        ("data listops", ["basic_train.tsv", "basic_val.tsv", "basic_test.tsv"]),
        ("data pathfinder", ["curv_baseline/metadata/0.npy"]),
        ("data coco-shapes", ["annotations/instances_train2017.json"]),
    ],
)
def test_runs_made_before_the_marker_count_as_the_commands_own(tmp_path, command, files):
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x")
    assert check_out_dir(tmp_path, command) is False


def test_a_detection_run_with_bad_data_leaves_an_empty_out_as_it_was(tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    argv = ["detect", "--preset", "cpu", "--data", str(tmp_path / "nope"), Q]
    assert run(argv, out) == 2
    assert "nope" in capsys.readouterr().err
    assert list(out.iterdir()) == []
    assert run(argv, tmp_path / "new") == 2
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("name", ["data listops", "data coco-shapes"])
def test_data_writes_into_an_empty_folder_and_again_into_its_own(tmp_path, name):
    argv, command = COMMANDS[name]
    out = tmp_path / "empty"
    out.mkdir()
    assert run(argv, out) == 0
    assert marked_command(out) == command
    assert run(argv, out) == 0  # regenerating one's own data set is allowed


def test_a_folder_it_cannot_write_is_named_with_the_fix(tmp_path, monkeypatch):
    # Root may write anywhere, so the permission answer is simulated; the read-only test above runs as a user.
    monkeypatch.setattr("polyattn.utils.outdir.os.access", lambda path, mode: False)
    (tmp_path / "ro").mkdir()
    with pytest.raises(OutDirError, match=r"ro is not writable: make it writable or choose another --out"):
        check_out_dir(tmp_path / "ro", "train")
    with pytest.raises(OutDirError, match="cannot create --out .*new: .* is not writable"):
        check_out_dir(tmp_path / "new", "compare")
