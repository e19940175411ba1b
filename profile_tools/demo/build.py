"""`steermoe demo build DIR`: train the demo MoE and write it as a Hugging Face checkpoint.

DIR receives config.json, generation_config.json, model.safetensors, the tokenizer files,
pairs/{words,safety}.jsonl (for `steermoe profile detect`), eval/*.jsonl (held-out prompt
sets), guard/{train,heldout}.jsonl (labelled prompts for `steermoe guard train`) and demo.json
(planted experts, training numbers, files). A DIR that already holds a complete build of the
same version and settings is left alone (the marker is written last); one whose model is of
the same version and settings but whose task files are older gets the task files (and
demo.json) again without training.
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
    Split,
    edit_sets,
    make_split,
    write_task_files,
)
from profile_tools.demo.model import DemoConfig
from profile_tools.demo.tokenizer import tokenizer_json, write_tokenizer
from profile_tools.demo.train import TrainSettings, train

logger = logging.getLogger(__name__)

DEMO_VERSION = 1
# The files written from the task beside the model: 1 pairs/ and eval/, 2 also guard/.
TASK_FILES_VERSION = 2
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
    return {"demo_version": DEMO_VERSION, "train": asdict(settings),
            "task_files": TASK_FILES_VERSION}


def is_built(directory: str | Path, settings: TrainSettings | None = None) -> bool:
    out = Path(directory)
    marker = out / MARKER
    try:
        wanted = _marker(settings or TrainSettings())
        return json.loads(marker.read_text()) == wanted and all(
            (out / name).exists() for name in MODEL_FILES)
    except (OSError, ValueError):
        return False


def _built_summary(out: Path, settings: TrainSettings) -> dict[str, Any] | None:
    """demo.json of a complete build of this model (version and training settings) whose task
    files may be older, else None."""
    try:
        marker = json.loads((out / MARKER).read_text())
        summary = json.loads((out / "demo.json").read_text())
    except (OSError, ValueError):
        return None
    wanted = _marker(settings)
    if not (isinstance(marker, dict) and isinstance(summary, dict)) or any(
            marker.get(key) != wanted[key] for key in ("demo_version", "train")):
        return None
    return summary if all((out / name).exists() for name in MODEL_FILES) else None


def _write_task_outputs(out: Path, split: Split, settings: TrainSettings,
                        summary: dict[str, Any]) -> None:
    """The task files, demo.json (`summary` with the files added) and, last, the marker."""
    files = write_task_files(out, split)
    summary = {
        **summary,
        "files": {name: str(path.relative_to(out)) for name, path in files.items()},
        "heldout": {"questions": len(split.heldout_questions),
                    "requests": len(split.heldout_requests)},
        "guard": {name: _label_counts(files[f"guard/{name}"]) for name in ("train", "heldout")},
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / MARKER).write_text(json.dumps(_marker(settings)) + "\n")


def _label_counts(path: Path) -> dict[str, int]:
    labels = [json.loads(line)["label"] for line in path.read_text().splitlines() if line]
    return {"1": sum(labels), "0": len(labels) - sum(labels)}


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
    split = make_split()
    summary = _built_summary(out, settings)
    if summary is not None:  # the same model; only the task files are older
        (out / MARKER).unlink()
        _write_task_outputs(out, split, settings, summary)
        logger.info("steermoe demo: wrote the task files of %s again", out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    text = tokenizer_json()
    tokenizer = Tokenizer.from_str(text)
    vocab = 64 * -(-tokenizer.get_vocab_size() // 64)
    config = demo_config(vocab)
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
    summary = {
        "demo_version": DEMO_VERSION, "planted": planted_truth(), "training": info,
        "settings": asdict(settings), "torch": torch.__version__,
    }
    _write_task_outputs(out, split, settings, summary)
    logger.info("steermoe demo: built %s in %.0fs of training", out, info["train_seconds"])
    return out
