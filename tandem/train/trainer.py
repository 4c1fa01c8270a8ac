"""Train both stages of a config on synthetic scenes, on the CPU, with a fixed seed.

Reasoning stage: teacher forcing. The input is ``[BOS, caption bytes, BOI, scene token 0 .. 254]``
and the logits at position ``p`` predict the token at ``p + 1``: the logits at BOI predict scene
token 0, exactly as :meth:`ReasoningTransformer.prefill` does at generation time, and scene token
``t`` sits at position ``prompt_len + t`` as in :meth:`decode_step`. The decisions (the plan
entries at the start of row 0 and the nine lattice cells that may hold an object, see
:mod:`tandem.data.scenes`) weigh ``1 + decision_weight`` in the loss, every other scene token
(carrying the cell position forward) 1. Phase 1 trains each step on a few whole rows plus many
rows cut after the plan (the plan is where the caption is read; a cut row costs a quarter of a
whole one); phase 2 (canvas) trains on whole rows only, at a lower learning rate.

The MoE layers are evaluated grouped by expert (each expert runs only on the tokens routed to
it): the same function as the module's dense evaluation, with the same gradients, at a quarter of
the expert FLOPs (top-2 of 8). :func:`reasoning_hidden` is checked against
``ReasoningTransformer.forward`` in tests/test_train.py. A small Switch-style load-balancing loss
keeps every expert in use, so the served checkpoint routes like a real MoE.

Refinement stage: ground-truth token grids -> the Pillow render, L1 + squared error on pixels.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tandem.config import ModelConfig
from tandem.data.scenes import (
    BACKGROUND_RGB,
    COLOURS,
    LATTICE,
    MAX_OBJECTS,
    SHAPES,
    SceneObject,
    SceneVocabulary,
    heldout_captions,
    sample_captions,
)
from tandem.errors import TandemError
from tandem.models import Stages, build_stages, save_weights
from tandem.models.reasoning import MoEFeedForward, ReasoningTransformer
from tandem.tokenizer import PAD, SCENE_OFFSET, encode

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class TrainSettings:
    reasoning_steps: int = 850
    reasoning_batch: int = 4  # whole rows (plan and canvas) per step
    plan_batch: int = 24  # rows cut after the plan per step: the decisions at a fraction of the cost
    reasoning_lr: float = 2e-3
    decision_weight: float = 8.0  # extra loss weight of the decisions: plan entries, object cells
    canvas_steps: int = 250  # reasoning phase 2: whole rows only, so placing objects from the plan is exact
    canvas_batch: int = 8
    canvas_lr: float = 5e-4
    refinement_steps: int = 1000
    refinement_batch: int = 8
    refinement_lr: float = 1e-3  # 5e-3 never learns to tell the object tokens apart
    warmup_steps: int = 30
    load_balance_weight: float = 0.01
    object_pixel_weight: float = 4.0  # refinement loss weight of object pixels, on top of 1
    seed: int = 0
    threads: int = 2
    stored_dtype: str = "float16"  # the checkpoint's dtype; float16 halves the committed file


@dataclass
class StageReport:
    steps: int
    wall_s: float
    final_loss: float
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, smoothed loss)


@dataclass
class TrainReport:
    config: str
    settings: TrainSettings
    reasoning: StageReport | None
    refinement: StageReport | None
    heldout_token_accuracy: float | None  # teacher-forced, per scene token
    heldout_decision_accuracy: float | None  # teacher-forced, at the nine cells where objects may start
    wall_s: float
    out: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


# --- reasoning ------------------------------------------------------------------------------------


def moe_grouped(moe: MoEFeedForward, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE layer evaluated per expert on its routed tokens; returns (output, load-balance loss)."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    n_tokens = x.shape[0]
    probs = torch.softmax(moe.router(x), dim=-1)
    weights, experts = torch.topk(probs, moe.top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    flat_experts = experts.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    token_of = torch.arange(n_tokens).repeat_interleave(moe.top_k)[order]
    weight_of = weights.reshape(-1)[order]
    counts = torch.bincount(flat_experts, minlength=moe.n_experts)
    xs = x[token_of]
    pieces, start = [], 0
    for e, count in enumerate(counts.tolist()):
        if count:
            xe = xs[start : start + count]
            pieces.append(torch.matmul(F.silu(xe @ moe.w_gate[e]) * (xe @ moe.w_up[e]), moe.w_down[e]))
            start += count
    y = torch.cat(pieces) * weight_of.unsqueeze(-1)
    out = torch.zeros_like(x).index_add_(0, token_of, y)
    # Switch Transformer balance loss: n_experts * sum_e (share of routed slots) * (mean router prob).
    share = counts.to(x.dtype) / (n_tokens * moe.top_k)
    balance = moe.n_experts * torch.sum(share * probs.mean(dim=0))
    return out.reshape(shape), balance


def reasoning_hidden(model: ReasoningTransformer, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states [B, S, d] (as ReasoningTransformer.forward_sequence) and the summed
    load-balance loss of every MoE layer."""
    seq = input_ids.shape[1]
    positions = torch.arange(seq)
    h = model.token_embedding(input_ids) + model.position_embedding(positions).unsqueeze(0)
    balance = h.new_zeros(())
    for block in model.blocks:
        attn_out, _, _ = block.attn.forward_full(block.attn_norm(h))
        h = h + attn_out
        moe_out, layer_balance = moe_grouped(block.moe, block.ffn_norm(h))
        h = h + moe_out
        balance = balance + layer_balance
    return model.final_norm(h), balance


