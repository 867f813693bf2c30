"""``polyattn bench``: time and memory of SDPA softmax vs every polyattn backend; ``--model`` for training,
``--decode`` for generating one token (KV cache against :class:`polyattn.LinearState`), ``--decode --hf`` for
transformers' ``generate`` (KV cache against :class:`polyattn.hf.StateCache`), ``--varlen`` for packed documents
(``polyattn.attention_varlen`` against padding and a block-diagonal mask)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any, NamedTuple

from . import at_least, fail, positive_int_list, str_list


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="output directory (default runs/bench, or runs/bench_<model>)")
    p.add_argument("--quick", action="store_true", help="N in 256,1024,4096, d=64, x^3 only (about a minute)")
    p.add_argument("--config", default=None, help="YAML file with any of the settings below (keys as in config.yaml)")
    p.add_argument("--ns", type=positive_int_list, default=None, help="sequence lengths (default 256,512,...,16384)")
    p.add_argument("--ds", type=positive_int_list, default=None, help="head dimensions (default 32,64)")
    p.add_argument("--ps", type=positive_int_list, default=None, help="powers p of x^p/sqrt(N) (default 1,2,3)")
    p.add_argument(
        "--backends",
        type=str_list,
        default=None,
        help="polyattn backends to time (default auto,chunked,linear,reference; triton added on GPU)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 3)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default 4)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 1)")
    p.add_argument("--divisor", default=None, help="divisor of x^p: sqrt(N) (default), N, none or a number")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on GPU")
    p.add_argument(
        "--threads",
        dest="num_threads",
        type=at_least(1),
        default=None,
        help="torch threads (default: torch's, all cores)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("end-to-end training throughput (--model)")
    g.add_argument("--model", default=None, help="a polyattn.create_model name, e.g. vit_tiny")
    g.add_argument("--activations", type=str_list, default=None, help="activation specs (default softmax,x^3/sqrt(N))")
    g.add_argument("--batch-size", type=int, default=None, help="images per step (default 32)")
    g.add_argument("--steps", type=int, default=None, help="timed training steps (default 5)")
    g.add_argument("--img-size", type=int, default=None, help="image side (default 64)")
    g.add_argument("--patch-size", type=int, default=None, help="patch side (default 4: 257 tokens at 64x64)")
    g.add_argument("--in-chans", type=int, default=None, help="image channels (default 3)")
    g.add_argument(
        "--amp",
        type=str_list,
        default=None,
        help="precisions to time, some of auto,off,bf16,fp16 "
        "(default auto: bf16 where the device computes it natively, else fp32 = off)",
    )

    g = p.add_argument_group("decoding: one next-token step, KV cache vs LinearState (--decode)")
    g.add_argument("--decode", action="store_true", help="time decoding at --contexts (uses --activations, --heads)")
    g.add_argument("--contexts", type=positive_int_list, default=None, help="context lengths (default 1024,...,65536)")
    g.add_argument("--head-dim", dest="d", type=int, default=None, help="head dimension d (default 64)")
    g.add_argument(
        "--hf",
        action="store_true",
        help="a small Llama-shaped transformers model through generate: softmax KV cache, x^p KV cache, x^p StateCache",
    )
    g.add_argument("--layers", type=int, default=None, help="--hf: decoder layers (default 2)")
    g.add_argument("--kv-heads", type=int, default=None, help="--hf: key/value heads, GQA (default 2 of 4 heads)")
    g.add_argument("--new-tokens", type=int, default=None, help="--hf: tokens generated per context (default 32)")

    g = p.add_argument_group("packed sequences: packed vs padded vs block-diagonal mask (--varlen)")
    g.add_argument(
        "--varlen",
        action="store_true",
        help="time attention_varlen against padding and a block mask (forward+backward)",
    )
    g.add_argument(
        "--lengths",
        type=positive_int_list,
        default=None,
        help="document lengths (default 1024,256,4096,512,2048,768,3072,1536)",
    )
    g.add_argument("--not-causal", action="store_true", help="bidirectional attention (default causal)")


_VARLEN_FIELDS = ("lengths", "activations", "heads", "d", "repeats", "device", "dtype", "num_threads")
_DECODE_FIELDS = ("contexts", "activations", "heads", "d", "batch", "steps", "device", "dtype", "num_threads")
_HF_DECODE_FIELDS = (
    "contexts",
    "activations",
    "layers",
    "heads",
    "kv_heads",
    "d",
    "batch",
    "new_tokens",
    "device",
    "dtype",
    "num_threads",
)
_GRID_FIELDS = (
    "ns",
    "ds",
    "ps",
    "backends",
    "repeats",
    "heads",
    "batch",
    "divisor",
    "device",
    "dtype",
    "num_threads",
)
_MODEL_FIELDS = (
    "activations",
    "backends",
    "batch_size",
    "steps",
    "img_size",
    "patch_size",
    "in_chans",
    "amp",
    "device",
    "num_threads",
)


def _load_yaml(path_text: str | None) -> dict[str, Any]:
    if not path_text:
        return {}
    from ..training.config import read_config_file

    return read_config_file(path_text)  # a mapping of bench settings; `inherit:` works as in every config


def build_config(args: argparse.Namespace):
    """Defaults < --quick < --config file < explicit options."""
    data = _load_yaml(args.config)
    if sum(map(bool, (args.decode, args.model, args.varlen))) > 1:
        raise ValueError("--decode, --model and --varlen are different benches: give one of them")
    if args.hf and not args.decode:
        raise ValueError("--hf is a variant of --decode: give --decode --hf")
    if args.decode and args.hf:
        from ..experiments.bench_decode_hf import HFDecodeBenchConfig

        data.update({k: getattr(args, k) for k in _HF_DECODE_FIELDS if getattr(args, k) is not None})
        return HFDecodeBenchConfig.from_dict(data)
    if args.varlen:
        from ..experiments.bench_varlen import VarlenBenchConfig

        data.update({k: getattr(args, k) for k in _VARLEN_FIELDS if getattr(args, k) is not None})
        if args.not_causal:
            data["causal"] = False
        if args.no_memory:
            data["memory"] = False
        return VarlenBenchConfig.from_dict(data)
    if args.decode:
        from ..experiments.bench_decode import DecodeBenchConfig

        data.update({k: getattr(args, k) for k in _DECODE_FIELDS if getattr(args, k) is not None})
        return DecodeBenchConfig.from_dict(data)
    if args.model:
        from ..experiments.bench_model import ModelBenchConfig

        data = {"model": args.model, **{k: v for k, v in data.items() if k != "model"}}
        data.update({k: getattr(args, k) for k in _MODEL_FIELDS if getattr(args, k) is not None})
        return ModelBenchConfig.from_dict(data)
    from ..experiments.bench import QUICK, BenchConfig

    merged: dict[str, Any] = dict(QUICK) if args.quick else {}
    merged.update(data)
    merged.update({k: getattr(args, k) for k in _GRID_FIELDS if getattr(args, k) is not None})
    if args.no_memory:
        merged["memory"] = False
    return BenchConfig.from_dict(merged)


def _prepare(out: str) -> int | None:
    """None when the benchmark may write into ``out`` (see utils.outdir), else the exit code after one line."""
    from ..utils import OutDirError, prepare_out_dir

    try:
        prepare_out_dir(out, "bench")
    except OutDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return None


class _Kind(NamedTuple):
    """A bench kind: its module under polyattn.experiments, its run function, its table in
    polyattn.experiments.report.bench, its default folder, and the figure files it names after writing
    (None: whatever ``results["plots"]`` lists)."""

    module: str
    run: str
    table: str
    out: str
    files: tuple[str, ...] | None = ()


_KINDS = {
    "hf": _Kind("bench_decode_hf", "run_hf_decode_bench", "format_hf_decode_table", "runs/bench_decode_hf",
                ("decode_hf.png",)),
    "varlen": _Kind("bench_varlen", "run_varlen_bench", "format_varlen_table", "runs/bench_varlen"),
    "decode": _Kind("bench_decode", "run_decode_bench", "format_decode_table", "runs/bench_decode", ("decode.png",)),
    "model": _Kind("bench_model", "run_model_bench", "format_model_table", "runs/bench_{model}"),
    "grid": _Kind("bench", "run_bench", "format_grid_table", "runs/bench", None),
}  # fmt: skip


def _kind(args: argparse.Namespace) -> str:
    if args.decode:
        return "hf" if args.hf else "decode"
    return "varlen" if args.varlen else "model" if args.model else "grid"


def run(args: argparse.Namespace) -> int:
    try:
        cfg = build_config(args)
    except (ValueError, TypeError) as e:
        return fail(e)
    kind = _kind(args)
    spec = _KINDS[kind]
    run_bench = getattr(importlib.import_module(f"polyattn.experiments.{spec.module}"), spec.run)
    table = getattr(importlib.import_module("polyattn.experiments.report.bench"), spec.table)
    out = args.out or spec.out.format(model=args.model)
    if (code := _prepare(out)) is not None:
        return code
    extra = {"plots": not args.no_plots} if kind == "grid" else {}
    try:
        results = run_bench(cfg, out, progress=not args.no_progress, **extra)
    except ValueError as e:
        return fail(e)
    print(table(results))
    files = spec.files if spec.files is not None else results.get("plots") or []
    print(f"\nwrote {', '.join([str(Path(out) / 'results.json'), 'report.txt', 'config.yaml', *files])}")
    return 0
