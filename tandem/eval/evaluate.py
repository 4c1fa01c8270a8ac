"""Compositional accuracy of a checkpoint on held-out captions, per runtime, with cross-runtime
agreement.

Every runtime generates greedily (seed 0) from the same held-out captions; an image counts as
correct when :mod:`tandem.eval.checker` finds exactly the caption's objects in the stated
relations. Runtimes must agree exactly: the same scene tokens for every caption.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from tandem.config import ModelConfig
from tandem.data.scenes import SceneVocabulary, heldout_captions
from tandem.errors import ArtifactError, TandemError
from tandem.eval.checker import check_image, check_tokens
from tandem.util import atomic_write_path, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

# (captions) -> (tokens [B, h, w], images [B, H, W, 3] uint8)
GenerateFn = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]


@dataclass
class CaptionResult:
    caption: str
    passed: bool  # the generated image passes the checker
    tokens_passed: bool  # the generated tokens, ideally painted, pass the checker
    reason: str
    tokens: list[list[int]] = field(repr=False)


@dataclass
class RuntimeEval:
    runtime: str
    description: str
    accuracy: float
    token_accuracy: float
    captions: int
    wall_s: float
    results: list[CaptionResult]
    images: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # the first few, for plots

    def summary(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k not in ("results", "images")}
        data["by_objects"] = accuracy_by_objects(self.results)
        data["failures"] = [{"caption": r.caption, "reason": r.reason} for r in self.results if not r.passed]
        return data


@dataclass
class Agreement:
    runtimes: tuple[str, str]
    identical_tokens: int
    captions: int
    identical_verdicts: int

    @property
    def exact(self) -> bool:
        return self.identical_tokens == self.captions


def eval_captions(config: ModelConfig, per_count: int | None = None) -> list[str]:
    """Every held-out caption (the default), or ``per_count`` of each object count for a quick look."""
    return heldout_captions(SceneVocabulary(config).max_caption_bytes, per_count=per_count)


def accuracy_by_objects(results: Sequence["CaptionResult"]) -> dict[str, dict[str, float | int]]:
    """Image accuracy per number of objects in the caption: {"1": {"captions": n, "accuracy": a}, ...}."""
    from tandem.data.scenes import parse_caption

    groups: dict[str, list[bool]] = {}
    for r in results:
        groups.setdefault(str(len(parse_caption(r.caption).objects)), []).append(r.passed)
    return {k: {"captions": len(v), "accuracy": round(sum(v) / len(v), 4)} for k, v in sorted(groups.items())}


def pipeline_generator(pipeline, batch: int = 8) -> GenerateFn:
    from tandem.sampling import SamplingParams

    def generate(captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        tokens = pipeline.generate_tokens(captions, SamplingParams())
        return tokens, pipeline.render(tokens)

    return generate


def server_generator(url: str, model: str | None = None) -> GenerateFn:
    """Through a Triton server: one batched request per chunk to the ensemble (or ``model``)."""
    from tandem.serving.client import TandemClient
    from tandem.serving.interface import ENSEMBLE

    def generate(captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        with TandemClient(url) as client:
            result = client.generate(captions, 0, 0.0, 0, model=model or ENSEMBLE)
            images = result.images if result.images is not None else client.render(result.tokens)
        return np.asarray(result.tokens), np.asarray(images)

    return generate


def evaluate_runtime(
    name: str,
    description: str,
    generate: GenerateFn,
    captions: Sequence[str],
    vocab: SceneVocabulary,
    batch: int = 8,
    progress: bool = True,
    keep_images: int = 12,
) -> RuntimeEval:
    results: list[CaptionResult] = []
    kept: dict[str, np.ndarray] = {}
    start = time.perf_counter()
    bar = tqdm(total=len(captions), desc=f"eval {name}", unit="caption", disable=not progress)
    for i in range(0, len(captions), batch):
        chunk = list(captions[i : i + batch])
        tokens, images = generate(chunk)
        h, w = vocab.height, vocab.width
        tokens = np.asarray(tokens).reshape(len(chunk), h, w)
        for caption, grid, image in zip(chunk, tokens, images):
            on_image = check_image(caption, np.asarray(image), vocab.cell_px)
            on_tokens = check_tokens(caption, grid, vocab)
            results.append(CaptionResult(caption, on_image.passed, on_tokens.passed, on_image.reason, grid.tolist()))
            if len(kept) < keep_images:
                kept[caption] = np.asarray(image)
        bar.update(len(chunk))
    bar.close()
    wall = time.perf_counter() - start
    n = len(results)
    return RuntimeEval(
        runtime=name,
        description=description,
        accuracy=sum(r.passed for r in results) / n,
        token_accuracy=sum(r.tokens_passed for r in results) / n,
        captions=n,
        wall_s=round(wall, 2),
        results=results,
        images=kept,
    )


def agreement(a: RuntimeEval, b: RuntimeEval) -> Agreement:
    if [r.caption for r in a.results] != [r.caption for r in b.results]:
        raise TandemError("runtimes were evaluated on different captions; cannot compare them")
    same = sum(x.tokens == y.tokens for x, y in zip(a.results, b.results))
    verdicts = sum(x.passed == y.passed for x, y in zip(a.results, b.results))
    return Agreement((a.runtime, b.runtime), same, len(a.results), verdicts)


def check_artifacts_match(artifacts: Path, checkpoint: str | None) -> None:
    """The export must hold the weights being evaluated, or the comparison means nothing."""
    from tandem.formats.export_manifest import read_manifest

    manifest = read_manifest(artifacts)
    expected = f"checkpoint:{sha256_file(Path(checkpoint))}" if checkpoint else None
    if expected is not None and manifest.weights != expected:
        raise ArtifactError(
            f"{artifacts} was exported from {manifest.weights}, not from {checkpoint}; export it again: "
            f"tandem export --config {manifest.config.name} --out {artifacts}"
        )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


REPORT_KIND = "tandem eval"  # the report's "report" field and the PNG's "tandem" text chunk: what this command wrote
_LEGACY_REPORT_KEYS = {"config", "checkpoint", "caption_set", "runtimes", "agreement", "all_agree"}  # before REPORT_KIND


def written_by_eval(path: Path) -> bool:
    """Whether ``path`` is a report or samples PNG that ``tandem eval`` wrote (recognised by its
    content: the report's ``"report": "tandem eval"``, or an older report's fields; the PNG's
    ``tandem`` text chunk)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".png":
            from PIL import Image

            with Image.open(path) as image:
                return image.format == "PNG" and image.info.get("tandem") == REPORT_KIND
        data = json.loads(path.read_text())
    except Exception:  # unreadable, not JSON, not an image: not ours
        return False
    return isinstance(data, dict) and (data.get("report") == REPORT_KIND or _LEGACY_REPORT_KEYS <= set(data))


