"""Steering fields in the form vLLM's `vllm_xargs` can carry.

`vllm_xargs` accepts only strings, numbers and lists of them, so inline steering travels as its
JSON text (and routing capture as 1); the plugin's front end (`expert_profiles.request_steering`)
reads both forms.
"""

from __future__ import annotations

import json
from typing import Any


def encode_inline(steering: dict[str, Any]) -> str:
    return json.dumps(steering, separators=(",", ":"), sort_keys=True)
