"""Decode engines: a KV cache that lives as long as the engine, and the graphs that read it.

The reasoning graphs never rebuild the cache (see :class:`tandem.stages.CacheLayout`): prefill
returns the prompt's keys/values and each decode step returns only its own row per layer. An engine
owns one buffer per cache tensor, ``capacity`` slots wide, allocated once; it writes what the graphs
return into those buffers in place and hands the graphs the buffers themselves (rows ``[0, n)``,
a contiguous prefix, so no slot compaction ever needs a copy on the way in).

- ONNX Runtime: the buffers, the step's token/position inputs and its outputs are bound once per
  batch size with IO binding over the same numpy memory, so a step copies nothing but the rows it
  writes (:class:`OrtDecodeEngine`).
- PyTorch eager: the same buffers as torch tensors, rows written with ``index_copy_``
  (:class:`TorchDecodeEngine`), so comparisons against the reference are like for like.
- Any other runtime (TensorRT, Neuron, AOTInductor): :class:`CacheDecodeEngine` passes the buffers
  to ``Runtime.run``; a runtime with device memory may override ``Runtime.decode_engine``.

``verify`` runs k tokens per row in one step (the ``reasoning_verify`` graph, parallel decoding in
:mod:`tandem.parallel`) and writes k rows per slot; eager PyTorch and ONNX Runtime (IO binding) run
it in place, any other runtime through ``run`` when it loaded the graph.

Occupied slots are kept compacted at the front (``move`` fills a hole left by a finished row), so
a step over ``n`` rows always reads slots ``[0, n)``.

**The decode loop** (one, for :class:`tandem.pipeline.Pipeline`, the in-flight scheduler and the
benchmarks that drive them), in the style of vLLM v1: a planner decides which rows leave and which
join (:class:`StepPlan`; :class:`tandem.scheduler.InflightScheduler` is the planner, and
``Pipeline.generate_tokens`` submits all its rows to one), and :class:`ModelRunner` executes the
plan over an engine: frees the leaving rows' slots, pads and prefills the joining prompts into free
slots (a failed batched prefill is retried row by row), samples, runs one decode step over every
occupied row and reports the rows that are done (:class:`StepOutput`). Sampling, padding, the
prefill-into-slots, cache writes and each row's bookkeeping (:class:`Row`) live only here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from tandem.errors import TandemError
from tandem.config import ModelConfig
from tandem.sampling import SamplingParams, select_next
from tandem.stages import VERIFY_GRAPH, CacheLayout, GraphSpec, cache_layout
from tandem.tokenizer import PAD

if TYPE_CHECKING:
    import torch

PREFILL, DECODE = "reasoning_prefill", "reasoning_decode"
VERIFY = VERIFY_GRAPH  # k tokens per row in one step (tandem.parallel)

log = logging.getLogger(__name__)


class GraphRunner(Protocol):
    """What an engine needs of a runtime (:class:`tandem.runtimes.base.Runtime` is one): the stage
    description it was built for and ``run(graph, feeds) -> outputs``."""

    config: ModelConfig
    specs: dict[str, GraphSpec]

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def decode_engine(self, capacity: int) -> DecodeEngine: ...


class DecodeEngine(Protocol):
    """A KV cache of ``capacity`` slots (allocated once, at a fixed address) plus the graphs that
    read it. Occupied slots are always kept compacted at the front: rows [0, n)."""

    capacity: int  # number of slots (<= the decode graph's max batch)
    vocab: int  # logits width (scene codebook size)

    def prefill(self, slots: Sequence[int], input_ids: np.ndarray, prompt_lengths: np.ndarray) -> np.ndarray:
        """Right-padded prompts [len(slots), P] -> logits [len(slots), V] of each prompt's last real
        token; writes those slots' cache rows at positions [0, P). Other slots are untouched."""
        ...

    def step(self, n: int, token_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One decode step over slots [0, n): token_ids [n] int64, positions [n] int64 (per row).
        Writes each row's new key/value at positions[i] into its slot; returns logits [n, V] float32."""
        ...

    def move(self, src: int, dst: int) -> None:
        """Copy slot src's whole cache row into slot dst (compaction when a row leaves)."""
        ...


def make_decode_engine(runtime: GraphRunner, capacity: int) -> DecodeEngine:
    """The fastest engine ``runtime`` offers (see :meth:`tandem.runtimes.base.Runtime.decode_engine`)."""
    return runtime.decode_engine(capacity)


def max_capacity(runtime: GraphRunner) -> int:
    """The largest batch the decode graph was exported, validated and compiled for."""
    return runtime.specs[DECODE].dims["batch"].max


class CacheDecodeEngine:
    """Numpy cache buffers, graphs run through ``Runtime.run`` (any runtime). Subclasses change how
    a step is run and how rows are written, never the cache's layout or the engine's contract."""

    def __init__(self, runtime: GraphRunner, capacity: int):
        limit = max_capacity(runtime)
        if not 1 <= capacity <= limit:
            raise TandemError(
                f"a decode engine holds 1 to {limit} rows (the decode graph's batch range), not {capacity}; "
                "split the prompts into batches of at most that many"
            )
        self.runtime = runtime
        self.capacity = capacity
        self.vocab = runtime.config.scene.codebook_size
        self.layout: CacheLayout = cache_layout(runtime.config)
        self.past_names = self.layout.names("past")
        self.new_names = self.layout.names("new")
        self.present_names = self.layout.names("present")
        self._allocate()

    def _allocate(self) -> None:
        # Zeros, not empty: slots beyond a row's position are masked, but must never hold NaN/inf.
        self.cache: dict[str, np.ndarray] = {
            name: np.zeros(self.layout.shape(self.capacity), dtype=self.layout.dtype) for name in self.past_names
        }

    def load_cache(self, name: str, values: np.ndarray) -> None:
        """Overwrite a whole cache buffer (benchmarks start a step from a given cache)."""
        self.cache[name][:] = values

    # -- the DecodeEngine contract -----------------------------------------------------------
    def prefill(self, slots: Sequence[int], input_ids: np.ndarray, prompt_lengths: np.ndarray) -> np.ndarray:
        slots = self._check_slots(slots)
        input_ids, prompt_lengths = np.asarray(input_ids, np.int64), np.asarray(prompt_lengths, np.int64)
        if input_ids.ndim != 2 or input_ids.shape[0] != len(slots) or prompt_lengths.shape != (len(slots),):
            raise TandemError(
                f"prefill takes input_ids [{len(slots)}, P] and prompt_lengths [{len(slots)}] for {len(slots)} "
                f"slots, got {list(input_ids.shape)} and {list(prompt_lengths.shape)}"
            )
        out = self.runtime.run(PREFILL, {"input_ids": input_ids, "prompt_lengths": prompt_lengths})
        length = input_ids.shape[1]
        for past, present in zip(self.past_names, self.present_names):
            self._write_prefix(past, slots, out[present], length)
        return np.asarray(out["logits"], dtype=np.float32)

    def step(self, n: int, token_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        if not 1 <= n <= self.capacity:
            raise TandemError(f"a step covers 1 to {self.capacity} rows (this engine's capacity), not {n}")
        token_ids, positions = np.asarray(token_ids, np.int64), np.asarray(positions, np.int64)
        if token_ids.shape != (n,) or positions.shape != (n,):
            raise TandemError(f"step({n}) takes token_ids [{n}] and positions [{n}], got {token_ids.shape} and {positions.shape}")
        if positions.min() < 1 or positions.max() >= self.layout.max_len:
            raise TandemError(f"decode positions must lie in [1, {self.layout.max_len}), got {positions.tolist()}")
        logits, new_rows = self._run_step(n, token_ids, positions)
        for past, new in zip(self.past_names, self.new_names):
            self._write_rows(past, n, positions, new_rows[new])
        return logits

    def move(self, src: int, dst: int) -> None:
        for slot in (src, dst):
            self._check_slots([slot])
        if src != dst:
            for buffer in self.cache.values():
                buffer[dst] = buffer[src]

    def verify(self, n: int, token_ids: np.ndarray, start_positions: np.ndarray) -> np.ndarray:
        """k tokens per row over slots [0, n) in one step (the verify graph): token_ids [n, k] int64
        at positions start_positions[i] + [0, k). Writes each row's k new keys/values at those
        positions into its slot and returns logits [n, k, V] float32 (logits[i, j]: the next token
        after token j). Rows the caller does not keep need no rollback: every step reads a row's
        cache only below its own start, so rows at and past it are overwritten before being read.
        k = 1 runs the decode graph (:meth:`step`)."""
        token_ids, start_positions = np.asarray(token_ids, np.int64), np.asarray(start_positions, np.int64)
        if not 1 <= n <= self.capacity:
            raise TandemError(f"a step covers 1 to {self.capacity} rows (this engine's capacity), not {n}")
        if token_ids.ndim != 2 or token_ids.shape[0] != n or start_positions.shape != (n,):
            raise TandemError(
                f"verify({n}) takes token_ids [{n}, k] and start_positions [{n}], got {token_ids.shape} and {start_positions.shape}"
            )
        k = token_ids.shape[1]
        if k == 1:
            return self.step(n, token_ids[:, 0], start_positions)[:, None, :]
        limit = self.runtime.specs[VERIFY].dims["block"]
        if not limit.min <= k <= limit.max:
            raise TandemError(f"a verify step takes 1 or {limit.min} to {limit.max} tokens per row (the verify graph's block range), not {k}")
        if start_positions.min() < 1 or start_positions.max() + k > self.layout.max_len:
            raise TandemError(
                f"verify positions must lie in [1, {self.layout.max_len}): start_positions + {k} tokens, got starts {start_positions.tolist()}"
            )
        logits, new_rows = self._run_verify(n, token_ids, start_positions)
        for past, new in zip(self.past_names, self.new_names):
            self._write_block(past, n, start_positions, new_rows[new])
        return logits

    # -- what subclasses change ---------------------------------------------------------------
    def _run_verify(self, n: int, token_ids: np.ndarray, start_positions: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        feeds = {"token_ids": token_ids, "start_positions": start_positions}
        feeds.update({name: buffer[:n] for name, buffer in self.cache.items()})  # views: no copy
        out = self.runtime.run(VERIFY, feeds)
        return np.asarray(out["logits"], dtype=np.float32), {name: out[name] for name in self.new_names}

    def _write_block(self, past: str, n: int, start_positions: np.ndarray, rows: np.ndarray) -> None:
        """rows [n, H, k, Dh] -> cache[i, :, start_positions[i] + [0, k), :] for i < n."""
        k = rows.shape[2]
        for i, start in enumerate(start_positions.tolist()):
            self.cache[past][i, :, start : start + k, :] = rows[i]

    def _run_step(self, n: int, token_ids: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        feeds = {"token_ids": token_ids, "positions": positions}
        feeds.update({name: buffer[:n] for name, buffer in self.cache.items()})  # views: no copy
        out = self.runtime.run(DECODE, feeds)
        return np.asarray(out["logits"], dtype=np.float32), {name: out[name] for name in self.new_names}

    def _write_rows(self, past: str, n: int, positions: np.ndarray, rows: np.ndarray) -> None:
        """rows [n, H, 1, Dh] -> cache[i, :, positions[i], :] for i < n."""
        self.cache[past][np.arange(n), :, positions, :] = rows[:, :, 0, :]

    def _write_prefix(self, past: str, slots: np.ndarray, present: np.ndarray, length: int) -> None:
        self.cache[past][slots, :, :length, :] = present

    def _check_slots(self, slots: Sequence[int]) -> np.ndarray:
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        if slots.size == 0 or slots.min() < 0 or slots.max() >= self.capacity:
            raise TandemError(f"slots must lie in [0, {self.capacity}) (this engine's capacity), got {slots.tolist()}")
        if len(set(slots.tolist())) != slots.size:
            raise TandemError(f"slots must be distinct, got {slots.tolist()}")
        return slots


class TorchDecodeEngine(CacheDecodeEngine):
    """The cache as torch tensors on the runtime's device (a fixed address for the engine's life:
    CUDA-graph friendly), rows written in place with ``index_copy_``, graphs run through
    ``runtime.run_tensors(graph, tensors) -> tensors`` (PyTorch eager, AOTInductor, TensorRT), so
    the cache never leaves the device. On the CPU the tensors share the numpy buffers in ``cache``."""

    def __init__(self, runtime, capacity: int, device: str | torch.device = "cpu"):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        super().__init__(runtime, capacity)
        heads, max_len = self.layout.n_heads, self.layout.max_len
        # Flat row of (slot, head, position) in a [capacity * heads * max_len, head_dim] view.
        self._head_offsets = torch.arange(heads, device=self.device).view(1, heads) * max_len
        self._slot_stride = heads * max_len
        self._token_ids = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        self._positions = torch.ones(capacity, dtype=torch.int64, device=self.device)

    def _allocate(self) -> None:
        torch = self.torch
        shape, dtype = self.layout.shape(self.capacity), getattr(torch, self.layout.dtype)
        self.tensors = {name: torch.zeros(shape, dtype=dtype, device=self.device) for name in self.past_names}
        # Host views of the same memory on the CPU (inspection, tests); none for device memory.
        self.cache = {n: t.numpy() for n, t in self.tensors.items()} if self.device.type == "cpu" else {}

    def load_cache(self, name: str, values: np.ndarray) -> None:
        self.tensors[name].copy_(self.torch.from_numpy(np.ascontiguousarray(values)))

    def move(self, src: int, dst: int) -> None:
        for slot in (src, dst):
            self._check_slots([slot])
        if src != dst:
            for tensor in self.tensors.values():
                tensor[dst].copy_(tensor[src])

    def _run_step(self, n, token_ids, positions):
        self._token_ids[:n].copy_(self.torch.from_numpy(token_ids))
        self._positions[:n].copy_(self.torch.from_numpy(positions))
        inputs = [self._token_ids[:n], self._positions[:n], *(self.tensors[name][:n] for name in self.past_names)]
        outputs = self.runtime.run_tensors(DECODE, inputs)
        logits = outputs[0].float().cpu().numpy()
        return logits, dict(zip(self.new_names, outputs[1:]))

    def _write_rows(self, past, n, positions, rows):
        torch = self.torch
        positions = self._positions[:n]  # already on the device
        index = (torch.arange(n, device=self.device).view(n, 1) * self._slot_stride + self._head_offsets + positions.view(n, 1)).view(-1)
        flat = self.tensors[past].view(-1, self.layout.head_dim)
        with torch.inference_mode():
            flat.index_copy_(0, index, rows.reshape(-1, self.layout.head_dim).to(flat.dtype))

    def _run_verify(self, n, token_ids, start_positions):
        torch = self.torch
        tokens = torch.from_numpy(np.ascontiguousarray(token_ids)).to(self.device)
        self._positions[:n].copy_(torch.from_numpy(start_positions))
        inputs = [tokens, self._positions[:n], *(self.tensors[name][:n] for name in self.past_names)]
        outputs = self.runtime.run_tensors(VERIFY, inputs)
        return outputs[0].float().cpu().numpy(), dict(zip(self.new_names, outputs[1:]))

    def _write_block(self, past, n, start_positions, rows):
        torch = self.torch
        k = rows.shape[2]
        starts = self._positions[:n].view(n, 1, 1)  # set by _run_verify, already on the device
        offsets = torch.arange(k, device=self.device).view(1, 1, k)
        slots = torch.arange(n, device=self.device).view(n, 1, 1) * self._slot_stride
        index = (slots + self._head_offsets.view(1, -1, 1) + starts + offsets).view(-1)  # [n, H, k] flat rows
        flat = self.tensors[past].view(-1, self.layout.head_dim)
        with torch.inference_mode():
            flat.index_copy_(0, index, rows.reshape(-1, self.layout.head_dim).to(flat.dtype))

    def _write_prefix(self, past, slots, present, length):
        slots_t = self.torch.from_numpy(slots).to(self.device)
        target = self.tensors[past][:, :, :length]
        with self.torch.inference_mode():
            target.index_copy_(0, slots_t, self.torch.from_numpy(np.ascontiguousarray(present)).to(self.device, target.dtype))


class OrtDecodeEngine(CacheDecodeEngine):
    """ONNX Runtime: the cache buffers, the step's inputs and its outputs bound with IO binding over
    fixed numpy memory, once per batch size; a step is ``run_with_iobinding`` plus the row writes."""

    def __init__(self, runtime, capacity: int):
        super().__init__(runtime, capacity)
        if DECODE not in runtime.sessions:
            raise TandemError(f"the ONNX Runtime session for {DECODE} was not loaded; load it to decode")
        self.session = runtime.sessions[DECODE]
        spec = runtime.specs[DECODE]
        self.inputs: dict[str, np.ndarray] = {
            "token_ids": np.zeros(capacity, np.int64),
            "positions": np.ones(capacity, np.int64),
            **self.cache,
        }
        self.outputs: dict[str, np.ndarray] = {
            t.name: np.zeros(t.concrete_shape({"batch": capacity}), dtype=t.dtype) for t in spec.outputs
        }
        self.bindings: dict[int, object] = {}

    def _binding(self, n: int):
        """Rows [0, n) of every buffer are its first n rows: the same address for every n."""
        if n not in self.bindings:
            binding = self.session.io_binding()
            for name, buffer in self.inputs.items():
                binding.bind_input(name, "cpu", 0, buffer.dtype, [n, *buffer.shape[1:]], buffer.ctypes.data)
            for name, buffer in self.outputs.items():
                binding.bind_output(name, "cpu", 0, buffer.dtype, [n, *buffer.shape[1:]], buffer.ctypes.data)
            self.bindings[n] = binding
        return self.bindings[n]

    def _verify_binding(self, n: int, k: int):
        """The verify graph bound like the decode graph: the same cache buffers, and its own
        inputs and outputs over flat buffers sized for the largest block (rows [0, n * k) of each
        are a contiguous [n, k, ...] prefix), once per (n, k)."""
        if VERIFY not in self.runtime.sessions:
            raise TandemError(
                f"{self.runtime.artifacts} has no {VERIFY} graph (exported before parallel decoding existed, or not "
                "loaded); export again to decode several tokens per step"
            )
        if not hasattr(self, "verify_bindings"):
            spec = self.runtime.specs[VERIFY]
            dims = {"batch": self.capacity, "block": spec.dims["block"].max}
            self.verify_session = self.runtime.sessions[VERIFY]
            self.verify_inputs = {
                "token_ids": np.zeros(self.capacity * dims["block"], np.int64),
                "start_positions": np.ones(self.capacity, np.int64),
            }
            self.verify_outputs = {t.name: np.zeros(int(np.prod(t.concrete_shape(dims))), t.dtype) for t in spec.outputs}
            self.verify_shapes = {t.name: t.shape for t in (*spec.inputs, *spec.outputs)}
            self.verify_bindings: dict[tuple[int, int], object] = {}
        if (n, k) not in self.verify_bindings:
            binding = self.verify_session.io_binding()
            dims = {"batch": n, "block": k}
            for name, buffer in (*self.verify_inputs.items(), *self.cache.items()):
                shape = [dims[d] if isinstance(d, str) else d for d in self.verify_shapes[name]]
                binding.bind_input(name, "cpu", 0, buffer.dtype, shape, buffer.ctypes.data)
            for name, buffer in self.verify_outputs.items():
                shape = [dims[d] if isinstance(d, str) else d for d in self.verify_shapes[name]]
                binding.bind_output(name, "cpu", 0, buffer.dtype, shape, buffer.ctypes.data)
            self.verify_bindings[(n, k)] = binding
        return self.verify_bindings[(n, k)]

    def _run_verify(self, n, token_ids, start_positions):
        k = token_ids.shape[1]
        binding = self._verify_binding(n, k)
        self.verify_inputs["token_ids"][: n * k] = token_ids.reshape(-1)
        self.verify_inputs["start_positions"][:n] = start_positions
        self.verify_session.run_with_iobinding(binding)
        vocab, heads, dim = self.vocab, self.layout.n_heads, self.layout.head_dim
        logits = self.verify_outputs["logits"][: n * k * vocab].reshape(n, k, vocab).copy()
        rows = {name: self.verify_outputs[name][: n * heads * k * dim].reshape(n, heads, k, dim) for name in self.new_names}
        return logits, rows

    def _run_step(self, n, token_ids, positions):
        self.inputs["token_ids"][:n] = token_ids
        self.inputs["positions"][:n] = positions
        self.session.run_with_iobinding(self._binding(n))
        return self.outputs["logits"][:n].copy(), {name: self.outputs[name][:n] for name in self.new_names}


# -- the decode loop: a plan per step, one runner executing it -----------------------------------


@dataclass
class Timing:
    """Clock readings (``time.monotonic`` by default) of one row's life: ``arrival`` and ``finished``
    are the planner's, ``prefill_start`` and ``first_step`` the runner's."""

    arrival: float
    prefill_start: float | None = None
    first_step: float | None = None  # start of the first decode step the row took part in
    finished: float | None = None

    def seconds(self) -> np.ndarray:
        """[queue, time to first decode step, total] in seconds since arrival (NaN: never reached)."""
        marks = (self.prefill_start, self.first_step, self.finished)
        return np.array([np.nan if m is None else m - self.arrival for m in marks], dtype=np.float64)


@dataclass(eq=False)
class Row:
    """One prompt's generation: its prompt ids (unpadded), its sampling settings and seeded generator,
    the tokens so far. Made by a planner, advanced only by :class:`ModelRunner`; ``owner`` is the
    planner's (the scheduler's :class:`~tandem.scheduler.Job`).

    The sequence is ``input_ids + tokens[:count]``; every token but the last sampled one is in the
    cache, so the next step feeds :meth:`pending` at :attr:`position`. A step that advances a row by
    k tokens (a multi-token graph) feeds more tokens from the same position and :meth:`accept`s
    however many it keeps: nothing else here assumes one token per step."""

    input_ids: Sequence[int]
    params: SamplingParams
    num_tokens: int
    timing: Timing = field(default_factory=lambda: Timing(arrival=float("nan")))
    owner: object = None
    rng: np.random.Generator = field(init=False, repr=False)
    tokens: np.ndarray = field(init=False, repr=False)  # [num_tokens] int64 scene codebook ids
    count: int = field(init=False, default=0)  # tokens sampled so far

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise TandemError(f"num_tokens must be >= 1, got {self.num_tokens}")
        self.rng = self.params.generator()
        self.tokens = np.empty(self.num_tokens, dtype=np.int64)

    @property
    def prompt_len(self) -> int:
        return len(self.input_ids)

    @property
    def position(self) -> int:
        """Where the next decode step writes this row's key/value (the last sampled token's place)."""
        return self.prompt_len + self.count - 1

    @property
    def done(self) -> bool:
        return self.count >= self.num_tokens

    def pending(self) -> np.ndarray:
        """The sampled tokens not yet in the cache: the next step's input for this row."""
        return self.tokens[self.count - 1 : self.count]

    def accept(self, tokens: np.ndarray) -> None:
        """Append sampled tokens (any number; beyond ``num_tokens`` they are dropped)."""
        take = min(len(tokens), self.num_tokens - self.count)
        self.tokens[self.count : self.count + take] = tokens[:take]
        self.count += take


@dataclass
class StepPlan:
    """What one step does, decided by the planner: ``leave`` (occupied rows to drop first, e.g.
    cancelled), then ``join`` (new rows, prefilled together into free slots, in order); every
    occupied row then takes the decode step."""

    leave: list[Row] = field(default_factory=list)
    join: list[Row] = field(default_factory=list)


@dataclass
class StepOutput:
    """What one :meth:`ModelRunner.execute` did."""

    finished: list[Row] = field(default_factory=list)  # all their tokens; their slots are free again
    refused: list[tuple[Row, BaseException]] = field(default_factory=list)  # joins whose prefill failed (no slot taken)
    prefills: int = 0  # prefill calls that succeeded
    stepped: int = 0  # rows in the decode step (0: none ran)
    mixed: bool = False  # the step's rows were at different token counts (rows joined mid-generation)


class ModelRunner:
    """Executes :class:`StepPlan` objects over ``engine``: the one implementation of a generation step.
    ``rows[i]`` occupies engine slot ``i`` (compacted: a leaving row's hole is filled by the last
    row). ``on_sampled(rows)`` (optional) is called after each sampling with the rows that got
    tokens. Only one thread may call :meth:`execute`."""

    def __init__(
        self,
        engine: DecodeEngine,
        clock: Callable[[], float] = time.monotonic,
        on_sampled: Callable[[list[Row]], None] | None = None,
    ):
        self.engine = engine
        self.capacity = engine.capacity
        self.clock = clock
        self.on_sampled = on_sampled
        self.rows: list[Row] = []

    @property
    def free(self) -> int:
        return self.capacity - len(self.rows)

    def execute(self, plan: StepPlan, out: StepOutput | None = None) -> StepOutput:
        """Leave, join (prefill + first tokens), one decode step, retire: see :class:`StepPlan`.
        ``out`` (optional) is filled as the step goes, so a caller still sees what a step that
        raised had done (rows refused or finished before the failure)."""
        out = StepOutput() if out is None else out
        for row in plan.leave:
            self._release(row)
        if len(plan.join) > self.free:
            raise TandemError(f"{len(plan.join)} rows cannot join: {self.free} of {self.capacity} slots are free")
        if plan.join:
            self._admit(plan.join, out)
            self._retire(out)
        if self.rows:
            self._decode(out)
            self._retire(out)
        return out

    def abort(self) -> list[Row]:
        """Forget every occupied row (their slots are free; the cache is simply overwritten later)."""
        rows, self.rows = self.rows, []
        return rows

    # -- the parts of a step -------------------------------------------------------------------
    def _release(self, row: Row) -> None:
        """Free ``row``'s slot by moving the last row into it (slots stay compacted)."""
        index = next((i for i, r in enumerate(self.rows) if r is row), None)
        if index is None:
            return  # not (or no longer) occupying a slot
        last = len(self.rows) - 1
        if index != last:
            self.engine.move(last, index)
            self.rows[index] = self.rows[last]
        self.rows.pop()

    def _admit(self, rows: list[Row], out: StepOutput) -> None:
        try:
            self._prefill(rows, out)
            return
        except Exception as exc:
            if len(rows) == 1:
                out.refused.append((rows[0], exc))
                return
            log.warning("a batched prefill of %d rows failed (%s); admitting them one at a time", len(rows), exc)
        for row in rows:
            try:
                self._prefill([row], out)
            except Exception as exc:
                out.refused.append((row, exc))

    def _prefill(self, rows: list[Row], out: StepOutput) -> None:
        """Right-pad the prompts to the longest of them (positions past it are never read), prefill
        them into the first free slots, sample each row's first token."""
        start = self.clock()
        lengths = np.array([row.prompt_len for row in rows], dtype=np.int64)
        input_ids = np.full((len(rows), int(lengths.max())), PAD, dtype=np.int64)
        for i, row in enumerate(rows):
            input_ids[i, : row.prompt_len] = row.input_ids
        first = len(self.rows)
        logits = self.engine.prefill(range(first, first + len(rows)), input_ids, lengths)
        out.prefills += 1
        for row in rows:
            row.timing.prefill_start = start
        self._sample(rows, logits)
        self.rows.extend(rows)

    def _decode(self, out: StepOutput) -> None:
        rows, n = self.rows, len(self.rows)
        token_ids = np.concatenate([row.pending() for row in rows]).astype(np.int64)
        positions = np.array([row.position for row in rows], dtype=np.int64)
        start = self.clock()
        for row in rows:
            if row.timing.first_step is None:
                row.timing.first_step = start
        logits = self.engine.step(n, token_ids, positions)
        out.stepped, out.mixed = n, len({row.count for row in rows}) > 1
        self._sample(rows, logits)

    def _sample(self, rows: list[Row], logits: np.ndarray) -> None:
        """logits [len(rows), V] -> one token per row, each row with its own settings and generator
        (host-side numpy, so every runtime samples identically)."""
        chosen = select_next(logits, [row.params for row in rows], [row.rng for row in rows])
        for i, row in enumerate(rows):
            row.accept(chosen[i : i + 1])
        if self.on_sampled is not None:
            self.on_sampled(list(rows))

    def _retire(self, out: StepOutput) -> None:
        for index in reversed(range(len(self.rows))):
            row = self.rows[index]
            if row.done:
                self._release(row)
                out.finished.append(row)


__all__ = [
    "CacheDecodeEngine",
    "DecodeEngine",
    "ModelRunner",
    "OrtDecodeEngine",
    "Row",
    "StepOutput",
    "StepPlan",
    "Timing",
    "TorchDecodeEngine",
    "make_decode_engine",
    "max_capacity",
]
