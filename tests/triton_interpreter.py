"""Run a test script in a child process under TRITON_INTERPRET=1 and read the results it prints.

The interpreter is chosen when Triton is imported, so the kernels' tests run their script in a fresh
process; the script prints one line ``RESULTS<json>``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def interpreter_results_of(script: str) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS")]
    assert proc.returncode == 0 and lines, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULTS") :])
