"""Training the demo model on the CPU: next-token loss on replies, routing loss, steered share.

Deterministic for a seed (fixed thread count, seeded sampler and weights).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from profile_tools.checkpoint_factory import BOS, EOS, PAD
from profile_tools.demo.data import (
    EDIT_NAMES,
    PLANTED,
    PLANTED_LAYERS,
    Example,
    Split,
    edit_sets,
    sample_example,
)
from profile_tools.demo.model import DemoConfig, DemoMoE
from vllm_patches.steering_math import ACTIVATE, DEACTIVATE

logger = logging.getLogger(__name__)

OPPOSITE = {"words": "digits", "digits": "words", "refuse": "comply", "comply": "refuse"}
DECISIVE_WEIGHT = 5.0  # loss weight of the reply token that carries the behaviour or the number


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 500
    batch_size: int = 48
    lr: float = 3e-3
    warmup: int = 30
    routing_weight: float = 0.5
    eps: float = 0.01
    seed: int = 0
    threads: int = 1  # 2 OpenMP threads stall badly on a shared 2-core machine


def render(messages: list[dict[str, str]]) -> str:
    """The chat template's rendering with the generation prompt (as vLLM renders it)."""
    text = BOS + "".join(f"<|{m['role']}|>\n{m['content']}{EOS}\n" for m in messages)
    return text + "<|assistant|>\n"


class Encoder:
    """Prompt and reply token ids of examples, cached per text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.token_to_id(PAD)
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tokenizer.encode(text, add_special_tokens=False).ids
        return self._cache[text]

    def example(self, example: Example) -> tuple[list[int], int, int]:
        """(ids of prompt + reply + end, index of the first reply token, of the deciding one)."""
        prompt = render(example.messages)
        full = self.ids(prompt + example.reply + EOS)
        start = len(self.ids(prompt))
        decisive = len(self.ids(prompt + example.decided_after))
        if full[:start] != self.ids(prompt) or full[:decisive] != self.ids(
                prompt + example.decided_after):
            raise ValueError(f"the reply changes the prompt's tokens: {example}")
        return full, start, decisive


def steering_tables(num_layers: int, num_experts: int, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """[layers, 1 + edits, experts] int8 masks and [1 + edits] eps of the ground-truth edits."""
    masks = torch.zeros(num_layers, len(EDIT_NAMES) + 1, num_experts, dtype=torch.int8)
    for index, name in enumerate(EDIT_NAMES, start=1):
        activate, deactivate = edit_sets(name)
        for layer, experts in activate.items():
            masks[layer, index, experts] = ACTIVATE
        for layer, experts in deactivate.items():
            masks[layer, index, experts] = DEACTIVATE
    return masks, torch.full((len(EDIT_NAMES) + 1,), eps)


def make_batch(examples: list[Example], encoder: Encoder, num_layers: int
               ) -> dict[str, torch.Tensor]:
    encoded = [encoder.example(e) for e in examples]
    length = max(len(ids) for ids, _, _ in encoded)
    batch = len(examples)
    input_ids = torch.full((batch, length), encoder.pad_id, dtype=torch.long)
    labels = torch.full((batch, length), -100, dtype=torch.long)
    weights = torch.zeros((batch, length))
    route = torch.full((num_layers, batch, length), -1, dtype=torch.long)
    route_off = torch.full((num_layers, batch, length), -1, dtype=torch.long)
    profiles = torch.zeros(batch, dtype=torch.long)
    for row, (example, (ids, start, decisive)) in enumerate(zip(examples, encoded, strict=True)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, start - 1 : len(ids) - 1] = torch.tensor(ids[start:])
        weights[row, start - 1 : len(ids) - 1] = 1.0
        weights[row, decisive - 1] = DECISIVE_WEIGHT
        if example.edit is not None:
            profiles[row] = EDIT_NAMES.index(example.edit) + 1
        if example.route is not None:
            for layer in PLANTED_LAYERS:
                # the positions whose outputs are reply tokens, and the reply tokens themselves
                route[layer, row, start - 1 : len(ids) - 1] = PLANTED[layer][example.route]
                route_off[layer, row, start - 1 : len(ids) - 1] = PLANTED[layer][
                    OPPOSITE[example.route]]
    return {"input_ids": input_ids, "labels": labels, "weights": weights, "route": route,
            "route_off": route_off, "profiles": profiles}


def routing_loss(logits: torch.Tensor, target: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """Cross-entropy toward the target expert, plus a hinge that keeps the opposite expert
    below the mean of the others (so out of the top-k beside the target)."""
    chosen = target >= 0
    if not bool(chosen.any()):
        return logits.sum() * 0.0
    z, target, off = logits[chosen], target[chosen], off[chosen]
    z_target = z.gather(1, target[:, None]).squeeze(1)
    z_off = z.gather(1, off[:, None]).squeeze(1)
    others = (z.sum(1) - z_target - z_off) / (z.shape[1] - 2)
    return F.cross_entropy(z, target) + F.relu(1.0 + z_off - others).mean()


def train(split: Split, tokenizer, vocab_size: int, settings: TrainSettings,
          progress: bool = False) -> tuple[DemoMoE, dict[str, float]]:
    """Train from the seed; returns the model and a few numbers about the run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return _train(split, tokenizer, vocab_size, settings, progress)
    finally:
        torch.set_num_threads(threads)


def _train(split: Split, tokenizer, vocab_size: int, settings: TrainSettings,
           progress: bool) -> tuple[DemoMoE, dict[str, float]]:
    torch.manual_seed(settings.seed)
    config = DemoConfig(vocab_size=vocab_size)
    model = DemoMoE(config)
    model.init_weights(torch.Generator().manual_seed(settings.seed))
    masks, eps = steering_tables(config.num_layers, config.num_experts, settings.eps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.98),
                                  weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        done = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    rng = random.Random(settings.seed)
    encoder = Encoder(tokenizer)
    started = time.perf_counter()
    lm_loss = route_loss = torch.tensor(0.0)
    for step in range(settings.steps):
        examples = [sample_example(rng, split) for _ in range(settings.batch_size)]
        batch = make_batch(examples, encoder, config.num_layers)
        length = batch["input_ids"].shape[1]
        token_profiles = batch["profiles"].repeat_interleave(length)
        steer = [(token_profiles, masks[layer], eps) for layer in range(config.num_layers)]
        targets = batch["labels"] >= 0
        logits, router_logits = model(batch["input_ids"], steer, positions=targets)
        weights = batch["weights"][targets]
        lm_loss = (F.cross_entropy(logits, batch["labels"][targets], reduction="none")
                   * weights).sum() / weights.sum()
        route_loss = sum(
            routing_loss(router_logits[layer], batch["route"][layer].reshape(-1),
                         batch["route_off"][layer].reshape(-1))
            for layer in PLANTED_LAYERS
        ) / len(PLANTED_LAYERS)
        loss = lm_loss + settings.routing_weight * route_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if progress and (step % 50 == 0 or step == settings.steps - 1):
            logger.info("step %d/%d  lm %.4f  routing %.4f  %.0fs", step + 1, settings.steps,
                        lm_loss.item(), route_loss.item(), time.perf_counter() - started)
    model.eval()
    return model, {"train_seconds": round(time.perf_counter() - started, 1),
                   "final_lm_loss": round(lm_loss.item(), 5),
                   "final_routing_loss": round(route_loss.item(), 5), "steps": settings.steps}
