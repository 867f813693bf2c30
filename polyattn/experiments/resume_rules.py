"""The resume-rule tables of docs/training.md, printed from the schemas of every kind of run.

    python -m polyattn.experiments.resume_rules    # the markdown between the docs' markers

tests/test_config_keys.py checks that the docs hold exactly this text.
"""

from __future__ import annotations

from ..training.config import RESUME_RULES, resume_table, trainer_schema
from .detection.config import DETECT_CONFIG
from .pinn.config import PINN_CONFIG

__all__ = ["resume_docs"]


def resume_docs() -> str:
    """Markdown: what each rule means, then one table per kind of run (train, pinn, detect)."""
    parts = [f"- **{rule}**: {words}." for rule, words in RESUME_RULES.items()]
    parts.append("- `description` is free in every kind of run.")
    for title, schema in (
        ("`polyattn train` (and the runs of compare, sweep, recall, lra)", trainer_schema()),
        ("`polyattn pinn`", PINN_CONFIG),
        ("`polyattn detect`", DETECT_CONFIG),
    ):
        parts.append(f"\n{title}:\n\n{resume_table(schema)}")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(resume_docs(), end="")
