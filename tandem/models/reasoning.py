"""Reasoning stage: a decoder-only transformer with Mixture-of-Experts feed-forward layers.

It reads a byte-level prompt and writes the scene as discrete codebook tokens, one grid cell at a
time. The KV cache is static and preallocated (``max_len`` positions) and owned by the caller
(:mod:`tandem.decoding`): graphs read it and return only the keys/values they computed, which the
caller writes into its buffer in place. Every graph has fixed shapes apart from batch and prompt
length: the same graphs serve ONNX Runtime, TensorRT profiles, Neuron static shapes and CUDA graphs.

Cache layout: one key and one value tensor per layer, each ``[batch, n_heads, max_len, head_dim]``
(separate tensors, so a graph never slices, i.e. copies, one big cache).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tandem.tokenizer import SCENE_OFFSET, vocab_size

if TYPE_CHECKING:  # annotations only (torch alone imports the models)
    from tandem.config import ModelConfig


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
        """One new token per row at ``positions`` [B], attending to the cache's positions
        [0, position) and to its own key. The cache is only read; the new key and value
        [B, H, 1, Dh] are returned for the caller to write at ``positions``.

        The softmax is taken in two parts (cache, new key) over a shared maximum, so the new key is
        never concatenated onto (a copy of) the cache."""
        q, k, v = self._split(x)  # [B, H, 1, Dh]
        batch = q.shape[0]
        scale = 1.0 / math.sqrt(q.shape[-1])
        slots = torch.arange(k_cache.shape[2], device=x.device)
        past = (slots.unsqueeze(0) < positions.unsqueeze(1)).view(batch, 1, 1, -1)
        cache_scores = (torch.matmul(q, k_cache.transpose(-1, -2)) * scale).masked_fill(~past, torch.finfo(q.dtype).min)
        new_score = (q * k).sum(dim=-1, keepdim=True) * scale  # [B, H, 1, 1]
        peak = torch.maximum(cache_scores.amax(dim=-1, keepdim=True), new_score)
        cache_weights, new_weight = torch.exp(cache_scores - peak), torch.exp(new_score - peak)
        total = cache_weights.sum(dim=-1, keepdim=True) + new_weight
        y = (torch.matmul(cache_weights, v_cache) + new_weight * v) / total
        return self._merge(y), k, v

    def forward_block(
        self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start_positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k new tokens per row at positions ``start_positions[b] + [0, k)`` (x: [B, k, d]): each
        query attends to the cache's positions [0, start) and to the block's keys up to its own
        (causal inside the block). Cache slots at or past ``start`` are never read, whatever they
        hold (rows a previous block wrote and the caller rolled back). Returns output, and the new
        keys and values [B, H, k, Dh] for the caller to write at those positions.

        Two-part softmax over a shared maximum, as :meth:`forward_step`: nothing is concatenated."""
        q, k, v = self._split(x)  # [B, H, k, Dh]
        batch, width = q.shape[0], q.shape[2]
        scale = 1.0 / math.sqrt(q.shape[-1])
        lowest = torch.finfo(q.dtype).min
        slots = torch.arange(k_cache.shape[2], device=x.device)
        past = (slots.unsqueeze(0) < start_positions.unsqueeze(1)).view(batch, 1, 1, -1)
        cache_scores = (torch.matmul(q, k_cache.transpose(-1, -2)) * scale).masked_fill(~past, lowest)  # [B, H, k, L]
        offsets = torch.arange(width, device=x.device)
        causal = offsets.unsqueeze(0) <= offsets.unsqueeze(1)  # [k, k]: key <= query
        # Block scores and their weighted values elementwise (k is small), as forward_step treats its
        # new key: the precision rewrites quantize MatMul inputs, and these stay out of them.
        block_scores = ((q.unsqueeze(3) * k.unsqueeze(2)).sum(dim=-1) * scale).masked_fill(~causal, lowest)  # [B, H, k, k]
        peak = torch.maximum(cache_scores.amax(dim=-1, keepdim=True), block_scores.amax(dim=-1, keepdim=True))
        cache_weights, block_weights = torch.exp(cache_scores - peak), torch.exp(block_scores - peak)
        total = cache_weights.sum(dim=-1, keepdim=True) + block_weights.sum(dim=-1, keepdim=True)
        y = (torch.matmul(cache_weights, v_cache) + (block_weights.unsqueeze(-1) * v.unsqueeze(2)).sum(dim=3)) / total
        return self._merge(y), k, v


