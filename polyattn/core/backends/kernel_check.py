"""Compile every Triton kernel variant for real GPU targets without a GPU: registers, spills, shared memory.

Triton's CPU interpreter runs the kernels' arithmetic but none of what makes
a kernel fail or crawl on hardware: shared memory beyond the chip's, register
spills, a launch configuration that does not compile. Triton ships ptxas, so
each variant compiles to a cubin for sm_80 or sm_90 on any machine
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``), and
the cubin's resource table (read with the ``cuobjdump`` Triton also ships)
gives registers per thread and the stack frame, which for these kernels (no
calls, no local arrays) is the spill space.

A kernel module takes part by exporting ``compile_variants() ->
list[KernelVariant]``, each one kernel specialisation (signature and
constexprs) with the launch configurations its autotuner may pick for it, and
by being named in :data:`KERNEL_MODULES`. Compiled kernels land in Triton's
own on-disk cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``), so a
second check of unchanged kernels takes seconds.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "KERNEL_MODULES",
    "SHARED_MEMORY_LIMITS",
    "KernelVariant",
    "LaunchConfig",
    "check_kernels",
    "compile_job",
    "format_kernel_table",
    "parse_target",
    "problems",
    "variants",
]

# Modules exporting compile_variants(); a new kernel module appends its name here.
KERNEL_MODULES: list[str] = ["polyattn.core.backends.triton_kernels"]

# Most shared memory one block may use (bytes, opt-in maximum), by compute capability.
SHARED_MEMORY_LIMITS: dict[int, int] = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}


@dataclass(frozen=True)
class LaunchConfig:
    """One autotuner choice: block-size constexprs plus warps and pipeline stages."""

    blocks: tuple[tuple[str, int], ...]
    num_warps: int
    num_stages: int

    @property
    def label(self) -> str:
        sizes = "x".join(str(v) for _, v in self.blocks)
        return f"{sizes} w{self.num_warps} s{self.num_stages}"


@dataclass(frozen=True)
class KernelVariant:
    """One specialisation of a kernel and the launch configurations its autotuner may pick for it.

    ``kernel`` is a ``triton.jit`` function (not an autotuned wrapper);
    ``signature`` maps every runtime argument to a Triton type ("*bf16",
    "i32", "fp32"); ``constexprs`` gives every compile-time argument except
    the ones each LaunchConfig sets. ``tags`` describe the variant in the table
    (pass, head dim, dtype, activation, causal).
    """

    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    configs: tuple[LaunchConfig, ...]
    tags: dict[str, Any] = field(default_factory=dict)


def parse_target(text: str) -> int:
    """``"sm_90"``, ``"sm90"`` or ``"90"`` -> 90, for a target with a known shared-memory limit."""
    m = re.fullmatch(r"(?:sm_?)?(\d+)", text.strip().lower())
    if not m or int(m.group(1)) not in SHARED_MEMORY_LIMITS:
        known = ", ".join(f"sm_{c}" for c in SHARED_MEMORY_LIMITS)
        raise ValueError(f"unknown GPU target {text!r}; known targets: {known}")
    return int(m.group(1))


def triton_missing_reason() -> str | None:
    """Why kernels cannot be compiled here, or None."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"triton is not installed or too old to compile for GPU targets ({e}); pip install 'polyattn[triton]'"
    if _tool("cuobjdump") is None or _tool("ptxas") is None:
        return "this triton install has no NVIDIA toolchain (ptxas, cuobjdump under triton/backends/nvidia/bin)"
    return None


def _tool(name: str) -> str | None:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


def variants(arch: int, modules: Sequence[str] | None = None, quick: bool = False) -> list[KernelVariant]:
    """Every kernel variant for compute capability ``arch`` (90 for sm_90) of the given modules
    (default :data:`KERNEL_MODULES`); each module's ``compile_variants(arch=..., quick=...)``.

    ``quick``: each module's reduced list, which still holds every launch
    configuration of every pass and dtype once.
    """
    out: list[KernelVariant] = []
    for name in modules if modules is not None else KERNEL_MODULES:
        out.extend(importlib.import_module(name).compile_variants(arch=arch, quick=quick))
    return out


