"""The demo's byte-level BPE tokenizer, trained on the task's own texts (small vocabulary).

Special tokens, chat template and tokenizer_config follow `profile_tools.checkpoint_factory`,
so the demo checkpoint is served like the project's other local checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from profile_tools.checkpoint_factory import SPECIAL_TOKENS
from profile_tools.demo.task import vocabulary_corpus

# Large enough that every word of the task becomes one token; training stops earlier.
_MAX_VOCAB = 4096


def tokenizer_json() -> str:
    """Train the tokenizer on the task corpus (deterministic) and return its JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_MAX_VOCAB, min_frequency=1, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    corpus = vocabulary_corpus()
    # Both spellings of each line: at the start of a message and after a space.
    tokenizer.train_from_iterator(corpus + [" " + line for line in corpus], trainer=trainer)
    return tokenizer.to_str()


def write_tokenizer(out: Path, text: str) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template), special_tokens_map.json."""
    from profile_tools.checkpoint_factory import write_tokenizer as write_files

    write_files(out, tokenizer_json=text, model_max_length=512)


def load_tokenizer(directory: Path):
    """The transformers fast tokenizer of a directory written by `write_tokenizer`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))
