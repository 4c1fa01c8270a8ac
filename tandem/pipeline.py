"""Text -> scene tokens -> image over any runtime.

The reasoning stage runs one prefill over the prompts and then one decode step per scene token
over a decode engine (:mod:`tandem.decoding`): the KV cache stays in the engine's buffers and each
step writes only its new rows (no recomputation of the prefix, no copy of the cache)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tandem.decoding import make_decode_engine, max_capacity
from tandem.errors import TandemError
from tandem.runtimes.base import Runtime
from tandem.sampling import SamplingParams, select_next
from tandem.tokenizer import encode_batch


@dataclass
class Generation:
    tokens: np.ndarray  # [h, w] int32 scene codebook ids
    image: np.ndarray  # [H, W, 3] uint8


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[B, 3, H, W] floats in [0, 1] -> [B, H, W, 3] uint8."""
    return (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


class Pipeline:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.config = runtime.config

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.scene.grid_height, self.config.scene.grid_width

    def generate_tokens(
        self,
        prompts: Sequence[str],
        params: Sequence[SamplingParams] | SamplingParams = SamplingParams(),
        on_step: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Prompts -> scene tokens [B, h, w] int32."""
        params = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise TandemError(f"{len(prompts)} prompts but {len(params)} sampling settings")
        input_ids, lengths = encode_batch(list(prompts), self.config.reasoning.max_prompt_len)
        rngs = [p.generator() for p in params]
        tokens = np.empty((len(prompts), self.config.scene.num_tokens), dtype=np.int64)
        chunk = max_capacity(self.runtime)  # rows are independent: larger requests run in chunks
        for start in range(0, len(prompts), chunk):
            rows = slice(start, start + chunk)
            self._generate_rows(input_ids[rows], lengths[rows], params[rows], rngs[rows], tokens[rows], on_step)
        return tokens.reshape(len(prompts), *self.grid).astype(np.int32)

    def _generate_rows(self, input_ids, lengths, params, rngs, tokens: np.ndarray, on_step) -> None:
        """Fill ``tokens`` [n, num_tokens] for up to one engine's capacity of prompts."""
        n, n_tokens = len(lengths), tokens.shape[1]
        engine = make_decode_engine(self.runtime, n)
        # Trim the padding shared by every row: positions past the longest prompt are never read.
        width = int(lengths.max())
        logits = engine.prefill(range(n), input_ids[:, :width], lengths)
        positions = lengths.astype(np.int64)
        for step in range(n_tokens):
            tokens[:, step] = select_next(logits, params, rngs)
            if on_step is not None:
                on_step(step)
            if step == n_tokens - 1:
                break  # the last token needs no logits after it
            logits = engine.step(n, tokens[:, step], positions)
            positions = positions + 1

    def check_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """[h, w], [h*w], [B, h, w] or [B, h*w] codebook indices -> [B, h, w] int64 (tandem.scene_tokens)."""
        from tandem.scene_tokens import token_batch

        return token_batch(tokens, self.grid, self.config.scene.codebook_size)

    def render(self, tokens: np.ndarray) -> np.ndarray:
        """Scene tokens ([h, w], [h*w], [B, h, w] or [B, h*w]) -> images [B, H, W, 3] uint8, one per grid."""
        tokens = self.check_tokens(tokens)
        from tandem.stages import graph_specs

        step = graph_specs(self.config)["refinement"].dims["batch"].max  # the graph's batch range: larger batches in chunks
        chunks = [tokens[i : i + step] for i in range(0, len(tokens), step)]
        return np.concatenate([to_uint8(self.runtime.run("refinement", {"scene_tokens": c})["image"]) for c in chunks])

    def generate(self, prompt: str, seed: int = 0, temperature: float = 0.0, top_k: int = 0) -> Generation:
        params = SamplingParams(seed=seed, temperature=temperature, top_k=top_k)
        tokens = self.generate_tokens([prompt], params)
        return Generation(tokens=tokens[0], image=self.render(tokens)[0])