def decision_cells(vocab: SceneVocabulary) -> list[int]:
    """Flat indices of the scene tokens that decide something: the plan entries (row 0, one per
    possible object) and the nine lattice cells that may hold an object."""
    return list(range(MAX_OBJECTS)) + [row * vocab.width + col for row, col in vocab.slot_cells]


def reasoning_batch(
    vocab: SceneVocabulary, captions: list[str], decision_weight: float = 0.0, scene_tokens: int | None = None
):
    """Teacher-forcing ids [B, S], targets [B, S] (codebook ids, IGNORE where nothing is
    predicted) and loss weights [B, S] (``1 + decision_weight`` at the decision cells, else 1),
    for the first ``scene_tokens`` scene tokens (default all). Rows are right-padded; the causal
    mask keeps padding out of real positions."""
    max_prompt = vocab.config.reasoning.max_prompt_len
    cell_weights = np.ones(vocab.height * vocab.width, dtype=np.float32)
    cell_weights[decision_cells(vocab)] += decision_weight
    keep = scene_tokens or vocab.height * vocab.width
    rows, targets, weights = [], [], []
    for caption in captions:
        prompt = encode(caption, max_prompt)
        scene = vocab.caption_tokens(caption).reshape(-1).astype(np.int64)[:keep]
        rows.append(np.concatenate([prompt, scene[:-1] + SCENE_OFFSET]))
        target = np.full(len(rows[-1]), IGNORE, dtype=np.int64)
        target[len(prompt) - 1 :] = scene  # logits at BOI predict scene token 0
        targets.append(target)
        weight = np.zeros(len(rows[-1]), dtype=np.float32)
        weight[len(prompt) - 1 :] = cell_weights[:keep]
        weights.append(weight)
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), PAD, dtype=np.int64)
    tgt = np.full((len(rows), width), IGNORE, dtype=np.int64)
    wgt = np.zeros((len(rows), width), dtype=np.float32)
    for i, (r, t, w) in enumerate(zip(rows, targets, weights)):
        ids[i, : len(r)], tgt[i, : len(t)], wgt[i, : len(w)] = r, t, w
    return torch.from_numpy(ids), torch.from_numpy(tgt), torch.from_numpy(wgt)


