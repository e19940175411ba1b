"""`steermoe demo build DIR`: train the demo MoE and write it as a Hugging Face checkpoint.

DIR receives config.json, generation_config.json, model.safetensors, the tokenizer files,
pairs/{words,safety}.jsonl (for `steermoe profile detect`), eval/*.jsonl (held-out prompt
sets) and demo.json (planted experts, training numbers). A DIR that already holds a complete
build of the same version and settings is left alone (the marker is written last).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from profile_tools.checkpoint_factory import checkpoint_config
from profile_tools.demo.data import (
    EDITS,
    PLANTED,
    PLANTED_LAYERS,
    edit_sets,
    make_split,
    write_task_files,
)
from profile_tools.demo.model import DemoConfig
from profile_tools.demo.tokenizer import tokenizer_json, write_tokenizer
from profile_tools.demo.train import TrainSettings, train

logger = logging.getLogger(__name__)

DEMO_VERSION = 1
MARKER = ".steermoe_demo.json"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "demo.json")
MAX_MODEL_LEN = 512


def demo_config(vocab_size: int) -> dict[str, Any]:
    """config.json: the project's tiny OLMoE shape with the demo's vocabulary, float32."""
    config = checkpoint_config("olmoe", "tiny", "float32")
    config.update(vocab_size=vocab_size, max_position_embeddings=MAX_MODEL_LEN)
    return config


def model_config(config: dict[str, Any]) -> DemoConfig:
    """The training model's settings read from config.json."""
    return DemoConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
        num_kv_heads=config["num_key_value_heads"],
        head_dim=config["hidden_size"] // config["num_attention_heads"],
        intermediate_size=config["intermediate_size"], num_experts=config["num_experts"],
        top_k=config["num_experts_per_tok"], rope_theta=config["rope_theta"],
        rms_norm_eps=config["rms_norm_eps"],
    )


def _marker(settings: TrainSettings) -> dict[str, Any]:
    return {"demo_version": DEMO_VERSION, "train": asdict(settings)}


def is_built(directory: str | Path, settings: TrainSettings | None = None) -> bool:
    out = Path(directory)
    marker = out / MARKER
    try:
        wanted = _marker(settings or TrainSettings())
        return json.loads(marker.read_text()) == wanted and all(
            (out / name).exists() for name in MODEL_FILES)
    except (OSError, ValueError):
        return False


def planted_truth() -> dict[str, Any]:
    """The planted experts and the edits trained with (for demo.json and the tests)."""
    return {
        "layers": list(PLANTED_LAYERS),
        "experts": {str(layer): experts for layer, experts in PLANTED.items()},
        "edits": {name: {"activate": {str(k): v for k, v in edit_sets(name)[0].items()},
                         "deactivate": {str(k): v for k, v in edit_sets(name)[1].items()}}
                  for name in EDITS},
    }


def build(directory: str | Path, settings: TrainSettings | None = None,
          progress: bool = False) -> Path:
    """Build the demo model into `directory` (a no-op when it already holds this build)."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    settings = settings or TrainSettings()
    out = Path(directory)
    if is_built(out, settings):
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    text = tokenizer_json()
    tokenizer = Tokenizer.from_str(text)
    vocab = 64 * -(-tokenizer.get_vocab_size() // 64)
    config = demo_config(vocab)
    split = make_split()
    model, info = train(split, tokenizer, vocab, settings, progress=progress)
    if model_config(config) != model.c:
        raise RuntimeError("the trained model does not match config.json")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer(out, text)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        save_file(model.hf_state_dict(), str(Path(tmp) / "model.safetensors"),
                  metadata={"format": "pt"})
        (Path(tmp) / "model.safetensors").chmod(0o644)
        shutil.move(str(Path(tmp) / "model.safetensors"), out / "model.safetensors")
    files = write_task_files(out, split)
    summary = {
        "demo_version": DEMO_VERSION, "planted": planted_truth(), "training": info,
        "settings": asdict(settings), "torch": torch.__version__,
        "files": {name: str(path.relative_to(out)) for name, path in files.items()},
        "heldout": {"questions": len(split.heldout_questions),
                    "requests": len(split.heldout_requests)},
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / MARKER).write_text(json.dumps(_marker(settings)) + "\n")
    logger.info("steermoe demo: built %s in %.0fs of training", out, info["train_seconds"])
    return out
