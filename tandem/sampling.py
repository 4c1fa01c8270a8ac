"""Next-token selection: per-request settings, their seeded generators, and the host reference.

Greedy when ``temperature == 0``; otherwise softmax at ``temperature`` over the ``top_k`` best
logits (all when 0), drawn with a per-request ``numpy`` generator seeded from ``seed``.

The step graphs sample (:func:`tandem.models.reasoning.sample_tokens`): the host only draws each
sampled row's uniform from the request's generator (:func:`draw_uniform`, the same stream and
the same one draw per sampled token as :func:`select_next`) and passes it in with the row's
temperature and top-k, so every runtime samples identically. :func:`select_next` is the float64
host reference the graphs are tested against."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tandem.errors import TandemError


# Temperature is 0 (greedy) or within [MIN_TEMPERATURE, MAX_TEMPERATURE]. Below the minimum,
# logits / temperature overflow float64 (1e-308 gave inf - inf = NaN and every token the last
# one) and, long before that, sampling is greedy decoding with extra cost; above the maximum the
# distribution is uniform noise over the codebook.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 10.0


@dataclass(frozen=True)
class SamplingParams:
    seed: int = 0
    temperature: float = 0.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or not (
            self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE
        ):
            raise TandemError(
                f"temperature must be 0 (greedy) or within [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {self.temperature}; "
                "send 0 for greedy decoding"
            )
        if self.top_k < 0:
            raise TandemError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0 <= self.seed < 2**63:
            raise TandemError(f"seed must be in [0, 2**63), got {self.seed}")

    def generator(self) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(self.seed))


# The largest float32 below 1: a draw is passed to the graphs as float32, and must stay below 1.
UNIFORM_MAX = float(np.nextafter(np.float32(1.0), np.float32(0.0)))


def draw_uniform(rng: np.random.Generator) -> float:
    """A request's next draw in [0, 1), as its sampled row's ``uniform`` graph input (float32)."""
    return min(rng.random(), UNIFORM_MAX)


def select_next(logits: np.ndarray, params: list[SamplingParams], rngs: list[np.random.Generator]) -> np.ndarray:
    """logits [B, V] -> token ids [B] (int64)."""
    tokens = np.empty(logits.shape[0], dtype=np.int64)
    for row, (p, rng) in enumerate(zip(params, rngs)):
        scores = logits[row]
        if p.temperature == 0.0:
            tokens[row] = int(np.argmax(scores))
            continue
        scores = scores.astype(np.float64) / p.temperature
        if 0 < p.top_k < scores.shape[0]:
            cutoff = np.partition(scores, -p.top_k)[-p.top_k]
            scores = np.where(scores >= cutoff, scores, -np.inf)
        probs = np.exp(scores - scores.max())
        cdf = np.cumsum(probs)
        tokens[row] = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), scores.shape[0] - 1)
    return tokens