def _sinusoid(values: np.ndarray, dim: int, low: float = 0.15, high: float = 3.0) -> np.ndarray:
    """[n] -> [n, dim] sin/cos features at geometric frequencies in [low, high], RMS 1."""
    freqs = np.exp(np.linspace(np.log(low), np.log(high), dim // 2))
    angles = values[:, None] * freqs[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1) * math.sqrt(2.0)


def init_reasoning_embeddings(model: ReasoningTransformer, vocab: SceneVocabulary, rng: np.random.Generator) -> None:
    """Give the embeddings the structure the data has, so training starts from geometry instead
    of rediscovering it: a background token's embedding encodes its row and column (sinusoids),
    an object token's its shape and colour (random codes), a plan entry's its object's code plus
    its slot's cell (so that placing an object is matching a cell against the plan), and
    positions are sinusoids (so that attending a fixed distance back is a linear map)."""
    d = model.token_embedding.weight.shape[1]
    half = d // 2
    scale = 0.02
    rows = _sinusoid(np.arange(vocab.height, dtype=np.float64), half)
    cols = _sinusoid(np.arange(vocab.width, dtype=np.float64), d - half)
    table = model.token_embedding.weight.detach().numpy().copy()
    for r in range(vocab.height):
        for c in range(vocab.width):
            table[SCENE_OFFSET + vocab.background_token(r, c)] = scale * np.concatenate([rows[r], cols[c]])
    shape_codes = rng.standard_normal((len(SHAPES), d))
    colour_codes = rng.standard_normal((len(COLOURS), d))
    for si, shape in enumerate(SHAPES):
        for ci, colour in enumerate(COLOURS):
            obj = SceneObject(colour, shape)
            code = (shape_codes[si] + colour_codes[ci]) / math.sqrt(2.0)
            table[SCENE_OFFSET + vocab.object_token(obj)] = scale * code
            for slot, (r, c) in enumerate(vocab.slot_cells):
                cell = np.concatenate([rows[r], cols[c]])
                token = vocab.plan_token(obj, divmod(slot, LATTICE))
                table[SCENE_OFFSET + token] = scale * (code + cell) / math.sqrt(2.0)
    positions = scale * _sinusoid(np.arange(model.max_len, dtype=np.float64), d, low=0.01, high=3.0)
    with torch.no_grad():
        model.token_embedding.weight.copy_(torch.from_numpy(table.astype(np.float32)))
        model.position_embedding.weight.copy_(torch.from_numpy(positions.astype(np.float32)))


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _train_loop(
    module: torch.nn.Module,
    name: str,
    steps: int,
    lr: float,
    settings: TrainSettings,
    loss_of_step: Callable[[np.random.Generator], tuple[torch.Tensor, torch.Tensor, dict[str, float]]],
    rng: np.random.Generator,
    progress: bool,
) -> StageReport:
    """AdamW with warmup and cosine decay; ``loss_of_step(rng)`` samples a batch and returns
    (loss to optimise, loss to report, extra figures for the progress bar)."""
    module.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    start = time.perf_counter()
    smoothed, history = None, []
    bar = tqdm(range(steps), desc=f"train {name}", unit="step", disable=not progress, mininterval=5.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * _schedule(step, steps, settings.warmup_steps)
        total_loss, loss, extra = loss_of_step(rng)
        optimizer.zero_grad(set_to_none=True)
        total_loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        value = float(loss.detach())
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        if step % 10 == 0 or step == steps - 1:
            history.append((step, smoothed))
            bar.set_postfix(loss=f"{smoothed:.4f}", **{k: f"{v:.3f}" for k, v in extra.items()})
            if not progress:
                log.info("%s step %d/%d loss %.4f", name, step, steps, smoothed)
    module.eval().requires_grad_(False)
    return StageReport(steps, time.perf_counter() - start, smoothed or float("nan"), history)


def train_reasoning(
    model: ReasoningTransformer,
    vocab: SceneVocabulary,
    settings: TrainSettings,
    progress: bool = True,
    fresh: bool = True,
) -> StageReport:
    rng = np.random.Generator(np.random.PCG64(settings.seed))
    if fresh:
        init_reasoning_embeddings(model, vocab, rng)

    return _train_reasoning_phase(
        model, vocab, settings, "reasoning", settings.reasoning_steps, settings.reasoning_lr,
        ((settings.reasoning_batch, None), (settings.plan_batch, MAX_OBJECTS + 1)), rng, progress,
    )


def train_reasoning_canvas(
    model: ReasoningTransformer, vocab: SceneVocabulary, settings: TrainSettings, progress: bool = True
) -> StageReport:
    """Phase 2: after phase 1 the plan is right for almost every caption, but placing objects from
    it and keeping track of the cell over 256 tokens (phase 1 sees few whole rows) still slip;
    whole rows only, a lower learning rate, a fresh optimizer and its own data stream."""
    rng = np.random.Generator(np.random.PCG64(settings.seed + 2))
    return _train_reasoning_phase(
        model, vocab, settings, "reasoning (canvas)", settings.canvas_steps, settings.canvas_lr,
        ((settings.canvas_batch, None),), rng, progress,
    )


def _train_reasoning_phase(
    model: ReasoningTransformer,
    vocab: SceneVocabulary,
    settings: TrainSettings,
    name: str,
    steps: int,
    lr: float,
    batches: tuple[tuple[int, int | None], ...],  # (captions, scene tokens kept or None for all)
    rng: np.random.Generator,
    progress: bool,
) -> StageReport:
    def loss_of_step(rng: np.random.Generator):
        losses, weights, balance = [], [], 0.0
        for count, keep in batches:
            if not count:
                continue
            captions = sample_captions(rng, count, vocab.max_caption_bytes, split="train")
            ids, targets, weight = reasoning_batch(vocab, captions, settings.decision_weight, scene_tokens=keep)
            hidden, layer_balance = reasoning_hidden(model, ids)
            mask = targets != IGNORE
            losses.append(F.cross_entropy(model.lm_head(hidden[mask]), targets[mask], reduction="none"))
            weights.append(weight[mask])
            balance = balance + layer_balance
        # The balance term is summed over both forward passes; the bar shows it per layer and pass.
        per_pass = float(balance.detach()) / len(model.blocks) / len(losses)
        losses, weights = torch.cat(losses), torch.cat(weights)
        loss = (losses * weights).sum() / weights.sum()
        return loss + settings.load_balance_weight * balance, loss, {"balance": per_pass}

    return _train_loop(model, name, steps, lr, settings, loss_of_step, rng, progress)


@torch.no_grad()
def teacher_forced_accuracy(
    model: ReasoningTransformer, vocab: SceneVocabulary, captions: list[str]
) -> tuple[float, float]:
    """(accuracy over every scene token, accuracy at the decision cells), teacher-forced."""
    correct = count = decided = decisions = 0
    for i in range(0, len(captions), 8):
        ids, targets, weights = reasoning_batch(vocab, captions[i : i + 8], decision_weight=1.0)
        hidden, _ = reasoning_hidden(model, ids)
        mask = targets != IGNORE
        right = model.lm_head(hidden[mask]).argmax(-1) == targets[mask]
        at_decision = weights[mask] > 1.0
        correct += int(right.sum())
        count += int(mask.sum())
        decided += int(right[at_decision].sum())
        decisions += int(at_decision.sum())
    return correct / max(1, count), decided / max(1, decisions)


# --- refinement -----------------------------------------------------------------------------------


def init_refinement_embeddings(model: torch.nn.Module, vocab: SceneVocabulary, rng: np.random.Generator) -> None:
    """Start the painter from what each token means: its colour (RGB), an object flag and its
    shape (one-hot), on top of the seeded init's noise."""
    weight = model.token_embedding.weight
    features = 7  # rgb(3) + object flag + shape one-hot(3)
    if weight.shape[1] < features + 4:
        return  # too narrow to structure; keep the seeded init
    table = rng.standard_normal(weight.shape)  # the seeded init's scale, structure added on top
    for token in range(vocab.codebook_size):
        kind = vocab.describe_token(token)
        if kind[0] == "background":
            rgb = BACKGROUND_RGB
        elif kind[0] == "plan":
            rgb = BACKGROUND_RGB  # the plan is not painted
        elif kind[0] == "object":
            _, colour, shape = kind
            rgb = COLOURS[colour]
            table[token, 3] += 3.0
            table[token, 4 + SHAPES.index(shape)] += 3.0
        else:
            continue
        table[token, :3] += (np.asarray(rgb) / 255.0 * 2.0 - 1.0) * 3.0
    with torch.no_grad():
        weight.copy_(torch.from_numpy(table.astype(np.float32)))


def refinement_batch(vocab: SceneVocabulary, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token grids [B, h, w] and their Pillow renders [B, 3, H, W] in [0, 1]."""
    scenes = [vocab.parse(c) for c in captions]
    tokens = np.stack([vocab.scene_tokens(s) for s in scenes]).astype(np.int64)
    images = np.stack([vocab.render(s) for s in scenes]).astype(np.float32) / 255.0
    return torch.from_numpy(tokens), torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


def train_refinement(
    model: torch.nn.Module, vocab: SceneVocabulary, settings: TrainSettings, progress: bool = True, fresh: bool = True
) -> StageReport:
    rng = np.random.Generator(np.random.PCG64(settings.seed + 1))
    if fresh:
        init_refinement_embeddings(model, vocab, rng)
    background = torch.tensor(BACKGROUND_RGB, dtype=torch.float32).view(1, 3, 1, 1) / 255.0

    def loss_of_step(rng: np.random.Generator):
        captions = sample_captions(rng, settings.refinement_batch, vocab.max_caption_bytes, split="train")
        tokens, images = refinement_batch(vocab, captions)
        predicted = model(tokens)
        # Objects cover about a tenth of the pixels; weight them up so colour and shape are not
        # drowned by the background.
        weight = 1.0 + settings.object_pixel_weight * (images != background).any(dim=1, keepdim=True)
        error = (predicted - images).abs()
        loss = ((error + error * error) * weight).mean() / weight.mean()
        return loss, loss, {}

    return _train_loop(
        model, "refinement", settings.refinement_steps, settings.refinement_lr, settings, loss_of_step, rng, progress
    )


# --- both -----------------------------------------------------------------------------------------


def save_checkpoint(stages: Stages, path: Path, settings: TrainSettings, metadata: dict[str, str]) -> None:
    dtype = {"float16": torch.float16, "float32": torch.float32}.get(settings.stored_dtype)
    if dtype is None:
        raise TandemError(f"stored_dtype must be float16 or float32, got {settings.stored_dtype!r}")
    stored = Stages(copy.deepcopy(stages.reasoning).to(dtype), copy.deepcopy(stages.refinement).to(dtype))
    save_weights(stored, path, metadata=metadata)


TRAINED_STAGES_KEY = "tandem.trained_stages"


def trained_stages_of(checkpoint: str | Path) -> set[str]:
    """The stages a checkpoint's metadata says were trained (none for a seeded-init export)."""
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return {s for s in metadata.get(TRAINED_STAGES_KEY, "").split(",") if s}


def _round_to_stored(module: torch.nn.Module, settings: TrainSettings) -> None:
    """Round weights to the checkpoint dtype at the end of a phase, so a run resumed from a saved
    phase (``--init``) continues from exactly the weights a one-shot run continues from."""
    dtype = getattr(torch, settings.stored_dtype)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype).to(tensor.dtype))


def _join(first: StageReport | None, second: StageReport) -> StageReport:
    """One report for both reasoning phases; the second phase's steps follow the first's."""
    if first is None:
        return second
    return StageReport(
        steps=first.steps + second.steps,
        wall_s=first.wall_s + second.wall_s,
        final_loss=second.final_loss,
        history=first.history + [(first.steps + step, loss) for step, loss in second.history],
    )


def train_model(
    config: ModelConfig,
    out: str | Path,
    settings: TrainSettings | None = None,
    init_checkpoint: str | Path | None = None,
    stages_to_train: tuple[str, ...] = ("reasoning", "refinement"),
    progress: bool = True,
) -> TrainReport:
    """Train ``stages_to_train`` and write the safetensors checkpoint ``out`` atomically, plus
    ``out`` with the suffix ``.train.json`` (the report).

    Stages start from ``init_checkpoint`` when its metadata lists them as trained, else from the
    config's seeded init (with the structured embedding init of a fresh stage). The reasoning
    stage trains in two phases, ``reasoning_steps`` then ``canvas_steps``; either may be 0 (the
    canvas phase alone refines a reasoning stage from ``init_checkpoint``)."""
    settings = settings or TrainSettings()
    unknown = set(stages_to_train) - {"reasoning", "refinement"}
    if unknown or not stages_to_train:
        raise TandemError(f"stages to train must be among reasoning, refinement; got {sorted(stages_to_train)}")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise TandemError(f"--out must name a .safetensors file, got {out}")
    vocab = SceneVocabulary(config)  # fails early, with the reason, for configs that cannot hold scenes
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    start = time.perf_counter()
    # Seeded init with the config's checkpoint ignored: training starts from scratch unless asked.
    seeded = config.model_copy(update={"checkpoint": None})
    stages = build_stages(seeded)
    trained: set[str] = set()
    if init_checkpoint is not None:
        loaded = build_stages(seeded, init_checkpoint)
        trained = trained_stages_of(init_checkpoint)
        for name in trained:
            setattr(stages, name, getattr(loaded, name))
    reasoning_report = refinement_report = None
    accuracy = decision_accuracy = None
    if "reasoning" in stages_to_train:
        fresh = "reasoning" not in trained
        if settings.reasoning_steps:
            reasoning_report = train_reasoning(stages.reasoning, vocab, settings, progress, fresh=fresh)
            _round_to_stored(stages.reasoning, settings)
            fresh = False
        if settings.canvas_steps:
            if fresh:
                raise TandemError("the canvas phase refines a trained reasoning stage; give --reasoning-steps or --init")
            canvas = train_reasoning_canvas(stages.reasoning, vocab, settings, progress)
            _round_to_stored(stages.reasoning, settings)
            reasoning_report = _join(reasoning_report, canvas)
        if reasoning_report is None:
            raise TandemError("no reasoning steps to train; give --reasoning-steps or --canvas-steps")
        accuracy, decision_accuracy = teacher_forced_accuracy(
            stages.reasoning, vocab, heldout_captions(vocab.max_caption_bytes, 16)
        )
        log.info("held-out teacher-forced accuracy: tokens %.4f, decisions %.4f", accuracy, decision_accuracy)
        trained.add("reasoning")
    if "refinement" in stages_to_train:
        fresh = "refinement" not in trained
        refinement_report = train_refinement(stages.refinement, vocab, settings, progress, fresh=fresh)
        trained.add("refinement")
    wall = time.perf_counter() - start
    report = TrainReport(
        config.name, settings, reasoning_report, refinement_report, accuracy, decision_accuracy, wall, str(out)
    )
    metadata = {
        "tandem.config": config.name,
        "tandem.config_fingerprint": config.fingerprint(),
        "tandem.data": "synthetic scenes (tandem.data.scenes), train split",
        "tandem.train_settings": json.dumps(asdict(settings)),
        "tandem.train_wall_s": f"{wall:.0f}",
        TRAINED_STAGES_KEY: ",".join(sorted(trained)),
    }
    save_checkpoint(stages, out, settings, metadata)
    from tandem.util import atomic_write_text

    atomic_write_text(out.with_suffix(".train.json"), report.to_json())
    return report


def plot_history(report: TrainReport, path: Path) -> None:
    """Loss curves of the trained stages as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [(n, s) for n, s in (("reasoning", report.reasoning), ("refinement", report.refinement)) if s is not None]
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5), squeeze=False)
    for ax, (name, stage) in zip(axes[0], stages):
        steps, losses = zip(*stage.history)
        ax.plot(steps, losses)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{name}: {stage.steps} steps, {stage.wall_s:.0f} s")
        ax.set_ylabel("cross-entropy" if name == "reasoning" else "L1 + MSE")
        ax.grid(alpha=0.3)
    fig.suptitle(f"tandem train {report.config}")
    fig.tight_layout()
    from tandem.util import atomic_write_path

    with atomic_write_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
