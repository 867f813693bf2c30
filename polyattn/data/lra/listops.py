"""ListOps (LRA): nested MIN / MAX / MED / SM expressions over digits; the target is the value.

The generator follows the LRA specification (Tay et al. 2020, data/listops.py):
a node below ``max_depth`` is an operator with probability 0.25, else a digit;
an operator takes 2..``max_args`` arguments; the length (2 per operator, for
the operator and its "]", plus 1 per digit; parentheses not counted) must lie
strictly between ``min_length`` and ``max_length``; samples are unique. The
string form is the official left-branching one: [MAX 2 3] is written

    ( ( ( [MAX 2 ) 3 ) ] )

Files are the official TSV (``basic_train.tsv`` / ``basic_val.tsv`` /
``basic_test.tsv``, header ``Source<TAB>Target``), as in the LRA release
(lra_release/listops-1000/), so generated data and the release load the same way.

Tokens: LRA's pipeline tokenises with an alphanumeric-only tokenizer, which
keeps the operator names and digits and drops "(", ")" and "]"
(``data.tokens: lra``, the default, as in the numbers LRA and Nystromformer
report). ``data.tokens: brackets`` keeps "]" so that the tree is recoverable.
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import DatasetError, DatasetFormatError, DatasetNotFoundError
from ..registry import DataBundle, int_at_least, register_dataset
from .common import SequenceDataset, TokenStore, bar_disabled, cached_dir, lra_bundle

__all__ = [
    "OPERATORS",
    "LISTOPS_LAYOUT",
    "LISTOPS_VOCAB",
    "SPLIT_FILES",
    "generate_listops",
    "write_listops",
    "read_listops_tsv",
    "tokenize_listops",
    "evaluate_listops",
    "listops_length",
    "load_listops",
]

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
_OPERATOR_P = 0.25  # probability that a node shallower than max_depth is an operator
SPLIT_FILES = {"train": "basic_train.tsv", "val": "basic_val.tsv", "test": "basic_test.tsv"}

LISTOPS_LAYOUT = """\
ROOT/   (e.g. lra_release/listops-1000/)
  basic_train.tsv   header "Source<TAB>Target", then one expression and its value (0-9) per line
  basic_val.tsv
  basic_test.tsv
