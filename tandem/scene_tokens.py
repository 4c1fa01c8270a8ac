"""Scene-token arrays as users hand them over: one shape check for the in-process pipeline and the
served client, so both accept the same arrays and refuse the same ones with the same message."""

from __future__ import annotations

import numpy as np

from tandem.errors import TandemError


def token_batch(tokens: np.ndarray, grid: tuple[int, int], codebook_size: int | None = None, where: str = "") -> np.ndarray:
    """``[h, w]``, ``[h*w]``, ``[B, h, w]`` or ``[B, h*w]`` integer tokens -> ``[B, h, w]`` int64.

    ``grid`` is the (h, w) of the model that will paint them; ``codebook_size``, when known, bounds
    the values. ``where`` names the model in messages (e.g. "the server's refinement")."""
    tokens = np.asarray(tokens)
    h, w = grid
    n = h * w
    of = f" of {where}" if where else ""
    if not np.issubdtype(tokens.dtype, np.integer):
        raise TandemError(f"scene tokens must be integers (codebook indices), got {tokens.dtype}")
    shape = tuple(tokens.shape)
    if shape == (h, w) or shape == (n,):
        batch = tokens.reshape(1, h, w)
    elif tokens.ndim == 3 and shape[1:] == (h, w) and shape[0] >= 1:
        batch = tokens
    elif tokens.ndim == 2 and shape[1] == n and shape[0] >= 1:
        batch = tokens.reshape(-1, h, w)
    else:
        raise TandemError(
            f"scene tokens of shape {list(shape)} do not fit the {h}x{w} grid{of}: give [{h}, {w}] or [{n}] for one "
            f"image, [B, {h}, {w}] or [B, {n}] for B images"
        )
    if codebook_size is not None:
        bad = (batch < 0) | (batch >= codebook_size)
        if bad.any():
            raise TandemError(
                # no example value: scene tokens are controlled data and messages reach logs
                f"{int(bad.sum())} scene tokens are outside the codebook [0, {codebook_size}){of}; edit them into range"
            )
    return batch.astype(np.int64)
