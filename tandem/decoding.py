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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from tandem.errors import TandemError
from tandem.config import ModelConfig
from tandem.stages import VERIFY_GRAPH, CacheLayout, GraphSpec, cache_layout

if TYPE_CHECKING:
    import torch

PREFILL, DECODE = "reasoning_prefill", "reasoning_decode"
VERIFY = VERIFY_GRAPH  # k tokens per row in one step (tandem.parallel)


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


__all__ = [
    "CacheDecodeEngine",
    "DecodeEngine",
    "OrtDecodeEngine",
    "TorchDecodeEngine",
    "make_decode_engine",
    "max_capacity",
]
