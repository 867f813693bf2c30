"""Every CLI command: a user mistake or an environment fault is exit status 2 and one line on stderr, a bug of
polyattn's own keeps its traceback, and a refusal leaves --out as it was."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from polyattn.cli import error_line, is_user_error, main
from polyattn.data.errors import DatasetNotFoundError
from polyattn.training.config import ConfigError
from polyattn.utils.outdir import OutDirError, check_out_file, marked_command, prepare_out_dir

ROOT = Path(__file__).resolve().parent.parent
Q = "--no-progress"
TINY = ["train.max_steps=1", "model.overrides.depth=1", "model.overrides.dim=16", "model.overrides.num_heads=2"]
GRID = [Q, "--jobs", "1"]

# (command, arguments, a word the one line must hold). Placeholders: MISSING (no such file), LIST (a YAML list),
# BADYAML (not YAML), BINARY (not UTF-8), FILE (a file of the user's), EMPTYDIR, NOPE (no such folder),
# CORRUPT (a folder whose checkpoints/last.pt is garbage), OUT (a new --out: it must not appear).
CASES = [
    ("nosuch", [], "invalid choice"),
    ("activations", ["x^^3"], "polyattn activations lists"),
    ("train", ["--config", "MISSING", "--print-config"], "does not exist"),
    ("train", ["--config", "LIST", "--print-config"], "mapping"),
    ("train", ["--config", "BADYAML", "--print-config"], "not valid YAML"),
    ("train", ["--config", "BINARY", "--print-config"], "not UTF-8"),
    ("train", ["--config", "EMPTYDIR", "--print-config"], "is a directory"),
    ("train", ["--config", "configs/table2.yaml", "--print-config"], "--point"),
    ("train", ["--config", "configs/table2.yaml", "--point", "nope", "--print-config"], "nope"),
    ("train", ["--list-points"], "--config"),
    ("train", ["--point", "t2-x3", "--print-config"], "--config"),
    ("pinn", ["--point", "x", "--out", "OUT", Q], "--config"),
    ("train", ["--set", "foo.bar=1", "--print-config"], "foo"),
    ("train", ["--set", "noequals", "--print-config"], "noequals"),
    ("train", ["--set", "train.epochs=abc", "--print-config"], "abc"),
    ("train", ["--set", "train.epochs=-1", "--print-config"], "train.epochs"),
    ("train", ["--set", "train.lr=-1", "--print-config"], "train.lr"),
    ("train", ["--set", "train.amp=maybe", "--print-config"], "maybe"),
    ("train", ["--set", "model.activation=bogus", "--out", "OUT", Q], "polyattn activations lists"),
    ("train", ["--set", "model.name=nope", "--out", "OUT", Q], "nope"),
    ("train", ["--set", "data.name=nope", "--out", "OUT", Q], "nope"),
    ("train", ["--set", "data.name=tiny_imagenet", "data.root=NOPE", "--out", "OUT", Q], "expected layout"),
    ("train", ["--resume", "EMPTYDIR", Q], "config.yaml"),
    ("train", ["--resume", "NOPE", Q], "nope"),
    ("train", ["--out", "FILE/sub", Q], "is a file"),
    ("train", ["--all-points", Q], "--config"),
    ("compare", ["--activations", "bogus", "--out", "OUT", *GRID], "bogus"),
    ("compare", ["--seeds", "0", "--out", "OUT", *GRID], "--seeds"),
    ("compare", ["--seeds", "abc", "--out", "OUT", *GRID], "--seeds"),
    ("compare", ["--epochs", "0", "--out", "OUT", *GRID], "--epochs"),
    ("compare", ["--epochs", "x", "--out", "OUT", *GRID], "--epochs"),
    ("compare", ["--jobs", "0", "--out", "OUT", Q], "--jobs"),
    ("compare", ["--model", "nope", "--out", "OUT", *GRID], "nope"),
    ("compare", ["--dataset", "nope", "--out", "OUT", *GRID], "nope"),
    ("compare", ["--config", "LIST", "--out", "OUT", *GRID], "mapping"),
    ("compare", ["--config", "configs/table2.yaml", "--out", "OUT", *GRID], "grid"),
    ("compare", ["--set", "noequals", "--out", "OUT", *GRID], "noequals"),
    ("sweep", ["--scales", "-1", "--out", "OUT", *GRID], "--scales"),
    ("sweep", ["--scales", "abc", "--out", "OUT", *GRID], "--scales"),
    ("sweep", ["--patch-sizes", "0", "--out", "OUT", *GRID], "patch"),
    ("sweep", ["--power", "0", "--out", "OUT", *GRID], "power"),
    ("sweep", ["--power", "99", "--out", "OUT", *GRID], "1..16"),
    ("sweep", ["--dataset", "nope", "--out", "OUT", *GRID], "nope"),
    ("sweep", ["--config", "BADYAML", "--out", "OUT", *GRID], "not valid YAML"),
    ("recall", ["--seq-lens", "0", "--out", "OUT", *GRID], "--seq-lens"),
    ("recall", ["--epochs", "0", "--out", "OUT", *GRID], "--epochs"),
    ("recall", ["--norm-every", "-1", "--out", "OUT", *GRID], "norm"),
    ("recall", ["--activations", "bogus", "--out", "OUT", *GRID], "bogus"),
    ("recall", ["--config", "LIST", "--out", "OUT", *GRID], "mapping"),
    ("recall", ["--check-decoding", "NOPE"], "nope"),
    ("recall", ["--check-decoding", "CORRUPT"], "unreadable, truncated or not a polyattn checkpoint"),
    ("lra", ["--out", "OUT", Q], "--task"),
    ("lra", ["--config", "LIST", "--out", "OUT", Q], "mapping"),
    ("lra", ["--task", "listops", "--activation", "bogus", "--out", "OUT", Q], "polyattn activations lists"),
    ("lra", ["--task", "listops", "--data", "NOPE", "--out", "OUT", Q], "polyattn data listops"),
    ("lra", ["--task", "listops", "--data", "FILE", "--out", "OUT", Q], "basic_train.tsv"),
    ("lra", ["--task", "pathfinder", "--data", "EMPTYDIR", "--out", "OUT", Q], "expected layout"),
    ("lra", ["--task", "text", "--data", "EMPTYDIR", "--out", "OUT", Q], "aclImdb"),
    ("lra", ["--task", "retrieval", "--data", "EMPTYDIR", "--out", "OUT", Q], "new_aan_pairs"),
    ("lra", ["--task", "image", "--data", "EMPTYDIR", "--out", "OUT", Q], "cifar-10-batches-py"),
    ("lra", ["--table", "NOPE"], "lra_result.json"),
    ("lra", ["--resume", "--out", "EMPTYDIR", Q], "config.yaml"),
    ("lra", ["--task", "listops", "--set", "train.max_steps=-1", "--out", "OUT", Q], "train.max_steps"),
    ("pinn", ["--quick", Q], "--out"),
    ("pinn", ["--quick", "--activation", "bogus", "--out", "OUT", Q], "polyattn activations lists"),
    ("pinn", ["--quick", "--steps", "-1", "--out", "OUT", Q], "max_steps"),
    ("pinn", ["--quick", "--threads", "0", "--out", "OUT", Q], "num_threads"),
    ("pinn", ["--config", "MISSING", "--out", "OUT", Q], "does not exist"),
    ("pinn", ["--quick", "--set", "pde.params.beta=abc", "--out", "OUT", Q], "beta"),
    ("pinn", ["--compare", "EMPTYDIR", "--out", "OUT"], "metrics.json"),
    ("pinn", ["--quick", "--resume", "--out", "EMPTYDIR", Q], "checkpoints"),
    ("detect", ["--preset", "cpu", Q], "--out"),
    ("detect", ["--preset", "cpu", "--data", "NOPE", "--out", "OUT", Q], "polyattn data coco-shapes"),
    ("detect", ["--preset", "cpu", "--data", "EMPTYDIR", "--out", "OUT", Q], "instances_train2017.json"),
    ("detect", ["--preset", "cpu", "--activation", "bogus", "--out", "OUT", Q], "polyattn activations lists"),
    ("detect", ["--config", "LIST", "--out", "OUT", Q], "mapping"),
    ("detect", ["--table", "NOPE"], "nope"),
    ("detect", ["--preset", "cpu", "--resume", "--out", "EMPTYDIR", Q], "last.pt"),
    ("bench", ["--ns", "0", "--out", "OUT", Q], "--ns"),
    ("bench", ["--repeats", "0", "--out", "OUT", Q], "repeats"),
    ("bench", ["--divisor", "bogus", "--out", "OUT", Q], "bogus"),
    ("bench", ["--dtype", "bogus", "--out", "OUT", Q], "bogus"),
    ("bench", ["--threads", "0", "--out", "OUT", Q], "--threads"),
    ("bench", ["--backends", "nope", "--out", "OUT", Q], "nope"),
    ("bench", ["--config", "LIST", "--out", "OUT", Q], "mapping"),
    ("bench", ["--model", "nope", "--out", "OUT", Q], "nope"),
    ("bench", ["--model", "vit_micro", "--activations", "bogus", "--out", "OUT", Q], "polyattn activations lists"),
    ("bench", ["--model", "vit_micro", "--amp", "nope", "--out", "OUT", Q], "nope"),
    ("bench", ["--decode", "--contexts", "0", "--out", "OUT", Q], "--contexts"),
    ("bench", ["--varlen", "--activations", "bogus", "--out", "OUT", Q], "polyattn activations lists"),
    ("bench", ["--hf", "--out", "OUT", Q], "--decode"),
    ("theory", ["--samples", "0", "--out", "OUT", Q], "samples"),
    ("theory", ["--activations", "bogus", "--out", "OUT", Q], "polyattn activations lists"),
    ("theory", ["--config", "LIST", "--out", "OUT", Q], "mapping"),
    ("data", [], "DATASET"),
    ("data", ["listops", "--train", "-1", "--out", "OUT", Q], "train samples"),
    ("data", ["listops", "--train", "abc", "--out", "OUT", Q], "--train"),
    ("data", ["listops", "--min-length", "10", "--max-length", "5", "--train", "2", "--out", "OUT", Q], "min_length"),
    ("data", ["listops", "--max-depth", "0", "--train", "2", "--out", "OUT", Q], "depth"),
    ("data", ["pathfinder", "--num", "0", "--out", "OUT", Q], "--num"),
    ("data", ["pathfinder", "--contour-length", "0", "--out", "OUT", Q], "--contour-length"),
    ("data", ["pathfinder", "--workers", "-1", "--out", "OUT", Q], "--workers"),
    ("data", ["pathfinder", "--distractors", "-1", "--out", "OUT", Q], "--distractors"),
    ("data", ["coco-shapes", "--train", "0", "--out", "OUT"], "--train"),
    ("data", ["coco-shapes", "--size", "0", "--out", "OUT"], "size"),
    ("data", ["coco-shapes", "--out", "FILE"], "is a file"),
    ("kernels", ["--target", "sm_99x", "--out", "OUT"], "sm_99x"),
    ("kernels", ["--target", "", "--out", "OUT"], "--target"),
    ("kernels", ["--jobs", "0", "--out", "OUT"], "--jobs"),
]


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("inputs")
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "bad.yaml").write_text("a: [1\n")
    (d / "bin.yaml").write_bytes(b"\xff\xfe\x00a")
    (d / "file.txt").write_text("mine")
    (d / "emptydir").mkdir()
    (d / "corrupt" / "checkpoints").mkdir(parents=True)
    (d / "corrupt" / "checkpoints" / "last.pt").write_text("garbage")
    names = {"MISSING": "missing.yaml", "LIST": "list.yaml", "BADYAML": "bad.yaml", "BINARY": "bin.yaml"}
    names |= {"FILE": "file.txt", "EMPTYDIR": "emptydir", "NOPE": "nope", "CORRUPT": "corrupt"}
    return {k: str(d / v) for k, v in names.items()}


def one_line_of(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def one_line(err: str) -> str:
    line = one_line_of(err)
    assert line.startswith("error:")
    return line


@pytest.mark.parametrize(("command", "args", "word"), CASES, ids=[f"{c}-{' '.join(a)[:60]}" for c, a, _ in CASES])
def test_a_user_mistake_is_one_line_and_exit_2(fx, tmp_path, capsys, monkeypatch, command, args, word):
    monkeypatch.chdir(ROOT)  # configs/table2.yaml
    monkeypatch.setenv("POLYATTN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    argv = [command, *args] if command != "nosuch" else ["nosuch"]
    for key, path in fx.items():
        argv = [a.replace(key, path) if a.startswith(key) else a for a in argv]
    argv = [str(out) if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    line = one_line(capsys.readouterr().err)
    assert word.lower() in line.lower()
    assert not out.exists()  # refused before writing, or what it had added taken back


def test_every_command_has_user_mistakes_in_the_table():
    from polyattn.cli import COMMANDS

    assert set(COMMANDS) <= {c for c, _, _ in CASES}


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path, capsys):
    # Built-in exceptions out of polyattn's own code on valid input are bugs: main lets them through.
    for bug in (KeyError("x"), ValueError("plain"), RuntimeError("boom"), TypeError("t"), OSError(errno.EIO, "io")):

        def broken(*a, bug=bug, **k):
            raise bug

        monkeypatch.setattr("polyattn.experiments.theory.run_theory", broken)
        with pytest.raises(type(bug)):
            main(["theory", "--quick", "--out", str(tmp_path / "t"), Q])

    # polyattn's own error classes name an input problem: one line.
    def refused(*a, **k):
        raise ConfigError("bad key")

    monkeypatch.setattr("polyattn.experiments.theory.run_theory", refused)
    assert main(["theory", "--quick", "--out", str(tmp_path / "t2"), Q]) == 2
    assert one_line(capsys.readouterr().err) == "error: bad key"
    assert is_user_error(OutDirError("x")) and not is_user_error(ValueError("x"))


@pytest.mark.parametrize(
    ("code", "fix"),
    [
        (errno.ENOSPC, "the disk is full: free space, or choose another --out"),
        (errno.EDQUOT, "the disk quota is exceeded: free space, or choose another --out"),
        (errno.EROFS, "the file system is read-only: choose another --out"),
        (errno.EACCES, "permission denied: change its permissions, or choose another path"),
    ],
)
def test_an_environment_fault_is_one_line_naming_the_file(monkeypatch, tmp_path, capsys, code, fix):
    target = tmp_path / "t" / "results.json"

    def fault(*a, **k):
        raise OSError(code, os.strerror(code), str(target))

    monkeypatch.setattr("polyattn.experiments.theory.run_theory", fault)
    assert main(["theory", "--quick", "--out", str(tmp_path / "t"), Q]) == 2
    assert one_line(capsys.readouterr().err) == f"error: {target}: {fix}"


def test_ctrl_c_is_exit_130_and_one_line(monkeypatch, tmp_path, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("polyattn.experiments.theory.run_theory", interrupted)
    out = tmp_path / "t"
    assert main(["theory", "--quick", "--out", str(out), Q]) == 130
    expected = f"interrupted: {out} may be incomplete; run the same command again to write it anew"
    assert one_line_of(capsys.readouterr().err) == expected
    assert main(["theory", "--quick", "--out", str(out), Q]) == 130  # its own folder: the same command again
    assert main(["activations", "--help"]) == 0 and main(["data", "--help"]) == 0


def test_long_library_messages_become_one_line():
    from polyattn.core.activations import get_activation

    with pytest.raises(ValueError) as e:
        get_activation("bogus")
    assert "accepted forms" in str(e.value) and "\n" in str(e.value)  # the library keeps its full message
    assert error_line(e.value) == (
        "error: bad activation spec 'bogus': unknown activation 'bogus' (polyattn activations lists the accepted forms)"
    )
    err = DatasetNotFoundError.for_path("/d/a.tsv", "ROOT/\n  a.tsv   the rows\n  b.tsv\n", hint="make it with: x")
    assert (
        error_line(err)
        == "error: dataset not found: /d/a.tsv; make it with: x; expected layout: ROOT/; a.tsv the rows; b.tsv"
    )


def test_a_refused_input_takes_back_its_marker_but_never_a_result(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["bench", "--model", "nope", "--out", str(empty), Q]) == 2  # refused after the folder was marked
    assert list(empty.iterdir()) == []
    own = prepare_out_dir(tmp_path / "own", "bench")
    (own / "results.json").write_text("{}")
    assert main(["bench", "--model", "nope", "--out", str(own), Q]) == 2
    assert sorted(p.name for p in own.iterdir()) == [".polyattn", "results.json"]  # its own run is kept whole


# --- read-only folders, for real ----------------------------------------------------------------------------------
def _unprivileged() -> None:
    """In the child: lose root's right to ignore file permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH).

    It stays uid 0, so it still reaches the interpreter under /root (which 'nobody' cannot), but a folder
    without a write bit stops it as it stops any user.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            os._exit(99)


