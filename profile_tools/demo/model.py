"""OLMoE in plain torch for training the demo, with the router edit of `steering_math`.

Same computation as transformers' and vLLM's OLMoE (q/k RMSNorm over the whole projection,
rotate-half RoPE, softmax router, top-k without renormalisation); each expert runs on a
contiguous slice of the routed token copies, which is fast for small experts on a CPU.
`hf_state_dict` / `load_hf_state_dict` use the names of Hugging Face OLMoE checkpoints (one
tensor per expert).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vllm_patches.steering_math import steer_router_logits


@dataclass(frozen=True)
class DemoConfig:
    vocab_size: int
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 64
    num_experts: int = 8
    top_k: int = 2
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Layer(nn.Module):
    def __init__(self, c: DemoConfig):
        super().__init__()
        self.c = c
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.q_proj = nn.Linear(c.hidden_size, q_size, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, kv_size, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, kv_size, bias=False)
        self.o_proj = nn.Linear(q_size, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(q_size, c.rms_norm_eps)
        self.k_norm = RMSNorm(kv_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.gate = nn.Linear(c.hidden_size, c.num_experts, bias=False)
        shape = (c.num_experts, c.intermediate_size, c.hidden_size)
        self.gate_proj = nn.Parameter(torch.empty(shape))
        self.up_proj = nn.Parameter(torch.empty(shape))
        self.down_proj = nn.Parameter(
            torch.empty(c.num_experts, c.hidden_size, c.intermediate_size))

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        c = self.c
        batch, length, _ = x.shape
        q = self.q_norm(self.q_proj(x)).view(batch, length, c.num_heads, c.head_dim)
        k = self.k_norm(self.k_proj(x)).view(batch, length, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).view(batch, length, c.num_kv_heads, c.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))

    def moe(self, x: torch.Tensor, steer: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, the router's own logits [tokens, experts]) for x [tokens, hidden]."""
        logits = self.gate(x)
        routed = logits if steer is None else steer_router_logits(logits, *steer)
        probs = torch.softmax(routed.float(), dim=-1)
        top_values, top_index = torch.topk(probs, self.c.top_k, dim=-1)
        # Each expert runs on a contiguous slice of the token copies sorted by expert.
        experts = top_index.reshape(-1)
        order = torch.argsort(experts, stable=True)
        tokens = order // self.c.top_k
        token_weights = top_values.reshape(-1)[order].to(x.dtype).unsqueeze(1)
        counts = torch.bincount(experts, minlength=self.c.num_experts).tolist()
        chosen = torch.index_select(x, 0, tokens)
        parts, start = [], 0
        for expert, count in enumerate(counts):
            rows = chosen[start : start + count]
            hidden = F.silu(rows @ self.gate_proj[expert].t()) * (rows @ self.up_proj[expert].t())
            parts.append(hidden @ self.down_proj[expert].t())
            start += count
        out = torch.zeros_like(x).index_add(0, tokens, torch.cat(parts) * token_weights)
        return out, logits

    def forward(self, x, cos, sin, steer) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attention(self.input_layernorm(x), cos, sin)
        flat = self.post_attention_layernorm(x).reshape(-1, x.shape[-1])
        out, logits = self.moe(flat, steer)
        return x + out.view_as(x), logits


class DemoMoE(nn.Module):
    """Causal LM; `forward` returns (logits [B, T, V], router logits per layer [B*T, E])."""

    def __init__(self, c: DemoConfig):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def init_weights(self, generator: torch.Generator) -> None:
        c = self.c
        for name, param in sorted(self.named_parameters()):
            leaf = name.rsplit(".", 1)[-1]
            with torch.no_grad():
                if "norm" in name:
                    param.fill_(1.0)
                elif name == "embed_tokens.weight":
                    param.normal_(0.0, 1.0, generator=generator)
                elif ".gate." in name:
                    param.normal_(0.0, 0.02, generator=generator)
                else:
                    fan_in = param.shape[-1]
                    scale = 1.0 / math.sqrt(fan_in)
                    if leaf in ("down_proj", "weight") and ("o_proj" in name or leaf ==
                                                            "down_proj"):
                        scale /= math.sqrt(2 * c.num_layers)
                    param.normal_(0.0, scale, generator=generator)

    def forward(self, input_ids: torch.Tensor, steer: list[tuple | None] | None = None,
                positions: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits, router logits per layer); logits [B, T, V], or [K, V] at the K positions of
        the boolean mask `positions` [B, T]. `steer[layer]`: (token_profiles, layer_masks, eps)
        for `steer_router_logits`, token_profiles flattened over [B, T]."""
        index = torch.arange(input_ids.shape[1], dtype=torch.float32)
        freqs = index[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        x = self.embed_tokens(input_ids)
        router_logits = []
        for index, layer in enumerate(self.layers):
            x, logits = layer(x, cos, sin, steer[index] if steer else None)
            router_logits.append(logits)
        if positions is not None:
            x = x[positions]
        return self.lm_head(self.norm(x)), router_logits

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under Hugging Face OLMoE checkpoint names (contiguous float32)."""
        out = {"model.embed_tokens.weight": self.embed_tokens.weight,
               "model.norm.weight": self.norm.weight, "lm_head.weight": self.lm_head.weight}
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = layer.input_layernorm.weight
            out[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[p + f"self_attn.{name}.weight"] = getattr(layer, name).weight
            out[p + "self_attn.q_norm.weight"] = layer.q_norm.weight
            out[p + "self_attn.k_norm.weight"] = layer.k_norm.weight
            out[p + "mlp.gate.weight"] = layer.gate.weight
            for e in range(self.c.num_experts):
                for name in ("gate_proj", "up_proj", "down_proj"):
                    out[p + f"mlp.experts.{e}.{name}.weight"] = getattr(layer, name)[e]
        return {k: v.detach().float().contiguous().clone() for k, v in out.items()}

    def load_hf_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        """Load weights named as `hf_state_dict` names them (every name must be present)."""
        names = set(self.hf_state_dict())
        if set(weights) != names:
            raise ValueError(f"weights differ in names: {sorted(set(weights) ^ names)[:5]}")
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.split(".")[-1] in ("gate_proj", "up_proj", "down_proj"):
                    layer = name.split(".")[1]
                    for expert in range(self.c.num_experts):
                        param[expert].copy_(weights[f"model.layers.{layer}.mlp.experts."
                                                    f"{expert}.{name.split('.')[-1]}.weight"])
                else:
                    param.copy_(weights[_hf_name(name)])


def _hf_name(name: str) -> str:
    """Hugging Face name of a non-expert parameter of DemoMoE."""
    if name.startswith("lm_head"):
        return name
    for part in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
        name = name.replace(f".{part}.", f".self_attn.{part}.")
    return "model." + name.replace(".gate.", ".mlp.gate.")
