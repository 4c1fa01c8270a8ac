"""Train both stages of a config on synthetic scenes, on the CPU, with a fixed seed.

Reasoning stage: teacher forcing. The input is ``[BOS, caption bytes, BOI, scene token 0 .. 254]``
and the logits at position ``p`` predict the token at ``p + 1``: the logits at BOI predict scene
token 0, exactly as :meth:`ReasoningTransformer.prefill` does at generation time, and scene token
``t`` sits at position ``prompt_len + t`` as in :meth:`decode_step`.

The MoE layers are evaluated grouped by expert (each expert runs only on the tokens routed to
it): the same function as the module's dense evaluation, with the same gradients, at a quarter of
the expert FLOPs (top-2 of 8). :func:`reasoning_hidden` is checked against
``ReasoningTransformer.forward`` in tests/test_train.py. A small Switch-style load-balancing loss
keeps every expert in use, so the served checkpoint routes like a real MoE.

Refinement stage: ground-truth token grids -> the Pillow render, L1 + MSE on pixels.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tandem.config import ModelConfig
from tandem.data.scenes import COLOURS, SHAPES, SceneVocabulary, heldout_captions, sample_captions
from tandem.errors import TandemError
from tandem.models import Stages, build_stages, save_weights
from tandem.models.reasoning import MoEFeedForward, ReasoningTransformer
from tandem.tokenizer import PAD, SCENE_OFFSET, encode

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class TrainSettings:
    reasoning_steps: int = 700
    reasoning_batch: int = 8
    reasoning_lr: float = 2e-3
    focus_steps: int = 400  # phase 2 of the reasoning stage: see train_reasoning_focus
    focus_batch: int = 16
    focus_lr: float = 1e-3
    focus_weight: float = 20.0  # extra loss weight of an object's first cell
    refinement_steps: int = 1000
    refinement_batch: int = 8
    refinement_lr: float = 5e-3
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


def reasoning_batch(vocab: SceneVocabulary, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing ids [B, S] and targets [B, S] (codebook ids, IGNORE where nothing is
    predicted). Rows are right-padded; the causal mask keeps padding out of real positions."""
    max_prompt = vocab.config.reasoning.max_prompt_len
    rows, targets = [], []
    for caption in captions:
        prompt = encode(caption, max_prompt)
        scene = vocab.caption_tokens(caption).reshape(-1).astype(np.int64)
        rows.append(np.concatenate([prompt, scene[:-1] + SCENE_OFFSET]))
        target = np.full(len(rows[-1]), IGNORE, dtype=np.int64)
        target[len(prompt) - 1 :] = scene  # logits at BOI predict scene token 0
        targets.append(target)
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), PAD, dtype=np.int64)
    tgt = np.full((len(rows), width), IGNORE, dtype=np.int64)
    for i, (r, t) in enumerate(zip(rows, targets)):
        ids[i, : len(r)] = r
        tgt[i, : len(t)] = t
    return torch.from_numpy(ids), torch.from_numpy(tgt)