def check_outputs_owned(*paths: Path | None) -> None:
    """Refuse (before any work, and again at write time) to overwrite a file ``tandem eval`` did not write."""
    for path in paths:
        if path is not None and Path(path).exists() and not written_by_eval(Path(path)):
            raise TandemError(
                f"{path} exists and is not a file tandem eval wrote; refusing to overwrite it. "
                "Choose another --out/--plot, or move the file away"
            )


def write_report(
    path: Path,
    config: ModelConfig,
    checkpoint: str | None,
    runs: list[RuntimeEval],
    agreements: list[Agreement],
    per_count: int | None = None,
) -> dict:
    import os

    check_outputs_owned(path)
    report = {
        "report": REPORT_KIND,
        "config": config.name,
        "checkpoint": Path(checkpoint).name if checkpoint else None,
        "checkpoint_sha256": sha256_file(Path(checkpoint)) if checkpoint else None,
        "captions": runs[0].captions if runs else 0,
        "caption_set": "held-out synthetic captions (tandem.data.scenes.heldout_captions), never trained on"
        + ("" if per_count is None else f"; {per_count} per object count"),
        "sampling": "greedy, seed 0",
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "runtimes": {run.runtime: run.summary() for run in runs},
        "agreement": [{**asdict(a), "exact": a.exact} for a in agreements],
        "all_agree": all(a.exact for a in agreements),
    }
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    return report


def plot_samples(path: Path, run: RuntimeEval, count: int = 12) -> None:
    """A contact sheet of generated images with their captions and verdicts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = run.images
    chosen = [r for r in run.results if r.caption in images][:count]
    cols = 4
    rows = max(1, (len(chosen) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, r in zip(axes.ravel(), chosen):
        ax.imshow(images[r.caption], interpolation="nearest")
        words = r.caption.split(" ")
        title = " ".join(words[: len(words) // 2]) + "\n" + " ".join(words[len(words) // 2 :])
        ax.set_title(("PASS  " if r.passed else "FAIL  ") + title, fontsize=7, color="black" if r.passed else "red")
    fig.suptitle(f"{run.runtime}: held-out accuracy {run.accuracy:.1%} ({run.captions} captions)")
    fig.tight_layout()
    check_outputs_owned(path)
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80, metadata={"tandem": REPORT_KIND})
    plt.close(fig)
