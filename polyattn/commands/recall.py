"""``polyattn recall``: multi-query associative recall (MQAR) per activation and sequence length, causal.

The work is :func:`polyattn.experiments.recall.recall`; this module parses flags.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import (
    add_grid_arguments,
    add_jobs_argument,
    add_set_argument,
    grid_options,
    positive_int_list,
    print_experiment,
    run_experiment,
)

DEFAULT_OUT = "runs/recall"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_grid_arguments(p, "softmax,x^3/sqrt(N),x^2/sqrt(N),x/sqrt(N),relu/N,sigmoid-log(N)")
    p.add_argument("--seq-lens", type=positive_int_list, default=None, help="sequence lengths (default 32,64)")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs (default: the base config's, 8)")
    p.add_argument(
        "--config",
        metavar="FILE.yaml",
        default=None,
        help="base config (default: the CPU preset = configs/recall/mqar_cpu.yaml; configs/recall/zoology.yaml "
        "for the full-size setting)",
    )
    add_set_argument(p, "data.num_kv_pairs=8 train.lr=1e-3")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    p.add_argument("--resume", action="store_true", help="reuse finished runs in --out, continue interrupted ones")
    p.add_argument(
        "--norm-every", type=int, default=10, help="record attention norms every K steps (default 10; 0: none)"
    )
    add_jobs_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("decoding check: a trained run's answers through the x^p state vs a KV cache")
    g.add_argument(
        "--check-decoding",
        metavar="RUN_DIR",
        default=None,
        help="instead of training: decode validation sequences of this trained causal_lm MQAR run token by token "
        "through a KV cache and through LinearState, compare the answers (writes RUN_DIR/decoding_check.json)",
    )
    g.add_argument(
        "--check-sequences", type=int, default=200, help="validation sequences the check decodes (default 200)"
    )


def run(args: argparse.Namespace) -> int:
    if args.check_decoding:
        return _check_decoding(args.check_decoding, args.check_sequences)
    from ..experiments.recall import DEFAULT_RECALL_ACTIVATIONS, DEFAULT_SEQ_LENS, recall

    results = run_experiment(
        lambda: recall(
            args.out,
            activations=args.activations or DEFAULT_RECALL_ACTIVATIONS,
            seeds=args.seeds,
            seq_lens=DEFAULT_SEQ_LENS if args.seq_lens is None else args.seq_lens,
            epochs=args.epochs,
            norm_every=args.norm_every,
            **grid_options(args),
        ),
        args.out,
    )
    out = Path(args.out)
    return print_experiment(
        results, lambda r: f"{out / 'report.md'}, {out / 'results.json'}, {out / r['figure']} and T<L>/ per length"
    )


def _check_decoding(run_dir: str, num: int) -> int:
    from ..experiments.recall_decode import check_recall_decoding, format_decoding_check
    from ..utils import atomic_write_json

    try:
        result = check_recall_decoding(run_dir, num=num)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_decoding_check(result))
    atomic_write_json(result, Path(run_dir) / "decoding_check.json")
    print(f"\nwrote {Path(run_dir) / 'decoding_check.json'}")
    return 0
