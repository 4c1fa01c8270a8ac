"""The one description of every stage and graph.

Exporters, compilers (TensorRT profiles, Neuron buckets), the Triton repository writer, runtimes
and benchmarks read these descriptions and nothing else about a graph's interface: names, dtypes,
named dynamic axes with min/opt/max ranges, a sample-input generator and validation tolerances.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from tandem.tokenizer import BOI, BOS, PAD

if TYPE_CHECKING:  # torch is imported only where modules are built (export, torch runtime), so a
    from tandem.config import ModelConfig  # annotations only (torch and numpy alone import this module)
    # Triton python-backend model that runs ONNX Runtime over these specs starts without it
    from torch import nn

    from tandem.models import Stages

MAX_BATCH = 8  # largest batch any exported graph is validated and profiled for
MAX_BLOCK = 32  # most tokens per row one verify step takes (capped at the grid's token count)
VERIFY_GRAPH = "reasoning_verify"
# The prefill and decode graphs sample in the graph (tandem.models.reasoning.sample_tokens): per-row
# inputs, in this order after the graph's own, and the chosen tokens as their first output.
SAMPLING_INPUTS = ("temperature", "top_k", "uniform")
SAMPLING_DTYPES = {"temperature": "float32", "top_k": "int64", "uniform": "float32"}
NEXT_TOKENS = "next_token_ids"


@dataclass(frozen=True)
class DimRange:
    """A dynamic axis: the smallest, the typical (TensorRT's 'opt') and the largest size."""

    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str, ...]  # a str names a dynamic axis

    def concrete_shape(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(dims[d] if isinstance(d, str) else d for d in self.shape)

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph of a stage."""

    name: str  # file stem and runtime key, e.g. "reasoning_decode"
    stage: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, DimRange]
    make_module: Callable[[Stages], nn.Module]  # forward(*inputs in order) -> outputs in order
    make_inputs: Callable[[dict[str, int], np.random.Generator], dict[str, np.ndarray]]
    atol: float
    rtol: float
    export_dims: dict[str, int] = field(default_factory=dict)  # sizes traced at export (never 0 or 1)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes() for t in (*self.inputs, *self.outputs) if t.dynamic_axes()}

    def profile(self, which: str) -> dict[str, tuple[int, ...]]:
        """Concrete input shapes at the min, opt or max end of every dynamic axis (TensorRT profiles,
        Neuron buckets)."""
        dims = {name: getattr(r, which) for name, r in self.dims.items()}
        return {t.name: t.concrete_shape(dims) for t in self.inputs}

    def sample_inputs(self, dims: dict[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        resolved = {name: r.opt for name, r in self.dims.items()}
        resolved.update(dims or {})
        for name, size in resolved.items():
            r = self.dims[name]
            if not r.min <= size <= r.max:
                raise ValueError(f"{self.name}: {name}={size} is outside [{r.min}, {r.max}]")
        return self.make_inputs(resolved, np.random.default_rng(seed))


@dataclass(frozen=True)
class StageSpec:
    name: str
    graphs: tuple[GraphSpec, ...]

    def graph(self, name: str) -> GraphSpec:
        for g in self.graphs:
            if g.name == name:
                return g
        raise KeyError(f"stage {self.name} has no graph {name!r}; it has {[g.name for g in self.graphs]}")


def interleave(keys, values) -> list:
    """[k0, k1, ...], [v0, v1, ...] -> [k0, v0, k1, v1, ...]: the order cache tensors take in every
    graph's inputs and outputs."""
    return [t for pair in zip(keys, values) for t in pair]


@dataclass(frozen=True)
class CacheLayout:
    """The reasoning stage's KV cache as every graph, runtime and the bench see it: per layer one
    key and one value tensor [batch, n_heads, max_len, head_dim] (separate tensors, so no graph
    slices, i.e. copies, a larger one). The decode graph reads them as ``past_key_{l}`` /
    ``past_value_{l}`` and returns only this step's rows as ``new_key_{l}`` / ``new_value_{l}``
    [batch, n_heads, 1, head_dim]; prefill returns ``present_key_{l}`` / ``present_value_{l}``
    [batch, n_heads, prompt_len, head_dim]. The caller (tandem.decoding) owns the buffers and
    writes returned rows in place."""

    n_layers: int
    n_heads: int
    max_len: int
    head_dim: int
    dtype: str = "float32"

    def names(self, role: str) -> list[str]:
        """``role`` is "past", "new" or "present"; keys and values interleaved per layer."""
        if role not in ("past", "new", "present"):
            raise ValueError(f"cache role must be past, new or present, not {role!r}")
        return [f"{role}_{kind}_{layer}" for layer in range(self.n_layers) for kind in ("key", "value")]

    def shape(self, batch: int | str, length: int | str | None = None) -> tuple[int | str, ...]:
        return (batch, self.n_heads, self.max_len if length is None else length, self.head_dim)

    def specs(self, role: str, length: int | str | None = None) -> tuple[TensorSpec, ...]:
        """``length`` overrides the role's position axis (the verify graph's new rows: "block")."""
        length = length if length is not None else {"past": None, "new": 1, "present": "prompt_len"}[role]
        return tuple(TensorSpec(n, self.dtype, self.shape("batch", length)) for n in self.names(role))

    @property
    def bytes_per_position(self) -> int:
        """Key and value bytes of one row at one position, all layers."""
        return 2 * self.n_layers * self.n_heads * self.head_dim * np.dtype(self.dtype).itemsize


def cache_layout(config: ModelConfig) -> CacheLayout:
    r = config.reasoning
    return CacheLayout(r.n_layers, r.n_heads, config.max_len, r.head_dim)


@functools.cache
def _module_classes() -> dict[str, type]:
    """The graphs' nn.Module wrappers, defined on first use (see the torch import note above)."""
    import torch
    from torch import nn

    from tandem.models.reasoning import sample_tokens

    class Prefill(nn.Module):
        """forward(input_ids, prompt_lengths, temperature, top_k, uniform) -> (next_token_ids,
        logits, present_key_0, present_value_0, ...)."""

        def __init__(self, stages: Stages):
            super().__init__()
            self.model = stages.reasoning

        def forward(self, input_ids, prompt_lengths, temperature, top_k, uniform):
            logits, keys, values = self.model.prefill(input_ids, prompt_lengths)
            return sample_tokens(logits, temperature, top_k, uniform), logits, *interleave(keys, values)

    class Decode(nn.Module):
        """forward(token_ids, positions, temperature, top_k, uniform, past_key_0, past_value_0,
        past_key_1, ...) -> (next_token_ids, logits, new_key_0, new_value_0, ...), as the decode
        graph's spec lists them."""

        def __init__(self, stages: Stages):
            super().__init__()
            self.model = stages.reasoning

        def forward(self, token_ids, positions, temperature, top_k, uniform, *cache: torch.Tensor):
            logits, keys, values = self.model.decode_step(token_ids, positions, cache[0::2], cache[1::2])
            return sample_tokens(logits, temperature, top_k, uniform), logits, *interleave(keys, values)

    class Verify(nn.Module):
        """forward(token_ids [B, k], start_positions [B], past_key_0, past_value_0, ...) ->
        (logits [B, k, V], new_key_0, new_value_0, ...) with new rows [B, H, k, Dh]."""

        def __init__(self, stages: Stages):
            super().__init__()
            self.model = stages.reasoning

        def forward(self, token_ids: torch.Tensor, start_positions: torch.Tensor, *cache: torch.Tensor):
            logits, keys, values = self.model.verify_step(token_ids, start_positions, cache[0::2], cache[1::2])
            return logits, *interleave(keys, values)

    class Refine(nn.Module):
        def __init__(self, stages: Stages):
            super().__init__()
            self.model = stages.refinement

        def forward(self, scene_tokens: torch.Tensor):
            return self.model(scene_tokens)

    return {"prefill": Prefill, "decode": Decode, "verify": Verify, "refine": Refine}


def _Prefill(stages: Stages) -> nn.Module:
    return _module_classes()["prefill"](stages)


def _Decode(stages: Stages) -> nn.Module:
    return _module_classes()["decode"](stages)


def _Verify(stages: Stages) -> nn.Module:
    return _module_classes()["verify"](stages)


def _Refine(stages: Stages) -> nn.Module:
    return _module_classes()["refine"](stages)


def stage_specs(config: ModelConfig) -> tuple[StageSpec, StageSpec]:
    r, s = config.reasoning, config.scene
    cache = cache_layout(config)
    batch = DimRange(1, 1, MAX_BATCH)
    prompt = DimRange(3, min(32, r.max_prompt_len), r.max_prompt_len)
    max_block = min(MAX_BLOCK, s.num_tokens)

    def sampling_inputs(b: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Row 0 greedy, the others sampled at assorted temperatures and top-k limits (none, a few,
        the whole codebook)."""
        temperature = rng.uniform(0.5, 1.5, size=b).astype(np.float32)
        temperature[0] = 0.0
        top_k = rng.choice(np.array([0, 1, 5, s.codebook_size], dtype=np.int64), size=b)
        return {"temperature": temperature, "top_k": top_k, "uniform": rng.random(b).astype(np.float32)}

    def sampling_specs() -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(name, SAMPLING_DTYPES[name], ("batch",)) for name in SAMPLING_INPUTS)

    def prefill_inputs(dims: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        b, p = dims["batch"], dims["prompt_len"]
        lengths = rng.integers(3, p + 1, size=b)
        lengths[0] = p  # the longest prompt sets the padded width
        ids = np.full((b, p), PAD, dtype=np.int64)
        for row, n in enumerate(lengths):
            ids[row, 0], ids[row, n - 1] = BOS, BOI
            ids[row, 1 : n - 1] = rng.integers(32, 127, size=n - 2)  # printable ASCII
        return {"input_ids": ids, "prompt_lengths": lengths.astype(np.int64), **sampling_inputs(b, rng)}

    def decode_inputs(dims: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        b = dims["batch"]
        feeds = {
            "token_ids": rng.integers(0, s.codebook_size, size=b).astype(np.int64),
            "positions": rng.integers(3, config.max_len, size=b).astype(np.int64),
            **sampling_inputs(b, rng),
        }
        for name in cache.names("past"):  # random beyond each row's position too: it must be ignored
            feeds[name] = rng.standard_normal(cache.shape(b)).astype(np.float32)
        return feeds

    def verify_inputs(dims: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        b, k = dims["batch"], dims["block"]
        feeds = {
            "token_ids": rng.integers(0, s.codebook_size, size=(b, k)).astype(np.int64),
            "start_positions": rng.integers(3, config.max_len - k + 1, size=b).astype(np.int64),
        }
        for name in cache.names("past"):  # random at and beyond each row's start too: it must be ignored
            feeds[name] = rng.standard_normal(cache.shape(b)).astype(np.float32)
        return feeds

    def refine_inputs(dims: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        shape = (dims["batch"], s.grid_height, s.grid_width)
        return {"scene_tokens": rng.integers(0, s.codebook_size, size=shape).astype(np.int64)}

    reasoning = StageSpec(
        "reasoning",
        (
            GraphSpec(
                name="reasoning_prefill",
                stage="reasoning",
                inputs=(
                    TensorSpec("input_ids", "int64", ("batch", "prompt_len")),
                    TensorSpec("prompt_lengths", "int64", ("batch",)),
                    *sampling_specs(),
                ),
                outputs=(
                    TensorSpec(NEXT_TOKENS, "int64", ("batch",)),
                    TensorSpec("logits", "float32", ("batch", s.codebook_size)),
                    *cache.specs("present"),
                ),
                dims={"batch": batch, "prompt_len": prompt},
                make_module=_Prefill,
                make_inputs=prefill_inputs,
                atol=1e-4,
                rtol=1e-3,
                export_dims={"batch": 2, "prompt_len": min(16, r.max_prompt_len)},
            ),
            GraphSpec(
                name="reasoning_decode",
                stage="reasoning",
                inputs=(
                    TensorSpec("token_ids", "int64", ("batch",)),
                    TensorSpec("positions", "int64", ("batch",)),
                    *sampling_specs(),
                    *cache.specs("past"),
                ),
                outputs=(
                    TensorSpec(NEXT_TOKENS, "int64", ("batch",)),
                    TensorSpec("logits", "float32", ("batch", s.codebook_size)),
                    *cache.specs("new"),
                ),
                dims={"batch": batch},
                make_module=_Decode,
                make_inputs=decode_inputs,
                atol=1e-4,
                rtol=1e-3,
                export_dims={"batch": 2},
            ),
            GraphSpec(
                # k tokens per row in one step (parallel decoding, draft verification): token i
                # sits at start + i and sees the cache's [0, start) and the block's tokens [0, i].
                name=VERIFY_GRAPH,
                stage="reasoning",
                inputs=(
                    TensorSpec("token_ids", "int64", ("batch", "block")),
                    TensorSpec("start_positions", "int64", ("batch",)),
                    *cache.specs("past"),
                ),
                outputs=(
                    TensorSpec("logits", "float32", ("batch", "block", s.codebook_size)),
                    *cache.specs("new", length="block"),
                ),
                dims={"batch": batch, "block": DimRange(2, min(8, max_block), max_block)},
                make_module=_Verify,
                make_inputs=verify_inputs,
                atol=1e-4,
                rtol=1e-3,
                export_dims={"batch": 2, "block": min(4, max_block)},
            ),
        ),
    )
    refinement = StageSpec(
        "refinement",
        (
            GraphSpec(
                name="refinement",
                stage="refinement",
                inputs=(TensorSpec("scene_tokens", "int64", ("batch", s.grid_height, s.grid_width)),),
                outputs=(TensorSpec("image", "float32", ("batch", 3, config.image_height, config.image_width)),),
                dims={"batch": batch},
                make_module=_Refine,
                make_inputs=refine_inputs,
                atol=1e-4,
                rtol=1e-3,
                export_dims={"batch": 2},
            ),
        ),
    )
    return reasoning, refinement


def graph_specs(config: ModelConfig) -> dict[str, GraphSpec]:
    return {g.name: g for stage in stage_specs(config) for g in stage.graphs}
