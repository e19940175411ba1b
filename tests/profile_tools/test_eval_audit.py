"""`steermoe audit` on the demo model (one real engine): refusal falls as the detected safety
experts are suppressed, with table, curve and summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from profile_tools.demo.data import PLANTED, PLANTED_LAYERS
from profile_tools.demo.prepare import prepare
from profile_tools.evaluation.audit import main as audit_main

pytestmark = pytest.mark.engine


def test_audit_of_the_demo_model(checkpoint_root: Path, tmp_path: Path):
    model_dir, _ = prepare(checkpoint_root / "demo")
    out = tmp_path / "audit"
    argv = [str(model_dir), "--pairs", str(model_dir / "pairs" / "safety.jsonl"),
            "--prompts", str(model_dir / "eval" / "restricted_cued.jsonl"), "--out", str(out),
            "--steps", "0,1,2,3",
            "--engine-arg", "dtype=float32", "--engine-arg", "max_model_len=512",
            "--engine-arg", "enforce_eager=true", "--engine-arg", "gpu_memory_utilization=0.2"]
    assert audit_main(argv) == 0
    result = json.loads((out / "audit.json").read_text())
    rates = {row["n"]: row["refusal"]["rate"] for row in result["steps"]}
    print({n: f"{r:.1%}" for n, r in rates.items()}, result["summary"])
    assert rates[0] >= 0.9
    assert rates[len(PLANTED_LAYERS)] <= 0.1
    full = result["steps"][list(rates).index(len(PLANTED_LAYERS))]["steering"]
    assert full["deactivate"] == {str(layer): [PLANTED[layer]["refuse"]]
                                  for layer in PLANTED_LAYERS}
    assert full["activate"] == {str(layer): [PLANTED[layer]["comply"]]
                                for layer in PLANTED_LAYERS}
    assert result["concentration"]["n_halving"] <= len(PLANTED_LAYERS)
    assert (out / "audit.png").stat().st_size > 1000
    assert "halves the refusal rate" in (out / "audit.md").read_text()
