"""Core commands: params, export, generate (in-process), render."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from tandem.errors import TandemError

DEFAULT_CONFIG = "configs/models/small.yaml"
DEFAULT_ARTIFACTS = "build/small"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help="print total and active parameters per stage (meta device, nothing allocated)")
    p.add_argument("config", help="config name (tiny, small, seed) or YAML path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_params)

    p = sub.add_parser("export", help="export both stages to ONNX and validate them against PyTorch")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"config name or YAML path (default {DEFAULT_CONFIG})")
    p.add_argument("--out", default=DEFAULT_ARTIFACTS, help=f"artifact directory (default {DEFAULT_ARTIFACTS})")
    p.add_argument("--checkpoint", help="safetensors weights (default: the config's, else seeded init)")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("generate", help="prompt -> scene tokens -> PNG, in-process or through a Triton server")
    p.add_argument("prompt")
    p.add_argument("--out", default="out.png", help="PNG to write (default out.png)")
    p.add_argument("--tokens-out", help="also save the scene tokens (.npy) for editing and `tandem render`")
    p.add_argument("--runtime", default="onnxruntime", help="in-process runtime: onnxruntime or torch")
    p.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, help="export directory for in-process runtimes")
    p.add_argument("--config", help="config for --runtime torch without an export (name or YAML)")
    add_sampling_arguments(p)
    add_server_arguments(p)
    p.set_defaults(handler=cmd_generate)

    p = sub.add_parser("render", help="scene tokens (.npy) -> PNG with the refinement stage alone")
    p.add_argument("--tokens", required=True, help=".npy file of scene tokens [h, w]")
    p.add_argument("--out", default="render.png")
    p.add_argument("--runtime", default="onnxruntime")
    p.add_argument("--artifacts", default=DEFAULT_ARTIFACTS)
    p.add_argument("--config", help="config for --runtime torch without an export")
    add_server_arguments(p)
    p.set_defaults(handler=cmd_render)


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k best tokens (0 = all)")


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="Triton URL (http://127.0.0.1:8000 or grpc://127.0.0.1:8001); default in-process")
    p.add_argument("--model", default=None, help="served model name (default: the ensemble / refinement)")


def cmd_params(args: argparse.Namespace) -> int:
    from tandem.config import load_config
    from tandem.models import count_parameters

    config = load_config(args.config)
    counts = count_parameters(config)
    if args.json:
        print(json.dumps([c.__dict__ for c in counts]))
    else:
        print(f"{'stage':<12}{'total':>16}{'active/token':>16}   ({config.name})")
        for c in counts:
            print(f"{c.stage:<12}{c.total:>16,}{c.active:>16,}   ({c.total / 1e9:.3f}B total, {c.active / 1e9:.3f}B active)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tandem.config import load_config
    from tandem.export.onnx_export import export_model

    config = load_config(args.config)
    result = export_model(config, args.out, checkpoint=args.checkpoint)
    print(f"exported {config.name} to {result.out} (manifest: {result.out / 'manifest.json'})")
    for entry in result.manifest.graphs.values():
        worst = max(err.max_abs for case in entry.validation for err in case.outputs.values())
        worst_ort = max((err.max_abs for case in entry.optimized_validation for err in case.outputs.values()), default=0.0)
        rewrites = f" ({', '.join(entry.optimized_rewrites)})" if entry.optimized_rewrites else ""
        print(
            f"  {entry.name:<20} max abs err vs PyTorch {worst:.2e}, onnxruntime graph{rewrites} {worst_ort:.2e}  "
            f"within tolerance: {entry.passed}"
        )
    for g in result.manifest.generation_checks:
        print(
            f"  greedy tokens identical to PyTorch ({g.variant} graphs, batch {len(g.prompts)}): {g.tokens_equal}; "
            f"image max diff {g.image_max_abs_diff:.0f}/255"
        )
    return 0


def _pipeline(args: argparse.Namespace):
    from tandem.config import load_config
    from tandem.pipeline import Pipeline
    from tandem.runtimes import make_runtime

    config = load_config(args.config) if args.config else None
    artifacts = args.artifacts if (args.runtime != "torch" or config is None) else None
    return Pipeline(make_runtime(args.runtime, artifacts=artifacts, config=config))


def save_png(image: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    from tandem.util import atomic_write_path

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise TandemError(f"--out must name a .png file, got {path}")
    with atomic_write_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path


def load_tokens(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise TandemError(f"tokens file {path} does not exist; write one with `tandem generate --tokens-out`")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise TandemError(f"{path} is not a .npy array of scene tokens ({exc})") from exc


def save_tokens(tokens: np.ndarray, path: str | Path) -> None:
    from tandem.util import atomic_write_path

    path = Path(path)
    with atomic_write_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, tokens)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.server:
        from tandem.serving.client import generate_remote

        tokens, image = generate_remote(args.server, args.prompt, args.seed, args.temperature, args.top_k, model=args.model)
    else:
        result = _pipeline(args).generate(args.prompt, seed=args.seed, temperature=args.temperature, top_k=args.top_k)
        tokens, image = result.tokens, result.image
    path = save_png(image, args.out)
    if args.tokens_out:
        save_tokens(tokens, args.tokens_out)
        print(f"scene tokens: {args.tokens_out}")
    print(f"image: {path.resolve()}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    tokens = load_tokens(args.tokens)
    if args.server:
        from tandem.serving.client import render_remote

        image = render_remote(args.server, tokens, model=args.model)
    else:
        image = _pipeline(args).render(tokens)[0]
    path = save_png(image, args.out)
    print(f"image: {path.resolve()}")
    return 0
