"""Text -> scene tokens -> image over any runtime.

The reasoning stage runs one prefill over the prompts and then one decode step per scene token,
reading and writing the static KV cache (no recomputation of the prefix)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

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
        n_tokens = self.config.scene.num_tokens
        out = self.runtime.run("reasoning_prefill", {"input_ids": input_ids, "prompt_lengths": lengths})
        logits, cache = out["logits"], out["kv_cache"]
        positions = lengths.copy()
        tokens = np.empty((len(prompts), n_tokens), dtype=np.int64)
        for step in range(n_tokens):
            tokens[:, step] = select_next(logits, params, rngs)
            if on_step is not None:
                on_step(step)
            if step == n_tokens - 1:
                break  # the last token needs no logits after it
            out = self.runtime.run(
                "reasoning_decode", {"token_ids": tokens[:, step], "positions": positions, "kv_cache": cache}
            )
            logits, cache = out["logits"], out["kv_cache_out"]
            positions = positions + 1
        return tokens.reshape(len(prompts), *self.grid).astype(np.int32)

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
