"""Core commands: params, export, generate (in-process), render."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from tandem.cli.common import (
    DEFAULT_CONFIG,
    add_config_argument,
    add_decoding_arguments,
    add_json_argument,
    bundled_names,
    check_output_path,
    decoding_summary,
    default_build_dir,
    finish,
    prompt_warning,
    runtime_name,
)
from tandem.errors import TandemError

RUNTIME_HELP = "in-process runtime: onnxruntime (default), torch, tensorrt, neuron, torch_aot, or a build target name (cpu, h100, cpu-aot, ...)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help="print total and active parameters per stage (meta device, nothing allocated)")
    p.add_argument("legacy_config", nargs="?", metavar="CONFIG", help=argparse.SUPPRESS)  # `tandem params seed`
    add_config_argument(p, default=None, help=f"config name ({bundled_names()}) or YAML path")
    add_json_argument(p)
    p.set_defaults(handler=cmd_params)

    p = sub.add_parser("export", help="export both stages to ONNX and validate them against PyTorch")
    add_config_argument(p)
    p.add_argument("--out", help="export folder to write (default build/<config>)")
    p.add_argument("--checkpoint", help="safetensors weights (default: the config's, else seeded init)")
    p.add_argument("--force", action="store_true", help="export again even when --out holds an up-to-date export (same "
                   "config, weights, code and tool versions, files intact), and replace --out even if it holds files an "
                   "export did not write")
    add_json_argument(p)
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("generate", help="prompt -> scene tokens -> PNG, in-process or through a Triton server")
    p.add_argument("prompt", help='what to draw, e.g. "a red circle above a blue square" (1 to 3 coloured shapes and their relations)')
    p.add_argument("--out", default="out.png", help="PNG to write (default out.png)")
    p.add_argument("--tokens-out", help="also save the scene tokens (.npy) for editing and `tandem render`")
    add_runtime_arguments(p)
    add_sampling_arguments(p)
    add_decoding_arguments(p)
    add_client_arguments(p)
    p.add_argument("--refinement-server", metavar="URL", help="split path: --server serves reasoning only and this "
                   "server refinement only (the two hops of `tandem deploy`'s InferenceGraph); credentials apply to both")
    add_json_argument(p)
    p.set_defaults(handler=cmd_generate)

    p = sub.add_parser("render", help="scene tokens (.npy) -> PNG with the refinement stage alone (one PNG per grid)")
    p.add_argument("--tokens", required=True, help=".npy scene tokens: [h, w] or [h*w] for one image, [B, h, w] or [B, h*w] for B")
    p.add_argument("--out", default="render.png", help="PNG to write; a batch writes <stem>-<i>.png (default render.png)")
    add_runtime_arguments(p)
    add_client_arguments(p)
    add_json_argument(p)
    p.set_defaults(handler=cmd_render)


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", default="onnxruntime", help=RUNTIME_HELP)
    p.add_argument("--artifacts", help="any tandem output folder: an export, a `tandem build` folder or its compiled/ "
                   "(default build/<config>)")
    add_config_argument(p, default=None, help="config (name or YAML) for --runtime torch without an export; "
                        f"also names the default --artifacts build/<config> (default {DEFAULT_CONFIG})")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0; greedy decoding ignores it)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k best tokens (0 = all)")


def add_client_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="Triton URL (http://127.0.0.1:8000, grpc://127.0.0.1:8001 or grpcs:// for TLS); "
                   "default in-process")
    p.add_argument("--model", default=None, help="served model name (default: the ensemble / refinement)")
    g = p.add_argument_group("server credentials (grpcs:// and API keys)")
    g.add_argument("--tls-ca", help="PEM CA that signed the server's certificate (default: the system's roots)")
    g.add_argument("--tls-client-cert", help="PEM client certificate, for a server with mutual TLS")
    g.add_argument("--tls-client-key", help="PEM key of --tls-client-cert")
    g.add_argument("--api-key-file", help="file holding the key of a server started with `tandem serve --api-key-file`")


def client_options(args: argparse.Namespace) -> dict:
    """TandemClient keyword options from the credential flags of add_client_arguments."""
    from tandem.serving.security import ClientTLS, read_key_file

    options: dict = {}
    if args.tls_ca or args.tls_client_cert or args.tls_client_key:
        options["tls"] = ClientTLS(args.tls_ca, args.tls_client_cert, args.tls_client_key)
    if args.api_key_file:
        options["api_key"] = read_key_file(args.api_key_file, "API key")
    return options


def cmd_params(args: argparse.Namespace) -> int:
    from tandem.config import load_config
    from tandem.models import count_parameters

    if args.legacy_config and args.config and args.legacy_config != args.config:
        raise TandemError(f"two configs given ({args.legacy_config!r} and --config {args.config!r}); pass one with --config")
    name = args.config or args.legacy_config
    if name is None:
        raise TandemError(f"name a config: tandem params --config seed (bundled: {bundled_names()}, or a YAML path)")
    config = load_config(name)
    counts = count_parameters(config)
    if not args.json:
        print(f"{'stage':<12}{'total':>16}{'active/token':>16}   ({config.name})")
        for c in counts:
            print(f"{c.stage:<12}{c.total:>16,}{c.active:>16,}   ({c.total / 1e9:.3f}B total, {c.active / 1e9:.3f}B active)")
    return finish(args, {
        "config": config.name,
        "stages": [c.__dict__ for c in counts],
        "total": sum(c.total for c in counts),
        "active": sum(c.active for c in counts),
    })


def cmd_export(args: argparse.Namespace) -> int:
    from tandem.config import load_config
    from tandem.export.onnx_export import ExportResult, export_model, up_to_date
    from tandem.preflight import require_memory

    config = load_config(args.config)
    out = Path(args.out) if args.out else default_build_dir(config.name)
    if out.is_file():
        raise TandemError(f"--out {out} is a file; name a folder for the export")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise TandemError(f"--checkpoint {args.checkpoint} does not exist; give a safetensors file (or drop --checkpoint)")
    reused = None if args.force else up_to_date(out, config, args.checkpoint)
    if reused is not None:
        result = ExportResult(out=out, manifest=reused)
        print(f"export of {config.name} in {out} is up to date (same config, weights, code and tool versions; files "
              "intact): reused, nothing exported. --force exports again")
    else:
        require_memory(config, "export")
        result = export_model(config, out, checkpoint=args.checkpoint, force=args.force)
        print(f"exported {config.name} to {result.out} (manifest: {result.out / 'manifest.json'})")
    graphs = {}
    for entry in result.manifest.graphs.values():
        worst = max(err.max_abs for case in entry.validation for err in case.outputs.values())
        worst_ort = max((err.max_abs for case in entry.optimized_validation for err in case.outputs.values()), default=0.0)
        rewrites = f" ({', '.join(entry.optimized_rewrites)})" if entry.optimized_rewrites else ""
        graphs[entry.name] = {
            "file": entry.file,
            "max_abs_error": worst,
            "optimized_file": entry.optimized_file,
            "optimized_rewrites": list(entry.optimized_rewrites),
            "optimized_max_abs_error": worst_ort,
            "passed": entry.passed,
        }
        print(
            f"  {entry.name:<20} max abs err vs PyTorch {worst:.2e}, onnxruntime graph{rewrites} {worst_ort:.2e}  "
            f"within tolerance: {entry.passed}"
        )
    checks = []
    for g in result.manifest.generation_checks:
        print(
            f"  greedy tokens identical to PyTorch ({g.variant} graphs, batch {len(g.prompts)}): {g.tokens_equal}; "
            f"image max diff {g.image_max_abs_diff:.0f}/255"
        )
        checks.append({
            "variant": g.variant, "batch": len(g.prompts), "tokens_equal": g.tokens_equal,
            "image_max_abs_diff": g.image_max_abs_diff,
        })
    return finish(args, {
        "config": config.name,
        "out": str(result.out.resolve()),
        "manifest": str((result.out / "manifest.json").resolve()),
        "passed": result.manifest.passed,
        "reused": reused is not None,
        "graphs": graphs,
        "generation_checks": checks,
    })


def _pipeline(args: argparse.Namespace):
    from tandem.config import load_config
    from tandem.parallel import make_pipeline
    from tandem.preflight import require_memory
    from tandem.runtimes import make_runtime

    runtime = runtime_name(args.runtime)
    config = load_config(args.config) if args.config else None
    decoding = {"decoding": getattr(args, "decoding", "sequential"), "block": getattr(args, "block", None),
                "proposer": getattr(args, "proposer", None)}
    decoding = {k: v for k, v in decoding.items() if v is not None}
    if runtime == "torch" and config is not None:
        require_memory(config, "inference")
        return make_pipeline(make_runtime(runtime, config=config), **decoding)
    artifacts = args.artifacts or default_build_dir(config.name if config else DEFAULT_CONFIG)
    return make_pipeline(make_runtime(runtime, artifacts=artifacts), **decoding)


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


def numbered_paths(path: Path, count: int) -> list[Path]:
    """``out.png`` for one image; ``out-0.png`` ... ``out-<n-1>.png`` for a batch."""
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def cmd_generate(args: argparse.Namespace) -> int:
    check_output_path(args.out, (".png",), "--out")  # refused before generating, not after
    check_output_path(args.tokens_out, (".npy",), "--tokens-out")
    warning = prompt_warning(args.prompt)
    if warning:
        print(f"tandem generate: warning: {warning}", file=sys.stderr, flush=True)
    if (args.server or args.refinement_server) and args.decoding != "sequential":
        raise TandemError("--decoding jacobi runs in-process only; drop --server (the server decodes sequentially)")
    decoding = None
    if args.refinement_server:
        from tandem.deploy.split import SplitClient

        if not args.server:
            raise TandemError("--refinement-server needs --server (the reasoning server of the split path)")
        with SplitClient(args.server, args.refinement_server, **client_options(args)) as client:
            result = client.generate(args.prompt, args.seed, args.temperature, args.top_k)
        tokens, image = result.tokens[0], result.images[0]
    elif args.server:
        from tandem.serving.client import generate_remote

        tokens, image = generate_remote(
            args.server, args.prompt, args.seed, args.temperature, args.top_k, model=args.model, **client_options(args)
        )
    else:
        pipeline = _pipeline(args)
        result = pipeline.generate(args.prompt, seed=args.seed, temperature=args.temperature, top_k=args.top_k)
        tokens, image = result.tokens, result.image
        decoding = decoding_summary(pipeline)
        if decoding:
            print(f"jacobi decoding: {decoding['mean_steps_per_image']:.0f} sequential steps "
                  f"(sequential decoding takes {decoding['sequential_steps_per_image']})")
    path = save_png(image, args.out)
    if args.tokens_out:
        save_tokens(tokens, args.tokens_out)
        print(f"scene tokens: {args.tokens_out}")
    print(f"image: {path.resolve()}")
    return finish(args, {
        "prompt": args.prompt,
        "source": args.server or runtime_name(args.runtime),
        "image": str(path.resolve()),
        "tokens": str(Path(args.tokens_out).resolve()) if args.tokens_out else None,
        "grid": list(np.asarray(tokens).shape),
        "seed": args.seed,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "decoding": decoding or {"decoding": args.decoding},
        "warnings": [warning] if warning else [],
    })


def cmd_render(args: argparse.Namespace) -> int:
    out = check_output_path(args.out, (".png",), "--out")
    tokens = load_tokens(args.tokens)
    if args.server:
        from tandem.serving.client import render_remote

        images = render_remote(args.server, tokens, model=args.model, **client_options(args))
    else:
        images = _pipeline(args).render(tokens)
    paths = [save_png(image, path) for image, path in zip(images, numbered_paths(out, len(images)))]
    for path in paths:
        print(f"image: {path.resolve()}")
    return finish(args, {"source": args.server or runtime_name(args.runtime), "images": [str(p.resolve()) for p in paths]})
