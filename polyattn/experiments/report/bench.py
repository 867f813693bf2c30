"""The text tables (printed, and written as report.txt) and the figures of every ``polyattn bench`` kind: the
grid of backends against SDPA, ``--model``, ``--decode``, ``--decode --hf`` and ``--varlen``."""

from __future__ import annotations

import os
from pathlib import Path

from ..bench_common import SDPA, bench_spec, find_case
from .common import pyplot, save_figure

__all__ = [
    "format_decode_table",
    "format_grid_table",
    "format_hf_decode_table",
    "format_model_table",
    "format_varlen_table",
    "plot_bench",
    "plot_decode",
]


def bench_table(results: dict, flag: str, lines: list[str]) -> str:
    """A bench's table: the title naming the kind (``flag``) and the machine, ``lines``, the elapsed time."""
    return "\n".join(
        [f"polyattn bench{flag} on {results['machine']}", *lines, f"\nelapsed {results['elapsed_s']:.0f} s"]
    )


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


# --------------------------------------------------------------------------- #
# The grid: every backend against SDPA softmax
# --------------------------------------------------------------------------- #
def _ms(t: float | None) -> str:
    return "-" if t is None else (f"{t * 1e3:.1f}" if t < 10 else f"{t * 1e3:.0f}")


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def _section(cfg: dict, cases: list[dict], backends: list[str], d: int, p: int, causal: bool, mode: str) -> list:
    spec = bench_spec(p, cfg["divisor"])
    what = ("causal " if causal else "") + (mode if mode != "fwd+bwd" or len(cfg.get("modes", [])) > 1 else "")
    lines = ["", f"== d={d}  {spec}  {what + '  ' if what else ''}vs SDPA softmax =="]
    head = f"{'N':>6} {'sdpa ms':>9} {'MiB':>6} |"
    for b in backends:
        head += f" {b + ' ms (x, mem x)':>26} |"
    lines.append(head)
    for n in cfg["ns"]:
        base = find_case(cases, n, d, None, SDPA, causal, mode) or {}
        row = f"{n:>6} {_ms(base.get('time_s')):>9} {_mib(base.get('peak_bytes')):>6} |"
        for b in backends:
            c = find_case(cases, n, d, p, b, causal, mode) or {}
            if c.get("skipped"):
                cell = "skipped"
            elif c.get("error"):
                cell = "error"
            elif c.get("time_s") is None:
                cell = "-"
            else:
                tr = c.get("time_vs_sdpa")
                mr = c.get("memory_vs_sdpa")
                ratios = f"{'-' if tr is None else f'{tr:.2f}'}, {'-' if mr is None else f'{mr:.2f}'}"
                cell = f"{_ms(c['time_s'])} ({ratios})"
                if b == "auto":
                    cell = f"{c['picked'][:4]}: " + cell
            row += f" {cell:>26} |"
        lines.append(row)
    return lines


def format_grid_table(results: dict) -> str:
    """Per (d, p): rows N; SDPA ms and MiB, then each backend's ms, time ratio and memory ratio vs SDPA."""
    cfg = results["config"]
    cases = results["cases"]
    lines = [
        f"B={cfg['batch']} H={cfg['heads']} {cfg['dtype']} {cfg['device']}; "
        f"{', '.join(cfg.get('modes', ['fwd+bwd']))}, fastest of the timed runs; ratios < 1 beat SDPA"
        + (f"; SDPA kernel: {cfg['sdpa_backend']}" if cfg.get("sdpa_backend", "auto") != "auto" else ""),
    ]
    backends = cfg["backends"]
    for d in cfg["ds"]:
        for causal in cfg.get("causal", [False]):
            for mode in cfg.get("modes", ["fwd+bwd"]):
                for p in cfg["ps"]:
                    lines += _section(cfg, cases, backends, d, p, causal, mode)
    skips = sorted({(c["backend"], c["skipped"]) for c in cases if c.get("skipped")})
    errors = [(c["key"], c["error"]) for c in cases if c.get("error")]
    if skips:
        lines.append("")
        lines.append("skipped (backend: reason, one example each):")
        seen = set()
        for b, why in skips:
            short = why.split(" vs ")[0] if why.startswith("cost model estimates") else why
            if (b, short[:40]) in seen:
                continue
            seen.add((b, short[:40]))
            lines.append(f"  {b}: {why}")
    for key, err in errors:
        lines.append(f"error {key}: {err}")
    return bench_table(results, "", lines)