"""
_GENERATE_HINT = (
    "generate it with: polyattn data listops --out DIR   (or leave data.root unset to generate into the cache)"
)
_REGENERATE_HINT = (
    "regenerate the files with: polyattn data listops --out DIR   (or leave data.root unset to generate into "
    "the cache), or restore them from the LRA release"
)

# Token ids: 0 = padding, digits 1-10, operators 11-16, "]" 17. FIRST and LAST are
# operators of the LRA generator that the benchmark does not use; they are
# accepted so that files made with them load.
LISTOPS_VOCAB: dict[str, int] = {
    **{str(d): 1 + d for d in range(10)},
    "[MIN": 11,
    "[MAX": 12,
    "[MED": 13,
    "[SM": 14,
    "[FIRST": 15,
    "[LAST": 16,
    "]": 17,
}
_OP_CODES = {"[FIRST": "e", "[LAST": "f", "[MIN": "a", "[MAX": "b", "[MED": "c", "[SM": "d"}
_LUT = np.full(256, 255, dtype=np.uint8)
for _d in range(10):
    _LUT[ord(str(_d))] = 1 + _d
for _name, _code in _OP_CODES.items():
    _LUT[ord(_code)] = LISTOPS_VOCAB[_name]
_LUT[ord("]")] = LISTOPS_VOCAB["]"]
_MULTI_DIGIT = re.compile(r"\d\d")


# --- generation --------------------------------------------------------------------
class _TooLong(Exception):
    """Raised inside generation once a tree reaches max_length: it will be rejected anyway."""


def _apply(op: str, values: list[int]) -> int:
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[SM":
        return sum(values) % 10
    s = sorted(values)  # [MED: int(numpy.median), i.e. the mean of the middle two, truncated
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) // 2


def _sample(rng: random.Random, max_depth: int, max_args: int, max_length: int) -> tuple[str, int, int]:
    """One tree as (string, value, length); raises _TooLong once length >= max_length."""
    out: list[str] = []
    length = 0
    rand = rng.random

    def node(depth: int) -> int:
        nonlocal length
        if depth < max_depth and rand() <= _OPERATOR_P:
            k = 2 + int(rand() * (max_args - 1))  # 2..max_args, uniform
            op = OPERATORS[int(rand() * 4)]
            length += 2
            if length >= max_length:
                raise _TooLong
            out.append("( " * (k + 1) + op)
            values = []
            for _ in range(k):
                out.append(" ")
                values.append(node(depth + 1))
                out.append(" )")
            out.append(" ] )")
            return _apply(op, values)
        length += 1
        if length >= max_length:
            raise _TooLong
        v = int(rand() * 10)
        out.append(str(v))
        return v

    value = node(1)
    return "".join(out), value, length


def generate_listops(
    n: int,
    seed: int = 0,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    seen: set | None = None,
) -> Iterator[tuple[str, int]]:
    """Yield ``n`` unique (expression, value) pairs with min_length < length < max_length.

    Deterministic for a given seed. ``seen`` (digests of expressions already
    produced) keeps several calls mutually unique.
    """
    if not 0 <= min_length < max_length - 1:
        raise ValueError(f"need 0 <= min_length < max_length - 1, got {min_length}, {max_length}")
    if max_depth < 1 or max_args < 2:
        raise ValueError(f"need max_depth >= 1 and max_args >= 2, got {max_depth}, {max_args}")
    rng = random.Random(seed)
    seen = set() if seen is None else seen
    produced = 0
    while produced < n:
        try:
            text, value, length = _sample(rng, max_depth, max_args, max_length)
        except _TooLong:
            continue
        if length <= min_length:
            continue
        digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if digest in seen:
            continue
        seen.add(digest)
        produced += 1
        yield text, value


def write_listops(
    out_dir: str | os.PathLike,
    num_train: int = 96000,
    num_val: int = 2000,
    num_test: int = 2000,
    seed: int = 0,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    progress: bool | None = None,
) -> dict[str, Path]:
    """Generate the three splits (mutually unique) into ``out_dir`` as the official TSV files."""
    sizes = {"train": num_train, "val": num_val, "test": num_test}
    for split, k in sizes.items():
        # An empty split file is refused when loaded, so refuse to write one.
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"the number of {split} samples must be an int >= 1, got {k!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stream = generate_listops(sum(sizes.values()), seed, min_length, max_length, max_depth, max_args)
    paths = {}
    with tqdm(total=sum(sizes.values()), desc="listops", unit="sample", disable=bar_disabled(progress)) as bar:
        for split, k in sizes.items():
            paths[split] = out / SPLIT_FILES[split]
            tmp = paths[split].with_suffix(".tsv.tmp")
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f, delimiter="\t")  # lines end in \r\n, like the release
                writer.writerow(["Source", "Target"])
                for _ in range(k):
                    writer.writerow(next(stream))
                    bar.update(1)
            os.replace(tmp, paths[split])
    return paths


# --- reading ---------------------------------------------------------------------------
def evaluate_listops(source: str) -> int:
    """Value of an expression in the official string form (parentheses are ignored)."""
    stack: list[tuple[str, list[int]]] = []
    result: int | None = None
    for tok in source.split():
        if tok in ("(", ")"):
            continue
        if tok.startswith("["):
            stack.append((tok, []))
        elif tok == "]":
            if not stack:
                raise ValueError(f"unbalanced ']' in {source[:80]!r}")
            op, args = stack.pop()
            if op not in OPERATORS:
                raise ValueError(f"unknown operator {op!r}")
            value = _apply(op, args)
            if stack:
                stack[-1][1].append(value)
            else:
                result = value
        else:
            value = int(tok)
            if stack:
                stack[-1][1].append(value)
            else:
                result = value
    if stack or result is None:
        raise ValueError(f"incomplete expression {source[:80]!r}")
    return result


def listops_length(source: str) -> int:
    """Length as the generator counts it: operators, "]" and digits (no parentheses)."""
    return sum(1 for tok in source.split() if tok not in ("(", ")"))


def tokenize_listops(source: str, tokens: str = "lra") -> np.ndarray:
    """Token ids (uint8) of one expression; ``tokens``: "lra" (no brackets) or "brackets" (keeps "]")."""
    if tokens not in ("lra", "brackets"):
        raise ValueError(f"tokens must be 'lra' or 'brackets', got {tokens!r}")
    if _MULTI_DIGIT.search(source):
        raise ValueError("values must be single digits")
    s = source
    for name, code in _OP_CODES.items():
        s = s.replace(name, code)
    raw = s.encode("ascii", errors="replace")
    raw = raw.translate(None, b" ()]" if tokens == "lra" else b" ()")
    ids = _LUT[np.frombuffer(raw, dtype=np.uint8)]
    if ids.size and ids.max() == 255:
        bad = sorted({chr(b) for b, i in zip(raw, ids, strict=True) if i == 255})
        raise ValueError(f"unexpected characters {bad}")
    return ids


def read_listops_tsv(
    path: str | os.PathLike, tokens: str = "lra", limit: int | None = None
) -> tuple[TokenStore, np.ndarray]:
    """Tokenised expressions and their values from an official ListOps TSV file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError.for_path(path, LISTOPS_LAYOUT, _GENERATE_HINT, problem="ListOps file not found")
    seqs, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None:
            raise DatasetFormatError.for_path(
                path, LISTOPS_LAYOUT, _REGENERATE_HINT, problem="empty ListOps file (not even the header line)"
            )
        if header != ["Source", "Target"]:
            raise DatasetFormatError.for_path(
                path,
                LISTOPS_LAYOUT,
                _REGENERATE_HINT,
                problem=f"malformed ListOps file (first line must be 'Source<TAB>Target', got {header!r})",
            )
        for row in reader:
            if limit is not None and len(labels) >= limit:
                break
            line = reader.line_num
            if len(row) != 2:
                raise DatasetFormatError.for_path(
                    path,
                    LISTOPS_LAYOUT,
                    _REGENERATE_HINT,
                    problem=f"malformed ListOps file (line {line}: {len(row)} fields, expected 2)",
                )
            try:
                label = int(row[1])
                if not 0 <= label <= 9:
                    raise ValueError(f"target {label} is not a digit")
                ids = tokenize_listops(row[0], tokens)
                if not ids.size:
                    # An all-padding sequence would train as noise, not fail.
                    raise ValueError("empty expression" if not row[0].strip() else f"no tokens in {row[0]!r}")
                seqs.append(ids)
            except ValueError as e:
                raise DatasetFormatError.for_path(
                    path, LISTOPS_LAYOUT, _REGENERATE_HINT, problem=f"malformed ListOps file (line {line}: {e})"
                ) from None
            labels.append(label)
    if not labels:
        # Without this an empty train split trains 0 steps and still reports a test accuracy.
        what = "no lines were read (limit 0)" if limit == 0 else "only the header line, no examples"
        raise DatasetFormatError.for_path(
            path, LISTOPS_LAYOUT, _REGENERATE_HINT, problem=f"empty ListOps file ({what})"
        )
    return TokenStore.from_sequences(seqs), np.asarray(labels, dtype=np.int64)


