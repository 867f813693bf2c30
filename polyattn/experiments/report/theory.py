"""The text report of ``polyattn theory`` (printed, and written as report.txt): the Theorem 4.1 table, the
fitted slopes against the theorems' rates, the Monte Carlo means and the findings."""

from __future__ import annotations

from typing import Any

from ..theory import QUANTITIES
from .common import text_table

__all__ = ["format_report"]


def _fmt_ci(row: dict[str, Any]) -> str:
    if row["slope"] is None:
        return "n/a"
    return f"{row['slope']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"


def _table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(text_table(header, rows))


def format_report(results: dict[str, Any]) -> str:
    """The terminal report: Theorem 4.1 table, slope table, means table, findings."""
    b, mc, cfg = results["theorem_4_1"], results["monte_carlo"], results["config"]
    parts = [
        f"Theorem 4.1 (softmax): largest ratio to each bound over {cfg['bound_samples']} matrices per family and N"
    ]
    fams = b["families"]
    by = {(r["n"], r["family"]): r for r in b["rows"]}
    rows = []
    for fam in fams:
        fro = max(by[(n, fam)]["max_fro_ratio"] for n in b["n"])
        jac = max(by[(n, fam)]["max_jac_ratio"] for n in b["n"])
        rows.append([fam, f"{fro:.4f}", f"{jac:.4f}"])
    rows.append(["ALL", f"{b['max_fro_ratio']:.4f}", f"{b['max_jac_ratio']:.4f}"])
    parts.append(_table(["family", "||A||_F / sqrt(N)", "||dA/dS||_F / (2 sqrt(N))"], rows))
    parts.append(
        f"bounds hold on every sample: {'yes' if b['holds'] else 'NO'}   "
        f"(N = {b['n'][0]}..{b['n'][-1]}; closed-form Jacobian vs autograd at N <= 8: "
        f"max |diff| = {b['autograd_check']['max_abs_diff']:.1e})"
    )

    parts.append("")
    parts.append(
        f"Theorems 4.2/4.4, Corollaries 4.3/4.5: X ~ N(0, {cfg['sigma_x']:g}^2) (N x {cfg['D']}), "
        f"Q, K ~ N(0, {cfg['sigma_t']:.4g}^2) ({cfg['D']} x {cfg['d']}), S = X Q K^T X^T / sqrt(d), "
        f"{mc['samples']} draws per N, N = {mc['n'][0]}..{mc['n'][-1]}; "
        f"log-log slope vs N [95% interval], slope between the two largest N"
    )
    rows = [
        [
            r["activation"],
            QUANTITIES[r["quantity"]],
            _fmt_ci(r),
            "n/a" if r["tail_slope"] is None else f"{r['tail_slope']:.3f}",
            ("<= " if r["kind"] == "bound" else "") + f"{r['predicted_slope']:g}",
            r["claim"],
            r["verdict"],
        ]
        for r in mc["slopes"]
    ]
    parts.append(_table(["phi", "quantity", "slope [95% CI]", "tail", "theory", "claim", "verdict"], rows))

    parts.append("")
    parts.append("Monte Carlo means (95% interval half-width in parentheses):")
    for qname, label in QUANTITIES.items():
        header = ["N"] + list(mc["stats"])
        rows = []
        for ni, n in enumerate(mc["n"]):
            row = [str(n)]
            for spec in mc["stats"]:
                c = mc["stats"][spec][qname][ni]
                row.append(f"{c['mean']:.4g} ({(c['ci_high'] - c['ci_low']) / 2:.2g})")
            rows.append(row)
        parts.append(label)
        parts.append(_table(header, rows))
    parts.append("")
    parts.append("Findings:")
    parts.extend(f"- {f}" for f in results["findings"])
    return "\n".join(parts)