# Fixed styles so a backend keeps its colour when another has no points; auto
# is drawn wide and pale underneath the backend it picked.
_STYLE = {
    SDPA: {"color": "black", "linestyle": "--", "marker": "o", "ms": 3},
    "auto": {"color": "tab:purple", "linewidth": 5, "alpha": 0.3},
    "chunked": {"color": "tab:orange", "marker": "o", "ms": 3},
    "linear": {"color": "tab:green", "marker": "o", "ms": 3},
    "reference": {"color": "tab:red", "marker": "o", "ms": 3},
    "triton": {"color": "tab:blue", "marker": "o", "ms": 3},
    "sdpa": {"color": "tab:gray", "marker": "o", "ms": 3},
}


def plot_bench(results: dict, out_dir: Path) -> list[Path]:
    """bench_time.png and bench_memory.png: one panel per (d, p), one line per backend, log-log."""
    plt = pyplot()
    cfg = results["config"]
    cases = results["cases"]
    # One panel per (d, p): the first causal setting, fwd+bwd when it was timed.
    causal = cfg.get("causal", [False])[0]
    modes = cfg.get("modes", ["fwd+bwd"])
    mode = "fwd+bwd" if "fwd+bwd" in modes else modes[0]
    paths = []
    for metric, ylabel, fname in (
        ("time_s", f"{mode} time (s)", "bench_time.png"),
        ("peak_bytes", "peak extra memory (MiB)", "bench_memory.png"),
    ):
        if metric == "peak_bytes" and not any(c.get("peak_bytes") for c in cases):
            continue
        nd, np_ = len(cfg["ds"]), len(cfg["ps"])
        fig, axes = plt.subplots(nd, np_, figsize=(4.2 * np_, 3.4 * nd), squeeze=False)
        for i, d in enumerate(cfg["ds"]):
            for j, p in enumerate(cfg["ps"]):
                ax = axes[i][j]
                for b in [SDPA, *cfg["backends"]]:
                    pts = []
                    for n in cfg["ns"]:
                        c = find_case(cases, n, d, None if b == SDPA else p, b, causal, mode)
                        if c and c.get(metric):
                            pts.append((n, c[metric] / (2**20 if metric == "peak_bytes" else 1)))
                    if pts:
                        xs, ys = zip(*pts, strict=True)
                        ax.plot(xs, ys, label="SDPA softmax" if b == SDPA else b, **_STYLE.get(b, {}))
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_title(f"d={d}, {bench_spec(p, cfg['divisor'])}", fontsize=9)
                ax.set_xlabel("N")
                ax.set_ylabel(ylabel, fontsize=8)
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
        fig.suptitle(f"polyattn bench: {results['machine']}", fontsize=9)
        fig.tight_layout()
        paths.append(save_figure(fig, out_dir / fname, dpi=110))
    return paths


# --------------------------------------------------------------------------- #
# --model: training throughput
# --------------------------------------------------------------------------- #
def format_model_table(results: dict) -> str:
    """One row per (activation, backend, amp): imgs/s, ms per step, the ratio to softmax under auto."""
    cfg = results["config"]
    lines = [
        f"batch {cfg['batch_size']}, {cfg['img_size']}x{cfg['img_size']}x{cfg.get('in_chans', 3)} images, "
        f"patch {cfg['patch_size']}; "
        f"AdamW training steps, fastest of {cfg['steps']} (taken in turns), {cfg['warmup_steps']} warm-up",
        "",
        f"{'activation':<14} {'backend':<10} {'amp':<5} {'runs':<10} {'imgs/s':>8} {'ms/step':>8} {'vs softmax':>11}",
    ]
    for r in results["rows"]:
        runs = r.get("runs", "")
        if r.get("skipped"):
            lines.append(
                f"{r['activation']:<14} {r['backend']:<10} {r.get('amp', 'off'):<5} {runs:<10} skipped: {r['skipped']}"
            )
            continue
        ips = r["imgs_per_s"]
        ms = 1e3 * min(r["step_times_s"])
        rel = r.get("vs_softmax_auto")
        lines.append(
            f"{r['activation']:<14} {r['backend']:<10} {r.get('amp', 'off'):<5} {runs:<10} {ips:>8.1f} {ms:>8.1f} "
            f"{'-' if rel is None else f'{rel:.2f}x':>11}"
        )
    return bench_table(results, f" --model {cfg['model']}", lines)