def _find_root(root) -> Path:
    path = Path(os.path.expanduser(str(root)))
    if not path.is_dir():
        raise DatasetNotFoundError.for_path(path, LISTOPS_LAYOUT, _GENERATE_HINT, problem="ListOps folder not found")
    for name in SPLIT_FILES.values():
        if not (path / name).is_file():
            raise DatasetNotFoundError.for_path(
                path / name, LISTOPS_LAYOUT, _GENERATE_HINT, problem="ListOps file not found"
            )
    return path


def load_listops(
    root, max_len: int = 2000, tokens: str = "lra", limits: dict[str, int | None] | None = None
) -> dict[str, SequenceDataset]:
    """The three splits of a ListOps folder as datasets of (tokens, padding_mask) -> value."""
    path = _find_root(root)
    limits = limits or {}
    out = {}
    for split, name in SPLIT_FILES.items():
        store, labels = read_listops_tsv(path / name, tokens, limits.get(split))
        out[split] = SequenceDataset(store, labels, max_len)
    return out


# --- the registered dataset ---------------------------------------------------------------
_DEFAULTS = {
    "max_len": 2000,
    "tokens": "lra",
    "num_train": 96000,
    "num_val": 2000,
    "num_test": 2000,
    "gen_min_length": 500,
    "gen_max_length": 2000,
    "gen_max_depth": 10,
    "gen_max_args": 10,
}


