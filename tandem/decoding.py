"""Decode engines: a KV cache that lives as long as the engine, and the graphs that read it.

The reasoning graphs never rebuild the cache (see :class:`tandem.stages.CacheLayout`): prefill
returns the prompt's keys/values and each decode step returns only its own row per layer. An engine
owns one buffer per cache tensor, ``capacity`` slots wide, allocated once; it writes what the graphs
return into those buffers in place and hands the graphs the buffers themselves (rows ``[0, n)``,
a contiguous prefix, so no slot compaction ever needs a copy on the way in).

- ONNX Runtime: the buffers, the step's token/position/sampling inputs and its outputs are bound
  once per batch size with IO binding over the same numpy memory, the token input being the last
  step's token output, so a step is one runtime call that copies nothing but the rows it writes
  (:class:`OrtDecodeEngine`).
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
slots (a failed batched prefill is retried row by row), runs one decode step over every occupied
row and reports the rows that are done (:class:`StepOutput`). The graphs sample (each row's
temperature, top-k and a uniform drawn from its seeded generator go in, token ids come out; see
:mod:`tandem.sampling`). Padding, the prefill-into-slots, the sampling inputs, cache writes and each
row's bookkeeping (:class:`Row`) live only here.
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
from tandem.sampling import SamplingParams, draw_uniform
from tandem.stages import NEXT_TOKENS, SAMPLING_DTYPES, SAMPLING_INPUTS, VERIFY_GRAPH, CacheLayout, GraphSpec, cache_layout
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

    def prefill(
        self, slots: Sequence[int], input_ids: np.ndarray, prompt_lengths: np.ndarray,
        sampling: Sampling | None = None, logits: np.ndarray | None = None,
    ) -> np.ndarray:
        """Right-padded prompts [len(slots), P] -> the token each prompt's last real token is
        followed by [len(slots)] int64, sampled in the graph with ``sampling`` (greedy when None);
        writes those slots' cache rows at positions [0, P). Other slots are untouched. ``logits``
        ([len(slots), V] float32), when given, receives the graph's logits. The returned array may
        be the engine's own buffer: valid until the next call."""
        ...

    def step(
        self, n: int, token_ids: np.ndarray, positions: np.ndarray,
        sampling: Sampling | None = None, logits: np.ndarray | None = None,
    ) -> np.ndarray:
        """One decode step over slots [0, n): token_ids [n] int64, positions [n] int64 (per row).
        Writes each row's new key/value at positions[i] into its slot; returns the next tokens [n]
        int64 sampled in the graph (as :meth:`prefill`). Passing the array a step returned as the
        next step's ``token_ids`` lets an engine feed its own output buffer, with no copy."""
        ...

    def move(self, src: int, dst: int) -> None:
        """Copy slot src's whole cache row into slot dst (compaction when a row leaves)."""
        ...


class Sampling(Protocol):
    """The step graphs' per-row sampling inputs (:data:`tandem.stages.SAMPLING_INPUTS`), each [n]:
    ``temperature`` float32 (0: greedy), ``top_k`` int64 (0: no limit), ``uniform`` float32 (the
    row's next draw from its request's generator; anything for greedy rows). A dict of them is one."""

    def __getitem__(self, name: str) -> np.ndarray: ...