# --------------------------------------------------------------------------- #
# --decode and --decode --hf: one next token
# --------------------------------------------------------------------------- #
def format_decode_table(results: dict) -> str:
    """One row per (context, activation, method): tokens/s, the ratio to softmax, memory kept, prefill."""
    cfg = results["config"]
    lines = [
        f"one attention layer: batch {cfg['batch']}, {cfg['heads']} heads, d = {cfg['d']}, {cfg['dtype']}; "
        f"next-token step, fastest of {cfg['steps']} (in turns), {cfg['warmup']} warm-up",
        "",
        f"{'context':>8} {'activation':<14} {'method':<9} {'tokens/s':>10} {'vs softmax':>11} {'memory':>10} "
        f"{'prefill':>9}",
    ]
    for r in results["rows"]:
        prefill = f"{r['prefill_s']:.2f} s" if "prefill_s" in r else "-"
        lines.append(
            f"{r['context']:>8} {r['activation']:<14} {r['method']:<9} {r['tokens_per_s']:>10.0f} "
            f"{r['vs_softmax']:>10.2f}x {_size(r['bytes']):>10} {prefill:>9}"
        )
    return bench_table(results, " --decode", lines)


def format_hf_decode_table(results: dict) -> str:
    """One row per (context, activation, cache): tokens/s of generate, the ratio to softmax, cache memory, prefill."""
    cfg = results["config"]
    cuda = any("peak_bytes" in r for r in results["rows"])
    lines = [
        f"Llama-shaped model through generate: {cfg['layers']} layers, {cfg['heads']} heads ({cfg['kv_heads']} k/v), "
        f"d = {cfg['d']}, batch {cfg['batch']}, {cfg['dtype']}; {cfg['new_tokens']} new tokens after a prompt of "
        "`context` tokens; tokens/s of the fastest of tokens 2..n",
        "",
        f"{'context':>8} {'activation':<14} {'cache':<9} {'tokens/s':>10} {'vs softmax':>11} {'cache mem':>10} "
        + (f"{'peak (GPU)':>11} " if cuda else "")
        + f"{'prefill':>9}",
    ]
    for r in results["rows"]:
        peak = f"{_size(r['peak_bytes']):>11} " if cuda else ""
        mark = "" if r.get("same_tokens_as_kv_cache", True) else "  (tokens differ from the KV cache's)"
        lines.append(
            f"{r['context']:>8} {r['activation']:<14} {r['method']:<9} {r['tokens_per_s']:>10.1f} "
            f"{r['vs_softmax']:>10.2f}x {_size(r['cache_bytes']):>10} {peak}{r['prefill_s']:>7.2f} s{mark}"
        )
    return bench_table(results, " --decode --hf", lines)


def plot_decode(results: dict, path: str | os.PathLike, bytes_key: str, speed: str, memory: str) -> Path:
    """Tokens/s (left) and memory (right, ``row[bytes_key]``) against the context, one line per (activation,
    method), log-log; the KV-cache methods dashed."""
    plt = pyplot()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
    series: dict[str, list[dict]] = {}
    for r in results["rows"]:
        series.setdefault(f"{r['activation']} ({r['method']})", []).append(r)
    for name, rs in series.items():
        xs = [r["context"] for r in rs]
        style = "--" if "kv-cache" in name else "-"
        ax_t.plot(xs, [r["tokens_per_s"] for r in rs], style, marker="o", label=name)
        ax_m.plot(xs, [r[bytes_key] / 2**20 for r in rs], style, marker="o", label=name)
    for ax, label in ((ax_t, speed), (ax_m, memory)):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle(results["machine"], fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


# --------------------------------------------------------------------------- #
# --varlen: packed documents
# --------------------------------------------------------------------------- #
def format_varlen_table(results: dict) -> str:
    """One row per (activation, layout, method): fwd+bwd time, the ratio to packed, peak memory, a note."""
    cfg = results["config"]
    lengths = cfg["lengths"]
    lines = [
        f"{len(lengths)} documents of {min(lengths)}..{max(lengths)} tokens ({sum(lengths)} in all), "
        f"{cfg['heads']} heads, d = {cfg['d']}, {cfg['dtype']}, causal={cfg['causal']}; forward + backward, "
        f"fastest of {cfg['repeats']}",
        "",
        f"{'activation':<13} {'layout':<11} {'method':<18} {'fwd+bwd':>10} {'vs packed':>10} {'peak mem':>11}  note",
    ]
    for r in results["rows"]:
        t = f"{r['time_s'] * 1e3:.0f} ms" if "time_s" in r else "-"
        vs = f"{r['vs_packed']:.2f}x" if "vs_packed" in r else "-"
        mem = f"{r['peak_bytes'] / 2**20:.0f} MiB" if "peak_bytes" in r else "-"
        note = r.get("error") or r.get("memory_error") or r.get("note", "")
        lines.append(f"{r['activation']:<13} {r['layout']:<11} {r['method']:<18} {t:>10} {vs:>10} {mem:>11}  {note}")
    return bench_table(results, " --varlen", lines)