def _sinusoid(values: np.ndarray, dim: int) -> np.ndarray:
    """[n] -> [n, dim] sin/cos features at geometric frequencies, RMS 1."""
    freqs = np.exp(np.linspace(np.log(0.15), np.log(3.0), dim // 2))
    angles = values[:, None] * freqs[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1) * math.sqrt(2.0)


def init_scene_embeddings(model: ReasoningTransformer, vocab: SceneVocabulary, rng: np.random.Generator) -> None:
    """Give scene-token input embeddings the structure the data has, so training starts from
    geometry instead of rediscovering it: a background token's embedding encodes its row and
    column (sinusoids), an object token's its shape, colour and footprint row/column."""
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
    from tandem.data.scenes import FOOTPRINT, SceneObject

    for si, shape in enumerate(SHAPES):
        for ci, colour in enumerate(COLOURS):
            for fr in range(FOOTPRINT):
                for fc in range(FOOTPRINT):
                    token = vocab.object_token(SceneObject(colour, shape), fr, fc)
                    code = np.concatenate([rows[fr], cols[fc]]) + shape_codes[si] + colour_codes[ci]
                    table[SCENE_OFFSET + token] = scale * code / math.sqrt(3.0)
    with torch.no_grad():
        model.token_embedding.weight.copy_(torch.from_numpy(table.astype(np.float32)))


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimizer(module: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(module.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)


def train_reasoning(
    model: ReasoningTransformer,
    vocab: SceneVocabulary,
    settings: TrainSettings,
    progress: bool = True,
    fresh: bool = True,
) -> StageReport:
    rng = np.random.Generator(np.random.PCG64(settings.seed))
    if fresh:
        init_scene_embeddings(model, vocab, rng)
    model.train().requires_grad_(True)
    optimizer = _optimizer(model, settings.reasoning_lr)
    total = settings.reasoning_steps
    start = time.perf_counter()
    smoothed, history = None, []
    bar = tqdm(range(total), desc="train reasoning", unit="step", disable=not progress, mininterval=5.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = settings.reasoning_lr * _schedule(step, total, settings.warmup_steps)
        captions = sample_captions(rng, settings.reasoning_batch, vocab.max_caption_bytes, split="train")
        ids, targets = reasoning_batch(vocab, captions)
        hidden, balance = reasoning_hidden(model, ids)
        mask = targets != IGNORE
        logits = model.lm_head(hidden[mask])
        loss = F.cross_entropy(logits, targets[mask])
        total_loss = loss + settings.load_balance_weight * balance
        optimizer.zero_grad(set_to_none=True)
        total_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = float(loss)
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        if step % 10 == 0 or step == total - 1:
            history.append((step, smoothed))
            bar.set_postfix(loss=f"{smoothed:.4f}", balance=f"{float(balance) / len(model.blocks):.3f}")
            if not progress:
                log.info("reasoning step %d/%d loss %.4f", step, total, smoothed)
    model.eval().requires_grad_(False)
    return StageReport(total, time.perf_counter() - start, smoothed or float("nan"), history)


def focus_batch(vocab: SceneVocabulary, captions: list[str], weight: float):
    """Phase-2 batch: each row cut just after its last object's first cell (every later token
    is a copy the model has already learned), and per-token loss weights that single out the
    first cell of each object: the one token where the stage decides which caption object, with
    which colour and shape, comes next in raster order."""
    ids, targets = reasoning_batch(vocab, captions)
    weights = torch.ones(targets.shape, dtype=torch.float32)
    first = torch.zeros(targets.shape, dtype=torch.bool)
    for token in range(vocab.object_offset, vocab.object_offset + vocab.n_object_tokens):
        kind = vocab.describe_token(token)
        if kind[3] == 0 and kind[4] == 0:
            first |= targets == token
    weights[first] += weight
    positions = torch.arange(targets.shape[1]).expand_as(targets)
    last = torch.where(first, positions, torch.zeros_like(positions)).max(dim=1).values
    targets = torch.where(positions <= last.unsqueeze(1), targets, torch.full_like(targets, IGNORE))
    width = int(last.max()) + 1
    return ids[:, :width], targets[:, :width], weights[:, :width]


def train_reasoning_focus(
    model: ReasoningTransformer, vocab: SceneVocabulary, settings: TrainSettings, progress: bool = True
) -> StageReport:
    """Phase 2 of the reasoning stage. After phase 1 every token but an object's first cell is
    right (background, footprint copies, row starts, exits: >98% teacher-forced), while the first
    cell, which binds a caption object to a place, is right about half the time. This phase trains
    on that decision: truncated rows (half the compute per caption), twice the captions per
    step, the decision weighted up, a fresh optimizer and its own data stream."""
    rng = np.random.Generator(np.random.PCG64(settings.seed + 2))
    model.train().requires_grad_(True)
    optimizer = _optimizer(model, settings.focus_lr)
    total = settings.focus_steps
    start = time.perf_counter()
    smoothed, history = None, []
    bar = tqdm(range(total), desc="train reasoning (focus)", unit="step", disable=not progress, mininterval=5.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = settings.focus_lr * _schedule(step, total, settings.warmup_steps)
        captions = sample_captions(rng, settings.focus_batch, vocab.max_caption_bytes, split="train")
        ids, targets, weights = focus_batch(vocab, captions, settings.focus_weight)
        hidden, balance = reasoning_hidden(model, ids)
        mask = targets != IGNORE
        losses = F.cross_entropy(model.lm_head(hidden[mask]), targets[mask], reduction="none")
        loss = (losses * weights[mask]).sum() / weights[mask].sum()
        total_loss = loss + settings.load_balance_weight * balance
        optimizer.zero_grad(set_to_none=True)
        total_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = float(loss)
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        if step % 10 == 0 or step == total - 1:
            history.append((step, smoothed))
            bar.set_postfix(loss=f"{smoothed:.4f}", balance=f"{float(balance) / len(model.blocks):.3f}")
            if not progress:
                log.info("reasoning focus step %d/%d loss %.4f", step, total, smoothed)
    model.eval().requires_grad_(False)
    return StageReport(total, time.perf_counter() - start, smoothed or float("nan"), history)


@torch.no_grad()
def first_cell_accuracy(model: ReasoningTransformer, vocab: SceneVocabulary, captions: list[str]) -> float:
    """Teacher-forced accuracy on objects' first cells alone (the binding decisions)."""
    correct = count = 0
    for i in range(0, len(captions), 8):
        ids, targets, weights = focus_batch(vocab, captions[i : i + 8], 1.0)
        hidden, _ = reasoning_hidden(model, ids)
        decisions = weights > 1.0
        predicted = model.lm_head(hidden[decisions]).argmax(-1)
        correct += int((predicted == targets[decisions]).sum())
        count += int(decisions.sum())
    return correct / max(1, count)


@torch.no_grad()
def teacher_forced_accuracy(model: ReasoningTransformer, vocab: SceneVocabulary, captions: list[str]) -> float:
    correct = count = 0
    for i in range(0, len(captions), 8):
        ids, targets = reasoning_batch(vocab, captions[i : i + 8])
        hidden, _ = reasoning_hidden(model, ids)
        mask = targets != IGNORE
        predicted = model.lm_head(hidden[mask]).argmax(-1)
        correct += int((predicted == targets[mask]).sum())
        count += int(mask.sum())
    return correct / max(1, count)


# --- refinement -----------------------------------------------------------------------------------


def init_refinement_embeddings(model: torch.nn.Module, vocab: SceneVocabulary, rng: np.random.Generator) -> None:
    """Start the painter from what each token means: its colour (RGB), shape, footprint row and
    column (one-hot), plus small noise; otherwise 240 object ids, each seen in a few percent of
    images, must first discover that 48 of them share a colour."""
    from tandem.data.scenes import BACKGROUND_RGB, FOOTPRINT

    weight = model.token_embedding.weight
    dim = weight.shape[1]
    features = 8 + 2 * FOOTPRINT  # rgb(3) + object flag + shape one-hot(3) + spare, fr/fc one-hot
    if dim < features + 4:
        return  # too narrow to structure; keep the seeded init
    table = rng.standard_normal(weight.shape)  # the seeded init's scale, structure added on top
    for token in range(vocab.codebook_size):
        kind = vocab.describe_token(token)
        if kind[0] == "background":
            rgb = BACKGROUND_RGB
        elif kind[0] == "object":
            _, colour, shape, fr, fc = kind
            rgb = COLOURS[colour]
            table[token, 3] += 3.0
            table[token, 4 + SHAPES.index(shape)] += 3.0
            table[token, 8 + fr] += 3.0
            table[token, 8 + FOOTPRINT + fc] += 3.0
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
    from tandem.data.scenes import BACKGROUND_RGB

    background = torch.tensor(BACKGROUND_RGB, dtype=torch.float32).view(1, 3, 1, 1) / 255.0
    model.train().requires_grad_(True)
    optimizer = _optimizer(model, settings.refinement_lr)
    total = settings.refinement_steps
    start = time.perf_counter()
    smoothed, history = None, []
    bar = tqdm(range(total), desc="train refinement", unit="step", disable=not progress, mininterval=5.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = settings.refinement_lr * _schedule(step, total, settings.warmup_steps)
        captions = sample_captions(rng, settings.refinement_batch, vocab.max_caption_bytes, split="train")
        tokens, images = refinement_batch(vocab, captions)
        predicted = model(tokens)
        # Objects cover about a tenth of the pixels; weight them up so colour and shape are not
        # drowned by the background.
        weight = 1.0 + settings.object_pixel_weight * (images != background).any(dim=1, keepdim=True)
        error = (predicted - images).abs()
        loss = ((error + error * error) * weight).mean() / weight.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = float(loss)
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        if step % 10 == 0 or step == total - 1:
            history.append((step, smoothed))
            bar.set_postfix(loss=f"{smoothed:.4f}")
            if not progress:
                log.info("refinement step %d/%d loss %.4f", step, total, smoothed)
    model.eval().requires_grad_(False)
    return StageReport(total, time.perf_counter() - start, smoothed or float("nan"), history)


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
    stage trains in two phases, ``reasoning_steps`` then ``focus_steps`` (either may be 0)."""
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
    accuracy = None
    if "reasoning" in stages_to_train:
        fresh = "reasoning" not in trained
        if settings.reasoning_steps:
            reasoning_report = train_reasoning(stages.reasoning, vocab, settings, progress, fresh=fresh)
            _round_to_stored(stages.reasoning, settings)
            fresh = False
        if settings.focus_steps:
            if fresh:
                raise TandemError("the focus phase refines a trained reasoning stage; give --reasoning-steps or --init")
            focus = train_reasoning_focus(stages.reasoning, vocab, settings, progress)
            _round_to_stored(stages.reasoning, settings)
            reasoning_report = _join(reasoning_report, focus)
        accuracy = teacher_forced_accuracy(stages.reasoning, vocab, heldout_captions(vocab.max_caption_bytes, 8))
        log.info("held-out teacher-forced token accuracy %.4f", accuracy)
        trained.add("reasoning")
    if "refinement" in stages_to_train:
        fresh = "refinement" not in trained
        refinement_report = train_refinement(stages.refinement, vocab, settings, progress, fresh=fresh)
        trained.add("refinement")
    wall = time.perf_counter() - start
    report = TrainReport(config.name, settings, reasoning_report, refinement_report, accuracy, wall, str(out))
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


def _join(first: StageReport | None, second: StageReport) -> StageReport:
    """One report for both reasoning phases; the second phase's steps follow the first's."""
    if first is None:
        return second
    offset = first.steps
    return StageReport(
        steps=first.steps + second.steps,
        wall_s=first.wall_s + second.wall_s,
        final_loss=second.final_loss,
        history=first.history + [(offset + step, loss) for step, loss in second.history],
    )


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
