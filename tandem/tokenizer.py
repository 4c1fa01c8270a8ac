"""Byte-level prompt tokenizer: nothing to download, every UTF-8 string has an encoding.

Input-id layout of the reasoning transformer's embedding table:
  [0, 256)                        UTF-8 bytes of the prompt
  256 BOS, 257 BOI (begin image), 258 PAD
  [SCENE_OFFSET, SCENE_OFFSET + V) scene codebook entries
"""

from __future__ import annotations

import numpy as np

from tandem.errors import TandemError

BOS = 256
BOI = 257
PAD = 258
SCENE_OFFSET = 259


def vocab_size(codebook_size: int) -> int:
    return SCENE_OFFSET + codebook_size


def encode(prompt: str, max_prompt_len: int) -> list[int]:
    if not isinstance(prompt, str):
        raise TandemError(f"prompt must be text, got {type(prompt).__name__}")
    if not prompt.strip():
        raise TandemError("prompt is empty; describe the scene, e.g. 'a red circle above a blue square'")
    ids = [BOS, *prompt.encode("utf-8"), BOI]
    if len(ids) > max_prompt_len:
        raise TandemError(
            f"prompt is {len(ids) - 2} bytes but this model allows at most {max_prompt_len - 2}; "
            "shorten the prompt or use a config with a larger reasoning.max_prompt_len"
        )
    return ids


def encode_batch(prompts: list[str], max_prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids [B, P] and true lengths [B]; padding sits after each prompt, so the causal
    mask alone keeps it out of every real position (no attention mask needed)."""
    if not prompts:
        raise TandemError("no prompts given")
    encoded = [encode(p, max_prompt_len) for p in prompts]
    width = max(len(e) for e in encoded)
    ids = np.full((len(encoded), width), PAD, dtype=np.int64)
    for row, e in enumerate(encoded):
        ids[row, : len(e)] = e
    lengths = np.array([len(e) for e in encoded], dtype=np.int64)
    return ids, lengths
