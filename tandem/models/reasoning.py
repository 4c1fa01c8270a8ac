"""Reasoning stage: a decoder-only transformer with Mixture-of-Experts feed-forward layers.

It reads a byte-level prompt and writes the scene as discrete codebook tokens, one grid cell at a
time. The KV cache is static and preallocated (``max_len`` positions) and every update is an
index-based write at the current position, so every graph has fixed shapes apart from batch and
prompt length: the same graphs serve ONNX Runtime, TensorRT profiles, Neuron static shapes and
CUDA graphs.

Cache layout: ``[batch, n_layers, 2 (key, value), n_heads, max_len, head_dim]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tandem.config import ModelConfig
from tandem.tokenizer import SCENE_OFFSET, vocab_size


class RMSNorm(nn.Module):
    # Written out (not nn.RMSNorm) so every exporter sees plain ops at opset 18.
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Explicit attention (MatMul/Softmax) so exports do not depend on a fused-kernel lowering.
    ``mask`` is boolean, True where attention is allowed."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, seq, _ = x.shape
        qkv = self.qkv(x).view(batch, seq, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]  # each [B, H, S, Dh]

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        batch, _, seq, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))

    def forward_full(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Causal attention over the whole sequence (prefill, training). Returns output, keys, values."""
        q, k, v = self._split(x)
        seq = x.shape[1]
        positions = torch.arange(seq, device=x.device)
        causal = positions.unsqueeze(0) <= positions.unsqueeze(1)  # [S, S]: key <= query
        return self._merge(_attend(q, k, v, causal)), k, v

    def forward_step(
        self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One new token per row written into the static cache at ``positions`` [B]."""
        q, k, v = self._split(x)  # [B, H, 1, Dh]
        batch, heads, _, head_dim = q.shape
        index = positions.view(batch, 1, 1, 1).expand(batch, heads, 1, head_dim)
        k_cache = k_cache.scatter(2, index, k)
        v_cache = v_cache.scatter(2, index, v)
        slots = torch.arange(k_cache.shape[2], device=x.device)
        visible = (slots.unsqueeze(0) <= positions.unsqueeze(1)).view(batch, 1, 1, -1)
        return self._merge(_attend(q, k_cache, v_cache, visible)), k_cache, v_cache


class MoEFeedForward(nn.Module):
    """Top-k of E SwiGLU experts with renormalised gate weights.

    Routing is computed in the graph (softmax -> TopK -> gather/scatter), never in Python control
    flow, so an exported graph follows whatever experts each token picks at run time. Two
    equivalent evaluation strategies:
    - ``sparse``: gathers only the k chosen experts' weights per token (decode: few tokens);
    - ``dense``: runs every expert and zero-weights the unchosen ones (prefill/training: many tokens,
      where all experts are busy anyway and batched matmuls beat per-token gathers).
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int):
        super().__init__()
        self.n_experts, self.top_k, self.d_ff = n_experts, top_k, d_ff
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.w_up = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.last_routing: torch.Tensor | None = None  # [N, k] expert ids, kept for inspection in eager mode

    def reset_parameters(self) -> None:
        for w in (self.w_gate, self.w_up):
            nn.init.normal_(w, std=1.0 / math.sqrt(w.shape[1]))
        nn.init.normal_(self.w_down, std=1.0 / math.sqrt(self.d_ff))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.router(x), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), experts

    def forward(self, x: torch.Tensor, sparse: bool) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, d]
        weights, experts = self.route(x)
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            self.last_routing = experts.detach()
        if sparse:
            gate = torch.matmul(x[:, None, None, :], self.w_gate[experts])  # [N, k, 1, f]
            up = torch.matmul(x[:, None, None, :], self.w_up[experts])
            y = torch.matmul(F.silu(gate) * up, self.w_down[experts]).squeeze(2)  # [N, k, d]
            out = (y * weights.unsqueeze(-1)).sum(dim=1)
        else:
            gates = torch.zeros(x.shape[0], self.n_experts, dtype=x.dtype, device=x.device)
            gates = gates.scatter(1, experts, weights)  # [N, E], zero for unchosen experts
            xe = x.unsqueeze(0).expand(self.n_experts, -1, -1)  # [E, N, d]
            hidden = F.silu(torch.bmm(xe, self.w_gate)) * torch.bmm(xe, self.w_up)  # [E, N, f]
            y = torch.bmm(hidden, self.w_down)  # [E, N, d]
            out = (y * gates.t().unsqueeze(-1)).sum(dim=0)
        return out.reshape(shape)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        r = config.reasoning
        self.attn_norm = RMSNorm(r.d_model, r.norm_eps)
        self.attn = Attention(r.d_model, r.n_heads)
        self.ffn_norm = RMSNorm(r.d_model, r.norm_eps)
        self.moe = MoEFeedForward(r.d_model, r.d_ff, r.n_experts, r.top_k)


class ReasoningTransformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        r = config.reasoning
        self.config = config
        self.n_layers, self.n_heads, self.head_dim = r.n_layers, r.n_heads, r.head_dim
        self.max_len = config.max_len
        self.codebook_size = config.scene.codebook_size
        self.token_embedding = nn.Embedding(vocab_size(self.codebook_size), r.d_model)
        self.position_embedding = nn.Embedding(self.max_len, r.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(r.n_layers))
        self.final_norm = RMSNorm(r.d_model, r.norm_eps)
        self.lm_head = nn.Linear(r.d_model, self.codebook_size, bias=False)

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, MoEFeedForward):
                module.reset_parameters()
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward_sequence(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Hidden states [B, S, d] for a whole sequence, plus per-layer (k, v) stacked [B, 2, H, S, Dh]."""
        seq = input_ids.shape[1]
        positions = torch.arange(seq, device=input_ids.device)
        h = self.token_embedding(input_ids) + self.position_embedding(positions).unsqueeze(0)
        layer_kv = []
        for block in self.blocks:
            attn_out, k, v = block.attn.forward_full(block.attn_norm(h))
            h = h + attn_out
            h = h + block.moe(block.ffn_norm(h), sparse=False)
            layer_kv.append(torch.stack([k, v], dim=1))
        return self.final_norm(h), layer_kv

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits over the scene codebook for every position [B, S, V] (training)."""
        hidden, _ = self.forward_sequence(input_ids)
        return self.lm_head(hidden)

    def prefill(self, input_ids: torch.Tensor, prompt_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded prompts [B, P] -> logits of each prompt's last real token [B, V] and the
        static cache [B, L, 2, H, max_len, Dh] with positions [0, P) filled."""
        batch, seq = input_ids.shape
        hidden, layer_kv = self.forward_sequence(input_ids)
        last = (prompt_lengths - 1).view(batch, 1, 1).expand(batch, 1, hidden.shape[-1])
        logits = self.lm_head(torch.gather(hidden, 1, last).squeeze(1))
        kv = torch.stack(layer_kv, dim=1)  # [B, L, 2, H, P, Dh]
        free = kv.new_zeros(batch, self.n_layers, 2, self.n_heads, self.max_len - seq, self.head_dim)
        return logits, torch.cat([kv, free], dim=4)

    def decode_step(
        self, token_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scene tokens [B] (codebook ids) at ``positions`` [B] -> next-token logits [B, V] and the
        cache with this step's keys/values written in place of the free slots."""
        h = self.token_embedding(token_ids + SCENE_OFFSET) + self.position_embedding(positions)
        h = h.unsqueeze(1)  # [B, 1, d]
        new_layers = []
        for i, block in enumerate(self.blocks):
            attn_out, k_cache, v_cache = block.attn.forward_step(
                block.attn_norm(h), kv_cache[:, i, 0], kv_cache[:, i, 1], positions
            )
            h = h + attn_out
            h = h + block.moe(block.ffn_norm(h), sparse=True)
            new_layers.append(torch.stack([k_cache, v_cache], dim=1))
        logits = self.lm_head(self.final_norm(h.squeeze(1)))
        return logits, torch.stack(new_layers, dim=1)