def greedy_sampling(n: int) -> dict[str, np.ndarray]:
    """Sampling inputs that make every one of ``n`` rows greedy."""
    return {name: np.zeros(n, SAMPLING_DTYPES[name]) for name in SAMPLING_INPUTS}


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
        self.greedy = greedy_sampling(capacity)
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
    def prefill(self, slots, input_ids, prompt_lengths, sampling=None, logits=None) -> np.ndarray:
        slots = self._check_slots(slots)
        input_ids, prompt_lengths = np.asarray(input_ids, np.int64), np.asarray(prompt_lengths, np.int64)
        if input_ids.ndim != 2 or input_ids.shape[0] != len(slots) or prompt_lengths.shape != (len(slots),):
            raise TandemError(
                f"prefill takes input_ids [{len(slots)}, P] and prompt_lengths [{len(slots)}] for {len(slots)} "
                f"slots, got {list(input_ids.shape)} and {list(prompt_lengths.shape)}"
            )
        feeds = {"input_ids": input_ids, "prompt_lengths": prompt_lengths, **self._sampling_feeds(len(slots), sampling)}
        out = self.runtime.run(PREFILL, feeds)
        length = input_ids.shape[1]
        for past, present in zip(self.past_names, self.present_names):
            self._write_prefix(past, slots, out[present], length)
        if logits is not None:
            logits[...] = out["logits"]
        return np.asarray(out[NEXT_TOKENS], dtype=np.int64)

    def _sampling_feeds(self, n: int, sampling: Sampling | None) -> dict[str, np.ndarray]:
        if sampling is None:
            return {name: self.greedy[name][:n] for name in SAMPLING_INPUTS}
        feeds = {name: np.asarray(sampling[name], SAMPLING_DTYPES[name]) for name in SAMPLING_INPUTS}
        if any(v.shape != (n,) for v in feeds.values()):
            raise TandemError(f"sampling inputs {list(SAMPLING_INPUTS)} must each be [{n}], got {[list(v.shape) for v in feeds.values()]}")
        return feeds

    def step(self, n, token_ids, positions, sampling=None, logits=None) -> np.ndarray:
        if not 1 <= n <= self.capacity:
            raise TandemError(f"a step covers 1 to {self.capacity} rows (this engine's capacity), not {n}")
        token_ids, positions = np.asarray(token_ids, np.int64), np.asarray(positions, np.int64)
        if token_ids.shape != (n,) or positions.shape != (n,):
            raise TandemError(f"step({n}) takes token_ids [{n}] and positions [{n}], got {token_ids.shape} and {positions.shape}")
        if positions.min() < 1 or positions.max() >= self.layout.max_len:
            raise TandemError(f"decode positions must lie in [1, {self.layout.max_len}), got {positions.tolist()}")
        tokens, new_rows = self._run_step(n, token_ids, positions, self._sampling_feeds(n, sampling), logits)
        self._write_step(n, positions, new_rows)
        return tokens

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
            logits = np.empty((n, 1, self.vocab), np.float32)
            self.step(n, token_ids[:, 0], start_positions, logits=logits[:, 0])
            return logits
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

    def _run_step(
        self, n: int, token_ids: np.ndarray, positions: np.ndarray, sampling: dict[str, np.ndarray], logits: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """-> (next tokens [n] int64, this step's new cache rows); fills ``logits`` when given."""
        feeds = {"token_ids": token_ids, "positions": positions, **sampling}
        feeds.update({name: buffer[:n] for name, buffer in self.cache.items()})  # views: no copy
        out = self.runtime.run(DECODE, feeds)
        if logits is not None:
            logits[...] = out["logits"]
        return np.asarray(out[NEXT_TOKENS], dtype=np.int64), {name: out[name] for name in self.new_names}

    def _write_step(self, n: int, positions: np.ndarray, new_rows: dict[str, np.ndarray]) -> None:
        """Each cache tensor's new rows [n, H, 1, Dh] -> cache[i, :, positions[i], :] for i < n: the
        flat row index of every (slot, head, position) is computed once per step, into a buffer,
        and each tensor takes one indexed write of its [n * H, Dh] rows (one row: a plain slice,
        cheaper still)."""
        if n == 1:
            position = int(positions[0])
            for past, new in zip(self.past_names, self.new_names):
                self.cache[past][0, :, position, :] = new_rows[new][0, :, 0, :]
            return
        if not hasattr(self, "_slot_heads"):
            heads, max_len, dim = self.layout.n_heads, self.layout.max_len, self.layout.head_dim
            self._slot_heads = (np.arange(self.capacity)[:, None] * heads * max_len + np.arange(heads)[None, :] * max_len).astype(np.int64)
            self._row_index = np.empty_like(self._slot_heads)
            self._flat = {name: buffer.reshape(-1, dim) for name, buffer in self.cache.items()}  # views
        index = np.add(self._slot_heads[:n], positions[:, None], out=self._row_index[:n]).reshape(-1)
        for past, new in zip(self.past_names, self.new_names):
            self._flat[past][index] = new_rows[new].reshape(index.shape[0], -1)

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
        self._sampling = {
            name: torch.zeros(capacity, dtype=getattr(torch, SAMPLING_DTYPES[name]), device=self.device) for name in SAMPLING_INPUTS
        }

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

    def _run_step(self, n, token_ids, positions, sampling, logits):
        from_numpy = self.torch.from_numpy
        self._token_ids[:n].copy_(from_numpy(token_ids))
        self._positions[:n].copy_(from_numpy(positions))
        for name in SAMPLING_INPUTS:
            self._sampling[name][:n].copy_(from_numpy(sampling[name]))
        inputs = [
            self._token_ids[:n], self._positions[:n], *(self._sampling[name][:n] for name in SAMPLING_INPUTS),
            *(self.tensors[name][:n] for name in self.past_names),
        ]
        outputs = self.runtime.run_tensors(DECODE, inputs)
        if logits is not None:
            logits[...] = outputs[1].float().cpu().numpy()
        return outputs[0].cpu().numpy(), dict(zip(self.new_names, outputs[2:]))

    def _write_step(self, n, positions, new_rows):
        for past, new in zip(self.past_names, self.new_names):
            self._write_rows(past, n, positions, new_rows[new])

    def _write_rows(self, past, n, positions, rows):
        """rows [n, H, 1, Dh] -> the cache tensor's [i, :, positions[i], :] for i < n, on the device."""
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
    fixed numpy memory, once per batch size; a step is one ``run_with_iobinding`` plus the row
    writes, and allocates no buffer.

    The token input and the sampled-token output are two buffers that swap roles: a step reads
    its tokens from one and writes the next tokens into the other, so when a step is handed the
    array the previous step returned (every row continued) its input is already in place.

    The host work per step is kept to a few numpy calls (issue 28: the host share of a batch-1
    generation): the cache tensors are views of one block ``[2 * layers, capacity, heads, max_len,
    head_dim]`` and the new rows views of one ``[2 * layers, capacity, heads, 1, head_dim]``, so a
    step's rows of every layer go into the cache in one indexed write; and the positions and
    sampling inputs are the bound buffers themselves when the caller writes them there
    (:meth:`step_inputs`, what :class:`ModelRunner` does), so a step copies no input."""

    def __init__(self, runtime, capacity: int):
        super().__init__(runtime, capacity)
        if DECODE not in runtime.sessions:
            raise TandemError(f"the ONNX Runtime session for {DECODE} was not loaded; load it to decode")
        self.session = runtime.sessions[DECODE]
        spec = runtime.specs[DECODE]
        self.tokens = (np.zeros(capacity, np.int64), np.zeros(capacity, np.int64))
        self.inputs: dict[str, np.ndarray] = {
            "positions": np.ones(capacity, np.int64),
            **{name: np.zeros(capacity, SAMPLING_DTYPES[name]) for name in SAMPLING_INPUTS},
            **self.cache,
        }
        # This step's new rows, every layer's key and value in one block (views per output, as the cache).
        new_shape = self.layout.shape(capacity, 1)
        self._new_block = np.zeros((len(self.new_names), *new_shape), dtype=self.layout.dtype)
        self.outputs: dict[str, np.ndarray] = {
            t.name: np.zeros(t.concrete_shape({"batch": capacity}), dtype=t.dtype)
            for t in spec.outputs if t.name != NEXT_TOKENS and t.name not in self.new_names
        }
        self.outputs.update(zip(self.new_names, self._new_block))
        # [0, n) views of the bound positions and sampling inputs, made once: a caller that writes
        # its inputs into these (step_inputs) hands them back as they are, and the step copies nothing.
        self._input_views = {
            n: ({name: self.inputs[name][:n] for name in SAMPLING_INPUTS}, self.inputs["positions"][:n])
            for n in range(1, capacity + 1)
        }
        heads, max_len, dim = self.layout.n_heads, self.layout.max_len, self.layout.head_dim
        self._cache_rows = self._cache_block.reshape(len(self.past_names), capacity * heads * max_len, dim)  # a view
        self._new_rows = self._new_block.reshape(len(self.new_names), capacity * heads, dim)  # a view
        self._new_row = self._new_block[:, 0, :, 0, :]  # slot 0's new rows, [2 * layers, heads, head_dim]
        self._row_views: dict[int, np.ndarray] = {}  # position -> slot 0's rows there, every layer
        self.bindings: dict[tuple[int, int], tuple[object, np.ndarray]] = {}
        self._returned: np.ndarray | None = None  # the token array the last step returned ...
        self._returned_side = 0  # ... which is self.tokens[_returned_side][:n]

    def _allocate(self) -> None:
        # Zeros, not empty (see CacheDecodeEngine): one block, each cache tensor a contiguous view of it.
        self._cache_block = np.zeros((len(self.past_names), *self.layout.shape(self.capacity)), dtype=self.layout.dtype)
        self.cache = dict(zip(self.past_names, self._cache_block))

    def step_inputs(self) -> tuple[dict[str, np.ndarray], np.ndarray, dict[int, tuple[dict[str, np.ndarray], np.ndarray]]]:
        """The bound sampling inputs ({name: [capacity]}) and positions ([capacity]), and per n their
        [0, n) views (sampling dict, positions). A caller that keeps its per-slot inputs in these
        buffers and passes a step these very view objects has the step read them in place."""
        return {name: self.inputs[name] for name in SAMPLING_INPUTS}, self.inputs["positions"], self._input_views

    def step(self, n, token_ids, positions, sampling=None, logits=None) -> np.ndarray:
        views = self._input_views.get(n)
        if views is None or positions is not views[1] or sampling is not views[0]:
            return super().step(n, token_ids, positions, sampling, logits)
        # The inputs are already in the bound buffers (a runner's own): only what a step must check.
        if n == 1:
            position = int(positions[0])
            if not 1 <= position < self.layout.max_len:
                raise TandemError(f"decode positions must lie in [1, {self.layout.max_len}), got {[position]}")
        elif positions.min() < 1 or positions.max() >= self.layout.max_len:
            raise TandemError(f"decode positions must lie in [1, {self.layout.max_len}), got {positions.tolist()}")
        if token_ids is self._returned:  # the last step's output, already where this step reads it
            side = self._returned_side
        else:
            token_ids = np.asarray(token_ids, np.int64)
            if token_ids.shape != (n,):
                raise TandemError(f"step({n}) takes token_ids [{n}], got {token_ids.shape}")
            side = 0
            self.tokens[0][:n] = token_ids
        binding, tokens = self._binding(n, side)
        self.session.run_with_iobinding(binding)
        self._returned, self._returned_side = tokens, 1 - side
        if logits is not None:
            logits[...] = self.outputs["logits"][:n]
        self._write_rows(n, positions)
        return tokens

    def _write_rows(self, n: int, positions: np.ndarray) -> None:
        """This step's new rows of every layer (the bound output block) -> cache[:, i, :, positions[i], :]
        for i < n, in one numpy call."""
        if n == 1:  # one row: a [2 * layers, heads, head_dim] slice per position, its view made once
            position = int(positions[0])
            target = self._row_views.get(position)
            if target is None:
                target = self._row_views[position] = self._cache_block[:, 0, :, position, :]
            target[...] = self._new_row
            return
        if not hasattr(self, "_slot_heads"):
            heads, max_len = self.layout.n_heads, self.layout.max_len
            self._slot_heads = (np.arange(self.capacity)[:, None] * heads * max_len + np.arange(heads)[None, :] * max_len).astype(np.int64)
            self._row_index = np.empty_like(self._slot_heads)
        index = np.add(self._slot_heads[:n], positions[:, None], out=self._row_index[:n]).reshape(-1)
        self._cache_rows[:, index] = self._new_rows[:, : index.shape[0]]

    def _write_step(self, n, positions, new_rows) -> None:
        self._write_rows(n, positions)  # new_rows are the bound output block's views

    def _binding(self, n: int, side: int) -> tuple[object, np.ndarray]:
        """Rows [0, n) of every buffer are its first n rows: the same address for every n. ``side``:
        the step reads ``tokens[side]`` and writes ``tokens[1 - side]``. Returns the binding and
        the view of the output tokens a step over it returns."""
        if (n, side) not in self.bindings:
            binding = self.session.io_binding()
            inputs = {"token_ids": self.tokens[side], **self.inputs}
            outputs = {NEXT_TOKENS: self.tokens[1 - side], **self.outputs}
            for name, buffer in inputs.items():
                binding.bind_input(name, "cpu", 0, buffer.dtype, [n, *buffer.shape[1:]], buffer.ctypes.data)
            for name, buffer in outputs.items():
                binding.bind_output(name, "cpu", 0, buffer.dtype, [n, *buffer.shape[1:]], buffer.ctypes.data)
            self.bindings[(n, side)] = (binding, self.tokens[1 - side][:n])
        return self.bindings[(n, side)]

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

    def _run_step(self, n, token_ids, positions, sampling, logits):
        if token_ids is self._returned:  # the last step's output, already where this step reads it
            side = self._returned_side
        else:
            side = 0
            self.tokens[0][:n] = token_ids
        inputs = self.inputs
        inputs["positions"][:n] = positions
        for name in SAMPLING_INPUTS:
            inputs[name][:n] = sampling[name]
        binding, tokens = self._binding(n, side)
        self.session.run_with_iobinding(binding)
        self._returned, self._returned_side = tokens, 1 - side
        if logits is not None:
            logits[...] = self.outputs["logits"][:n]
        return tokens, {}  # the new rows are in the bound output block (_write_step reads it)


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

    def append(self, token: int) -> None:
        """Append one sampled token (the runner's step)."""
        self.tokens[self.count] = token
        self.count += 1

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
    tokens. Only one thread may call :meth:`execute`.

    Tokens are sampled in the step graphs: the runner keeps each slot's sampling inputs and
    position in buffers allocated once, draws each sampled row's uniform from the row's own
    generator (one draw per sampled row per step; greedy rows draw nothing) and, while no row
    joins or leaves, hands the engine the token array its last step returned, so a step in the
    steady state is one engine call, a position increment and each row's token append."""

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
        # Per slot, allocated once: the sampling inputs, the next position, the next token (when
        # the rows changed since the last step), and their [0, n) views per n.
        # An engine that binds its step inputs (ONNX Runtime) lends its bound buffers and their views
        # (step_inputs): the runner writes positions and draws straight into them, and a step copies none.
        self.token_ids = np.zeros(self.capacity, np.int64)
        step_inputs = getattr(engine, "step_inputs", None)
        if step_inputs is not None:
            self.sampling, self.positions, views = step_inputs()
            self._views = {n: (*views[n], self.token_ids[:n]) for n in range(1, self.capacity + 1)}
        else:
            self.sampling = {name: np.zeros(self.capacity, SAMPLING_DTYPES[name]) for name in SAMPLING_INPUTS}
            self.positions = np.zeros(self.capacity, np.int64)
            self._views = {
                n: ({name: b[:n] for name, b in self.sampling.items()}, self.positions[:n], self.token_ids[:n])
                for n in range(1, self.capacity + 1)
            }
        self._next: np.ndarray | None = None  # the engine's last output, while it is every row's next token
        self._changed = True  # rows joined or left since the last step: per-row state is recomputed
        self._drawing: list[tuple[int, np.random.Generator]] = []  # (slot, generator) of sampled rows
        self._steps_to_retire = 0  # steps until the first row could be done (no scan before)
        self._mixed = False

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
        self._changed = True
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
            for buffer in (*self.sampling.values(), self.positions):
                buffer[index] = buffer[last]
        self.rows.pop()
        self._changed = True

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
        them into the first free slots, sample each row's first token in the graph."""
        start = self.clock()
        lengths = np.array([row.prompt_len for row in rows], dtype=np.int64)
        input_ids = np.full((len(rows), int(lengths.max())), PAD, dtype=np.int64)
        first = len(self.rows)
        slots = slice(first, first + len(rows))
        for i, row in enumerate(rows):
            input_ids[i, : row.prompt_len] = row.input_ids
            self.sampling["temperature"][first + i] = row.params.temperature
            self.sampling["top_k"][first + i] = row.params.top_k
            self.positions[first + i] = row.prompt_len  # where the first sampled token goes
        sampling = {name: buffer[slots] for name, buffer in self.sampling.items()}
        states = [row.rng.bit_generator.state for row in rows]
        self._draw(rows, sampling["uniform"])
        try:
            chosen = self.engine.prefill(range(first, first + len(rows)), input_ids, lengths, sampling)
        except BaseException:  # not admitted: the draws were not used, the streams go back
            for row, state in zip(rows, states):
                row.rng.bit_generator.state = state
            raise
        out.prefills += 1
        for i, row in enumerate(rows):
            row.timing.prefill_start = start
            row.append(int(chosen[i]))
        self.rows.extend(rows)
        self._changed = True
        if self.on_sampled is not None:
            self.on_sampled(list(rows))

    @staticmethod
    def _draw(rows: Sequence[Row], uniform: np.ndarray) -> None:
        """Each sampled row's next draw from its own generator into ``uniform`` (greedy rows: none)."""
        for i, row in enumerate(rows):
            if row.params.temperature != 0.0:
                uniform[i] = draw_uniform(row.rng)

    def _refresh(self) -> None:
        """After rows joined or left: the next tokens, which rows draw, when one can be done."""
        rows = self.rows
        for i, row in enumerate(rows):
            self.token_ids[i] = row.tokens[row.count - 1]
            if row.timing.first_step is None:
                row.timing.first_step = self._step_start
        self._next = None
        self._drawing = [(i, row.rng) for i, row in enumerate(rows) if row.params.temperature != 0.0]
        self._steps_to_retire = min(row.num_tokens - row.count for row in rows)
        self._mixed = len({row.count for row in rows}) > 1
        self._changed = False

    def _decode(self, out: StepOutput) -> None:
        rows, n = self.rows, len(self.rows)
        self._step_start = self.clock()
        if self._changed:
            self._refresh()
        sampling, positions, token_ids = self._views[n]
        uniform = sampling["uniform"]
        for slot, rng in self._drawing:
            uniform[slot] = draw_uniform(rng)
        chosen = self.engine.step(n, token_ids if self._next is None else self._next, positions, sampling)
        out.stepped, out.mixed = n, self._mixed
        positions += 1
        self._next = chosen
        self._steps_to_retire -= 1
        for row, token in zip(rows, chosen.tolist()):
            row.append(token)
        if self.on_sampled is not None:
            self.on_sampled(list(rows))

    def _retire(self, out: StepOutput) -> None:
        if self._steps_to_retire > 0 and not self._changed:
            return  # no row can be done yet
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
    "Sampling",
    "StepOutput",
    "StepPlan",
    "Timing",
    "TorchDecodeEngine",
    "greedy_sampling",
    "make_decode_engine",
    "max_capacity",
]
