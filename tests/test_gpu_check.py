"""scripts/gpu-check.sh in its reduced mode: the GPU checks' script runs to the end on a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_to_the_end_in_reduced_mode(tmp_path: Path) -> None:
    env = {**os.environ, "BLIP_APP_VENV": str(Path(sys.executable).parent.parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--reduced", "--out", str(tmp_path / "out"),
                           "--root", str(tmp_path / "checkpoints")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    report = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    failed = [step for step in report["steps"] if not step["ok"]]
    assert done.returncode == 0 and report["ok"], failed or done.stderr[-3000:]
    steps = {step["step"]: step for step in report["steps"]}
    for name in ("blip2-opt-2.7b", "instructblip-flan-t5-xl"):
        assert f"build {name}" in steps and steps[f"bench {name} static cache"]["summary"]["none"]
        summary = steps[f"bench {name}"]["summary"]
        assert set(summary) == set(report["modes"]) == {"none", "int8-weight-only", "int4-weight-only"}
        assert all(row["decode_s_per_token"] > 0 for row in summary.values())
    switches = steps["switches and parking"]
    assert switches["same_tokens_after_switching_back"] and switches["loaded_after_b"]
    assert report["device"] == "cpu" and report["reduced"]
    text = (tmp_path / "out" / "gpu-check.md").read_text()
    assert "| switches and parking | yes |" in text and "## bench blip2-opt-2.7b" in text