class MoEFeedForward(nn.Module):
    """Top-k of E SwiGLU experts with renormalised gate weights.

    Routing is computed in the graph (softmax -> TopK -> scatter), never in Python control
    flow, so an exported graph follows whatever experts each token picks at run time. Three
    equivalent evaluation strategies:
    - ``sparse``: gathers only the k chosen experts' weights per token. The gather copies
      k * 3 weight matrices per token, so it is kept for eager inspection and comparison only;
    - ``dense``: runs every expert once over all rows and zero-weights the unchosen ones: the
      weights are read where they are, never copied, in standard ops every compiler takes;
    - :meth:`forward_routed`: each expert over only the rows routed to it (rows found in the graph
      with ``nonzero``, so its shapes are data-dependent): an expert no row picked does a matmul
      over zero rows and its weights are never read. torch.export and AOTInductor take it
      (:mod:`tandem.export.rewrites`, ``routed_experts``);
    - :meth:`forward_capturable`: the picked experts' weights gathered by index at static shapes
      (no ``nonzero``, no host synchronisation), so a CUDA step can be captured as one CUDA graph
      (``capturable_experts``).
    Targets swap in their routed form while their graphs are traced (:mod:`tandem.export.rewrites`).
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int):
        super().__init__()
        self.n_experts, self.top_k, self.d_ff = n_experts, top_k, d_ff
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.w_up = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.last_routing: torch.Tensor | None = None  # [N, k] expert ids, kept for inspection in eager mode
        # A target's replacement for the whole layer while its graphs are traced
        # (tandem.export.rewrites); None everywhere else.
        self.evaluate = None

    def reset_parameters(self) -> None:
        for w in (self.w_gate, self.w_up):
            nn.init.normal_(w, std=1.0 / math.sqrt(w.shape[1]))
        nn.init.normal_(self.w_down, std=1.0 / math.sqrt(self.d_ff))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.router(x), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), experts

    def forward_routed(self, x: torch.Tensor) -> torch.Tensor:
        """Each expert over only its rows: rows and top-k slots from ``nonzero(experts == e)``, the
        expert's weights read in place (a view of the stack), its output scaled by the row's gate
        weight and added into the row. Same routing and per-row sum order as the dense form."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, d]
        weights, experts = self.route(x)
        out = torch.zeros_like(x)
        for e in range(self.n_experts):
            rows, slots = torch.nonzero(experts == e, as_tuple=True)  # [M_e] each, M_e data-dependent
            xs = x.index_select(0, rows)  # [M_e, d]
            hidden = F.silu(torch.mm(xs, self.w_gate[e])) * torch.mm(xs, self.w_up[e])  # [M_e, f]
            y = torch.mm(hidden, self.w_down[e]) * weights[rows, slots].unsqueeze(-1)  # [M_e, d]
            out = out.index_add(0, rows, y)
        return out.reshape(shape)

    def forward_capturable(self, x: torch.Tensor) -> torch.Tensor:
        """The routed experts with static shapes and no host synchronisation (CUDA-graph
        capturable): the distinct experts the rows picked, ascending, padded to
        ``U = min(E, N * top_k)`` slots with the first picked expert, all found on the device
        (a scatter of the top-k ids, ``any`` over rows, a sort); their weights gathered by index
        (``index_select``: ``U`` slabs, never an expert no row picked) and every row run through
        each slot's expert with ``bmm``, scaled by the row's gate for that expert (zero where the
        row did not pick it, and in padding slots, so a padded duplicate adds nothing). Same
        routing and per-row sum order as the dense form (padding and unpicked experts add exact
        zeros). At decode batch 1 that is the 2 routed slabs; at batch 8, 8 slabs however many
        distinct experts were picked (duplicates of picked ones, never an unpicked one).
        The gather copies the slabs (read, write, then read by ``bmm``): a grouped GEMM over
        the stacks in place would read them once."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, d]
        weights, experts = self.route(x)
        rows, n_experts = x.shape[0], self.n_experts
        slots = torch.sym_min(n_experts, rows * self.top_k)
        gates = torch.zeros(rows, n_experts, dtype=x.dtype, device=x.device).scatter(1, experts, weights)  # [N, E]
        picked = torch.zeros(rows, n_experts, dtype=torch.bool, device=x.device).scatter(1, experts, True).any(dim=0)  # [E]
        index = torch.arange(n_experts, device=x.device)
        order = torch.argsort(index + (~picked).to(index.dtype) * n_experts)[:slots]  # picked experts first, ascending
        valid = torch.arange(slots, device=x.device) < picked.sum()  # [U]
        ids = torch.where(valid, order, order[:1])  # padding: the first picked expert (read again, never an unpicked one)
        slot_gates = gates.index_select(1, ids) * valid.to(x.dtype)  # [N, U]
        xe = x.unsqueeze(0).expand(ids.shape[0], -1, -1)  # [U, N, d]
        hidden = F.silu(torch.bmm(xe, self.w_gate.index_select(0, ids))) * torch.bmm(xe, self.w_up.index_select(0, ids))
        y = torch.bmm(hidden, self.w_down.index_select(0, ids))  # [U, N, d]
        out = (y * slot_gates.t().unsqueeze(-1)).sum(dim=0)
        return out.reshape(shape)

    def forward(self, x: torch.Tensor, sparse: bool) -> torch.Tensor:
        if self.evaluate is not None:
            return self.evaluate(x)
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
            self.init_module(module)

    @staticmethod
    def init_module(module: nn.Module) -> None:
        """Initialise ``module``'s own parameters (not its children's): the seeded init, one
        module at a time, so it can run while the others are still on the meta device."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, MoEFeedForward):
            module.reset_parameters()
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def forward_sequence(
        self, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Hidden states [B, S, d] for a whole sequence, plus per-layer keys and values [B, H, S, Dh]."""
        seq = input_ids.shape[1]
        positions = torch.arange(seq, device=input_ids.device)
        h = self.token_embedding(input_ids) + self.position_embedding(positions).unsqueeze(0)
        layer_kv = []
        for block in self.blocks:
            attn_out, k, v = block.attn.forward_full(block.attn_norm(h))
            h = h + attn_out
            h = h + block.moe(block.ffn_norm(h), sparse=False)
            layer_kv.append((k, v))
        return self.final_norm(h), layer_kv

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits over the scene codebook for every position [B, S, V] (training)."""
        hidden, _ = self.forward_sequence(input_ids)
        return self.lm_head(hidden)

    def prefill(
        self, input_ids: torch.Tensor, prompt_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Right-padded prompts [B, P] -> logits of each prompt's last real token [B, V] and every
        layer's keys and values for positions [0, P), each [B, H, P, Dh], for the caller's cache."""
        batch = input_ids.shape[0]
        hidden, layer_kv = self.forward_sequence(input_ids)
        last = (prompt_lengths - 1).view(batch, 1, 1).expand(batch, 1, hidden.shape[-1])
        logits = self.lm_head(torch.gather(hidden, 1, last).squeeze(1))
        return logits, [k for k, _ in layer_kv], [v for _, v in layer_kv]

    def decode_step(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        past_keys: Sequence[torch.Tensor],
        past_values: Sequence[torch.Tensor],
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Scene tokens [B] (codebook ids) at ``positions`` [B], with each layer's cache
        [B, H, max_len, Dh] valid at [0, position) -> next-token logits [B, V] and this step's keys
        and values per layer [B, H, 1, Dh] (the caller writes them at ``positions``)."""
        h = self.token_embedding(token_ids + SCENE_OFFSET) + self.position_embedding(positions)
        h = h.unsqueeze(1)  # [B, 1, d]
        new_keys, new_values = [], []
        for block, k_cache, v_cache in zip(self.blocks, past_keys, past_values):
            attn_out, k, v = block.attn.forward_step(block.attn_norm(h), k_cache, v_cache, positions)
            h = h + attn_out
            h = h + block.moe(block.ffn_norm(h), sparse=False)
            new_keys.append(k)
            new_values.append(v)
        logits = self.lm_head(self.final_norm(h.squeeze(1)))
        return logits, new_keys, new_values

    def verify_step(
        self,
        token_ids: torch.Tensor,
        start_positions: torch.Tensor,
        past_keys: Sequence[torch.Tensor],
        past_values: Sequence[torch.Tensor],
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """k scene tokens per row [B, k] at positions ``start_positions[b] + [0, k)``, with each
        layer's cache [B, H, max_len, Dh] valid at [0, start) -> next-token logits after each of
        them [B, k, V] and their keys and values per layer [B, H, k, Dh] (the caller writes them
        at those positions). Row i of the block sees the cache and block rows [0, i]: its logits
        are what :meth:`decode_step` gives after feeding the block's tokens one at a time."""
        width = token_ids.shape[1]
        positions = start_positions.unsqueeze(1) + torch.arange(width, device=token_ids.device).unsqueeze(0)  # [B, k]
        h = self.token_embedding(token_ids + SCENE_OFFSET) + self.position_embedding(positions)  # [B, k, d]
        new_keys, new_values = [], []
        for block, k_cache, v_cache in zip(self.blocks, past_keys, past_values):
            attn_out, k, v = block.attn.forward_block(block.attn_norm(h), k_cache, v_cache, start_positions)
            h = h + attn_out
            h = h + block.moe(block.ffn_norm(h), sparse=False)
            new_keys.append(k)
            new_values.append(v)
        logits = self.lm_head(self.final_norm(h))
        return logits, new_keys, new_values


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Next-token selection inside the step graphs: logits [B, V] and per-row ``temperature`` [B]
    (0: greedy), ``top_k`` [B] (0 or >= V: no limit) and ``uniform`` [B] (the row's draw in [0, 1)
    from its request's generator) -> token ids [B] int64.

    The same rule as the host reference :func:`tandem.sampling.select_next`, in float32 and standard
    ONNX ops (ArgMax, TopK, GatherElements, Where, Exp, CumSum): greedy rows take the
    first maximum; sampled rows keep every logit >= the k-th largest (ties kept; comparing the
    unscaled logits is the host's comparison after its positive division), scale by 1 / temperature
    (a Where puts 1 in greedy rows, so nothing divides by zero), weigh ``exp(s - max)`` unnormalised
    and take the inverse CDF: the first index whose cumulative weight exceeds ``uniform * total``
    (numpy's ``searchsorted(side="right")``). The host sums in float64: a draw within
    float32 rounding of a CDF boundary can pick the neighbouring token."""
    vocab = logits.shape[-1]
    sampled = temperature > 0
    ranked = torch.topk(logits, vocab, dim=-1).values  # descending: the k-th largest is at k - 1
    cutoff = ranked.gather(1, (top_k.clamp(1, vocab) - 1).unsqueeze(1))  # [B, 1]
    unlimited = ((top_k <= 0) | (top_k >= vocab)).unsqueeze(1)
    keep = (logits >= cutoff) | unlimited
    scaled = logits / torch.where(sampled, temperature, torch.ones_like(temperature)).unsqueeze(1)
    scaled = scaled.masked_fill(~keep, float("-inf"))
    weights = torch.exp(scaled - scaled.amax(dim=-1, keepdim=True))
    cdf = torch.cumsum(weights, dim=-1)
    total = cdf[:, -1:]
    target = uniform.unsqueeze(1) * total
    # The first index whose cumulative weight exceeds the target; none does only when float32
    # rounding took the target to the total: then the last token with any weight (the first
    # maximum of the CDF), never a token top-k removed.
    first_above = torch.argmax((cdf > target).to(logits.dtype), dim=-1)
    drawn = torch.where((total > target).squeeze(1), first_above, torch.argmax(cdf, dim=-1))
    return torch.where(sampled, drawn, torch.argmax(logits, dim=-1))