def _resources(cubin: bytes) -> dict[str, int]:
    """Registers per thread and stack/local bytes per thread from the cubin's resource table."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(f.name)
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", text))
    if "REG" not in fields:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    return {k: int(v) for k, v in fields.items()}


def compile_job(job: tuple[KernelVariant, LaunchConfig, int]) -> dict[str, Any]:
    """Compile one (variant, launch config, target); the row of the table, with ``error`` when it fails."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    variant, config, arch = job
    constexprs = {**variant.constexprs, **dict(config.blocks)}
    signature = {**variant.signature, **{k: "constexpr" for k in constexprs}}
    row: dict[str, Any] = {
        "target": f"sm_{arch}",
        "kernel": getattr(variant.kernel, "__name__", str(variant.kernel)),
        **variant.tags,
        "config": config.label,
    }
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=variant.kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
        res = _resources(compiled.asm["cubin"])
        row.update(
            registers=res["REG"],
            spill_bytes=res.get("STACK", 0) + res.get("LOCAL", 0),
            shared_bytes=int(compiled.metadata.shared),
        )
    except Exception as e:  # reported per configuration; the check goes on
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    row["compile_s"] = round(time.perf_counter() - t0, 3)
    return row


def check_kernels(
    targets: Iterable[int],
    quick: bool = False,
    modules: Sequence[str] | None = None,
    jobs: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Compile every variant in every launch configuration for every target; one row each.

    ``jobs`` > 1 compiles in worker processes. ``progress(done, total)`` is
    called after each compile.
    """
    reason = triton_missing_reason()
    if reason is not None:
        raise RuntimeError(reason)
    plan = {t: variants(t, modules, quick) for t in targets}
    work = [(t, i, j) for t, vs in plan.items() for i, v in enumerate(vs) for j in range(len(v.configs))]
    rows: list[dict[str, Any]] = []
    if jobs <= 1:
        for t, i, j in work:
            v = plan[t][i]
            rows.append(compile_job((v, v.configs[j], t)))
            if progress:
                progress(len(rows), len(work))
        return rows
    # Jit functions do not pickle: each worker builds the same variant lists and takes jobs by index.
    spec = (tuple(modules) if modules is not None else None, quick)
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for row in pool.map(_compile_indexed, [(spec, *w) for w in work], chunksize=2):
            rows.append(row)
            if progress:
                progress(len(rows), len(work))
    return rows


_WORKER_PLANS: dict[tuple, list[KernelVariant]] = {}


def _compile_indexed(job: tuple) -> dict[str, Any]:
    (modules, quick), arch, i, j = job
    key = (modules, quick, arch)
    if key not in _WORKER_PLANS:
        _WORKER_PLANS[key] = variants(arch, modules, quick)
    v = _WORKER_PLANS[key][i]
    return compile_job((v, v.configs[j], arch))


def problems(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per configuration that fails to compile, needs more shared memory than its target has, or spills."""
    out = []
    for r in rows:
        where = _where(r)
        if r.get("error"):
            out.append(f"{where}: does not compile: {r['error']}")
            continue
        limit = SHARED_MEMORY_LIMITS[int(r["target"][3:])]
        if r["shared_bytes"] > limit:
            out.append(f"{where}: needs {r['shared_bytes']} bytes of shared memory, {r['target']} has {limit}")
        if r["spill_bytes"]:
            out.append(f"{where}: spills {r['spill_bytes']} bytes per thread ({r['registers']} registers)")
    return out


_TAG_ORDER = ("pass", "head_dim", "dtype", "activation", "causal")


def _where(r: dict[str, Any]) -> str:
    tags = " ".join(f"{k}={r[k]}" for k in _TAG_ORDER if k in r)
    return f"{r['target']} {r['kernel']} {tags} config {r['config']}"


def format_kernel_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per compiled configuration; the limit of each target in the header."""
    cols = [c for c in _TAG_ORDER if any(c in r for r in rows)]
    head = ["target", "kernel", *cols, "config", "regs", "spill B", "shared KiB", "compile s"]
    body = []
    for r in rows:
        cells = [r["target"], r["kernel"], *(str(r.get(c, "")) for c in cols), r["config"]]
        if r.get("error"):
            cells += ["error", "-", "-", f"{r['compile_s']:.2f}"]
        else:
            cells += [str(r["registers"]), str(r["spill_bytes"]), f"{r['shared_bytes'] / 1024:.0f}"]
            cells.append(f"{r['compile_s']:.2f}")
        body.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(head)]
    lines = [" ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += [" ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in body]
    return "\n".join(lines)