_CHILD = """
import contextlib, io, json, sys
from polyattn.cli import main
rows = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    rows.append([code, err.getvalue()])
print(json.dumps(rows))
"""


def test_a_read_only_folder_is_refused_for_real(tmp_path):
    root = Path(tempfile.mkdtemp(prefix="polyattn-ro-", dir=tmp_path))
    ro = root / "ro"
    ro.mkdir()
    (ro / "notes.txt").write_text("mine")
    config = root / "secret.yaml"
    config.write_text("samples: 4\n")
    ro.chmod(0o555)
    config.chmod(0o000)
    listops = ["data", "listops", "--train", "4", "--val", "2", "--test", "2", Q]
    cases = [
        [*listops, "--out", str(ro)],  # an existing folder it may not write
        [*listops, "--out", str(ro / "new")],  # a new folder under it
        ["theory", "--quick", "--config", str(config), "--out", str(root / "t"), Q],  # a config it may not read
    ]
    try:
        as_root = os.geteuid() == 0
        r = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(cases)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=_unprivileged if as_root else None,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        if r.returncode == 99:
            pytest.skip("cannot drop root's permission override here (prctl PR_CAPBSET_DROP refused)")
        assert r.returncode == 0, r.stderr
        (c1, e1), (c2, e2), (c3, e3) = json.loads(r.stdout)
    finally:
        ro.chmod(0o755)
        config.chmod(0o644)
    assert (c1, c2, c3) == (2, 2, 2)
    assert one_line(e1) == f"error: --out {ro} is not writable: make it writable or choose another --out"
    assert one_line(e2) == f"error: cannot create --out {ro / 'new'}: {ro} is not writable; choose another --out"
    assert one_line(e3) == f"error: {config}: permission denied: change its permissions, or choose another path"
    assert sorted(p.name for p in ro.iterdir()) == ["notes.txt"] and (ro / "notes.txt").read_text() == "mine"
    assert not (root / "t").exists()


