"""Shared fixtures: tiny checkpoints built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Engines in tests must see the plugin exactly as users do; CPU engines only.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cached = os.environ.get("STEERMOE_TEST_CHECKPOINTS")
    if cached:
        Path(cached).mkdir(parents=True, exist_ok=True)
        return Path(cached)
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def build_tiny(checkpoint_root: Path):
    """build_tiny(family) -> checkpoint dir (built once, float32 weights)."""
    from profile_tools.checkpoint_factory import build_checkpoint

    def build(family: str) -> Path:
        return build_checkpoint(family, checkpoint_root / family, size="tiny", dtype="float32")

    return build