_CHECKS = {
    "max_len": int_at_least(1),
    # with data.root these cap the lines read, so 0 would mean an empty split
    "num_train": int_at_least(1),
    "num_val": int_at_least(1),
    "num_test": int_at_least(1),
    "gen_min_length": int_at_least(0),
    "gen_max_length": int_at_least(3),
    "gen_max_depth": int_at_least(1),
    "gen_max_args": int_at_least(2),
}


def _generated_root(cfg: dict) -> Path:
    if not cfg["gen_min_length"] < cfg["gen_max_length"] - 1:
        raise DatasetError(
            f"data.gen_min_length ({cfg['gen_min_length']}) must be less than data.gen_max_length - 1 "
            f"({cfg['gen_max_length'] - 1}): lengths lie strictly between the two"
        )
    params = {
        "format": 1,
        "seed": int(cfg["seed"]),
        **{k: cfg[k] for k in ("num_train", "num_val", "num_test")},
        **{k: cfg[k] for k in _DEFAULTS if k.startswith("gen_")},
    }

    def generate(tmp: Path) -> None:
        write_listops(
            tmp,
            cfg["num_train"],
            cfg["num_val"],
            cfg["num_test"],
            int(cfg["seed"]),
            cfg["gen_min_length"],
            cfg["gen_max_length"],
            cfg["gen_max_depth"],
            cfg["gen_max_args"],
        )

    return cached_dir("listops", params, generate)


@register_dataset("lra_listops", _DEFAULTS, {"tokens": ("lra", "brackets")}, _CHECKS)
def build_lra_listops(cfg: dict, seed: int) -> DataBundle:
    """ListOps from ``data.root`` (official TSV files), or generated into the cache when root is unset.

    num_train / num_val / num_test: generated sizes; with data.root, at most
    that many lines of each file are read (the defaults are the release's sizes).
    """
    if cfg["root"]:
        root = Path(os.path.expanduser(str(cfg["root"])))
        source = str(root)
    else:
        root = _generated_root(cfg)
        source = f"generated (seed {cfg['seed']}) in {root}"
    max_len = int(cfg["max_len"])
    limits = {s: cfg[f"num_{s}"] for s in SPLIT_FILES}
    splits = load_listops(root, max_len, cfg["tokens"], limits)
    lengths = splits["train"].store.lengths()
    return lra_bundle(
        "lra_listops",
        source,
        splits,
        10,
        len(LISTOPS_VOCAB) + 1,
        max_len,
        tokens=cfg["tokens"],
        mean_length=float(lengths.mean()) if len(lengths) else 0.0,
        truncated=int((lengths > max_len).sum()),
    )