# --- the output rule for kernels, pinn --compare and lra --table ---------------------------------------------------
def _users_folder(d: Path, names: list[str]) -> dict[str, bytes]:
    d.mkdir()
    for n in names:
        (d / n).write_text(f"the user's {n}\n")
    return {p.name: p.read_bytes() for p in d.iterdir()}


def test_kernels_out_follows_the_rule(tmp_path, capsys, monkeypatch):
    from polyattn.core.backends import kernel_check

    monkeypatch.setattr(kernel_check, "triton_missing_reason", lambda: None)
    monkeypatch.setattr(kernel_check, "check_kernels", lambda *a, **k: [])  # no compiling: the folder is the point
    mine = tmp_path / "mine"
    before = _users_folder(mine, ["kernels.json", "notes.txt"])
    assert main(["kernels", "--out", str(mine), Q]) == 2
    assert "would overwrite kernels.json" in one_line(capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before
    out = tmp_path / "k"
    assert main(["kernels", "--out", str(out), Q]) == 0 and marked_command(out) == "kernels"
    assert main(["kernels", "--out", str(out), Q]) == 0  # its own results, written again
    assert json.loads((out / "kernels.json").read_text())["rows"] == []


def test_pinn_compare_out_follows_the_rule(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    metrics = {"pde": "wave", "model": "mlp", "activation": None, "diverged": False, "rMAE": 0.5, "rRMSE": 0.6}
    metrics |= {"final_loss": 1.0, "steps": 1, "func_evals": 3, "train_time_s": 1.0, "seed": 0}
    (run / "metrics.json").write_text(json.dumps(metrics))
    mine = tmp_path / "mine"
    before = _users_folder(mine, ["comparison.md", "notes.txt"])
    assert main(["pinn", "--compare", str(run), "--out", str(mine)]) == 2
    assert "would overwrite comparison.md" in one_line(capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before
    (prepare_out_dir(tmp_path / "theirs", "pinn") / "config.yaml").write_text("model: {}\n")
    assert main(["pinn", "--compare", str(run), "--out", str(tmp_path / "theirs")]) == 2
    assert "is a polyattn pinn run, not a pinn --compare run" in capsys.readouterr().err
    out = tmp_path / "cmp"
    assert main(["pinn", "--compare", str(run), "--out", str(out)]) == 0 and marked_command(out) == "pinn --compare"
    assert main(["pinn", "--compare", str(run), "--out", str(out)]) == 0  # its own comparison, written again
    assert "| wave | mlp |" in (out / "comparison.md").read_text()


def test_lra_table_out_follows_the_rule(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    result = {"task": "listops", "activation": "softmax", "seed": 0, "diverged": False, "test_acc": 0.371}
    result |= {"majority_acc": 0.17, "steps": 10, "reduced_scale": True, "time_s": 1.0, "paper_test_acc": 0.372}
    (run / "lra_result.json").write_text(json.dumps(result))
    mine = tmp_path / "notes.md"
    mine.write_text("my own notes\n")
    assert main(["lra", "--table", str(run), "--out", str(mine)]) == 2
    assert f"--out {mine} exists and is not a table polyattn lra --table wrote" in one_line(capsys.readouterr().err)
    assert mine.read_text() == "my own notes\n"
    (tmp_path / "folder").mkdir()
    assert main(["lra", "--table", str(run), "--out", str(tmp_path / "folder")]) == 2
    assert "is a folder" in one_line(capsys.readouterr().err)
    table = tmp_path / "new" / "table.md"
    assert main(["lra", "--table", str(run), "--out", str(table)]) == 0
    assert main(["lra", "--table", str(run), "--out", str(table)]) == 0  # its own table, written again
    assert "| listops | softmax | 0 | 37.1 |" in table.read_text()
    with pytest.raises(OutDirError, match="a file"):
        check_out_file(mine / "x.md", "lra --table")  # under a file


# --- docs/reliability.md's table names tests that exist ------------------------------------------------------------
def test_every_test_named_in_the_reliability_table_exists():
    import ast
    import re

    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)", text)
    assert len(named) >= 20
    missing = []
    for path, name in named:
        file = ROOT / path
        tree = ast.parse(file.read_text(encoding="utf-8")) if file.is_file() else ast.Module(body=[], type_ignores=[])
        if name not in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}:
            missing.append(f"{path}::{name}")
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"
