"""Training and evaluation commands: train (both stages on synthetic scenes), eval (held-out
compositional accuracy per runtime, with cross-runtime agreement)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tandem.cli.common import (
    add_config_argument,
    add_decoding_arguments,
    add_json_argument,
    add_list_argument,
    bundled_names,
    check_output_path,
    decoding_summary,
    default_build_dir,
    finish,
    runtime_name,
)
from tandem.errors import EXIT_CHECK_FAILED, EXIT_OK, TandemError

# Nothing tracked is written by default: checkpoints/ and benchmarks/results/ only when named with --out.
DEFAULT_CHECKPOINT = "build/checkpoints/{config}.safetensors"
DEFAULT_EVAL_OUT = "build/eval-{config}.json"
# The default sample: this many held-out captions per object count (the same ones every run), a few
# minutes on 2 CPU cores; --full evaluates the whole held-out pool (hours) and says so first.
DEFAULT_PER_COUNT = 8


def register(sub: argparse._SubParsersAction) -> None:
    from tandem.train.trainer import TrainSettings

    d = TrainSettings()
    p = sub.add_parser("train", help="train both stages on synthetic scenes (CPU, fixed seed) -> safetensors checkpoint")
    add_config_argument(p)
    p.add_argument("--out", help=f"checkpoint to write (default {DEFAULT_CHECKPOINT})")
    p.add_argument("--stages", default="reasoning,refinement", help="comma-separated stages to train (default both)")
    p.add_argument("--init", help="start from this checkpoint (the stages not trained keep its weights)")
    p.add_argument(
        "--reasoning-steps", type=int, default=d.reasoning_steps, help="reasoning phase 1: plans and whole rows"
    )
    p.add_argument("--canvas-steps", type=int, default=d.canvas_steps, help="reasoning phase 2: whole rows")
    p.add_argument("--refinement-steps", type=int, default=d.refinement_steps, help=f"refinement training steps (default {d.refinement_steps})")
    p.add_argument("--batch", type=int, help="captions per batch everywhere (default: the recipe's, see TrainSettings)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"training seed: data order and initial weights (default {d.seed})")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    p.add_argument(
        "--dtype", default=d.stored_dtype, choices=["float16", "float32"], help="dtype stored in the checkpoint"
    )
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("eval", help="held-out compositional accuracy per runtime; runtimes must agree token for token")
    add_config_argument(p, help=f"config: a bundled name ({bundled_names()}) or a YAML path; its checkpoint is evaluated (default small)")
    add_list_argument(
        p,
        "--runtime",
        help="runtimes, comma-separated (default torch,onnxruntime); all but torch read --artifacts",
    )
    add_list_argument(p, "--runtimes", dest="runtime", help=argparse.SUPPRESS)  # old spelling
    p.add_argument("--artifacts", help="an export or a build folder (default build/<config>)")
    p.add_argument("--checkpoint", help="weights for the torch runtime (default: the config's)")
    p.add_argument("--server", help="also evaluate the served ensemble at this Triton URL (http://... or grpc://...)")
    p.add_argument("--model", help="served model name (default: the ensemble)")
    sample = p.add_mutually_exclusive_group()
    sample.add_argument(
        "--per-count", type=int, default=None, metavar="N",
        help=f"held-out captions per object count, the same ones every run (default {DEFAULT_PER_COUNT}: minutes on 2 cores)",
    )
    sample.add_argument(
        "--full", action="store_true",
        help="every held-out caption (thousands: hours on 2 cores; the estimate is printed before starting)",
    )
    p.add_argument("--out", help=f"JSON report (default {DEFAULT_EVAL_OUT})")
    p.add_argument("--plot", help="PNG contact sheet of generated samples (default: beside --out)")
    add_decoding_arguments(p)
    p.add_argument("--min-accuracy", type=float, metavar="FRACTION",
                   help="exit 1 when any runtime's held-out image accuracy is below this (0..1, e.g. 0.9)")
    add_json_argument(p)
    p.set_defaults(handler=cmd_eval)


def cmd_train(args: argparse.Namespace) -> int:
    from tandem.config import load_config
    from tandem.train.trainer import TrainSettings, plot_history, train_model

    from tandem.preflight import require_memory

    config = load_config(args.config)
    out = check_output_path(args.out or DEFAULT_CHECKPOINT.format(config=config.name), (".safetensors",), "--out")
    require_memory(config, "train")
    for name, least in (("reasoning_steps", 0), ("canvas_steps", 0), ("refinement_steps", 1), ("batch", 1), ("threads", 1)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            raise TandemError(f"--{name.replace('_', '-')} must be at least {least}")
    settings = TrainSettings(
        reasoning_steps=args.reasoning_steps,
        canvas_steps=args.canvas_steps,
        refinement_steps=args.refinement_steps,
        seed=args.seed,
        threads=args.threads,
        stored_dtype=args.dtype,
    )
    if args.batch is not None:
        settings.reasoning_batch = settings.plan_batch = settings.canvas_batch = args.batch
        settings.refinement_batch = args.batch
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    report = train_model(config, out, settings, init_checkpoint=args.init, stages_to_train=stages)
    plot = out.with_suffix(".train.png")
    plot_history(report, plot)
    print(f"checkpoint: {out} ({out.stat().st_size / 1e6:.1f} MB, {settings.stored_dtype})")
    print(f"report: {out.with_suffix('.train.json')}  loss curves: {plot}")
    for name, stage in (("reasoning", report.reasoning), ("refinement", report.refinement)):
        if stage is not None:
            print(f"  {name:<11} {stage.steps} steps in {stage.wall_s:.0f} s, final loss {stage.final_loss:.4f}")
    if report.heldout_token_accuracy is not None:
        print(
            f"  held-out teacher-forced accuracy: {report.heldout_token_accuracy:.2%} of tokens, "
            f"{report.heldout_decision_accuracy:.2%} of object-placement decisions"
        )
    print(f"  total {report.wall_s:.0f} s")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tandem.formats import folders
    from tandem.config import load_config
    from tandem.data.scenes import SceneVocabulary
    from tandem.eval.evaluate import (
        agreement,
        check_artifacts_match,
        eval_captions,
        evaluate_runtime,
        pipeline_generator,
        plot_samples,
        server_generator,
        write_report,
    )
    from tandem.parallel import make_pipeline
    from tandem.preflight import require_memory, require_server
    from tandem.runtimes import make_runtime
    from tandem.serving.interface import ENSEMBLE

    config = load_config(args.config or "small")
    vocab = SceneVocabulary(config)
    checkpoint = args.checkpoint or config.checkpoint
    if checkpoint is None:
        raise TandemError(
            f"config {config.name!r} names no checkpoint, so there is nothing trained to evaluate; "
            "pass --checkpoint or train one with `tandem train`"
        )
    if not Path(checkpoint).exists():
        raise TandemError(f"checkpoint {checkpoint} does not exist; train it with `tandem train --out {checkpoint}`")
    runtimes = list(dict.fromkeys(runtime_name(name) for name in (args.runtime or ["torch", "onnxruntime"])))
    if args.per_count is not None and args.per_count < 1:
        raise TandemError("--per-count must be at least 1")
    if args.min_accuracy is not None and not 0.0 <= args.min_accuracy <= 1.0:
        raise TandemError(f"--min-accuracy is a fraction between 0 and 1 (e.g. 0.9), got {args.min_accuracy}")
    out = check_output_path(args.out or DEFAULT_EVAL_OUT.format(config=config.name), (".json",), "--out")
    plot = check_output_path(args.plot or out.with_suffix(".png"), (".png",), "--plot")
    # Cheap checks before minutes of generation: artifacts, memory, the server.
    artifacts = Path(args.artifacts) if args.artifacts else default_build_dir(config.name)
    if any(name != "torch" for name in runtimes):
        export = folders.export_dir(artifacts)
        check_artifacts_match(export, checkpoint)
    if "torch" in runtimes:
        require_memory(config, "inference")
    if args.server:
        require_server(args.server, args.model or ENSEMBLE)
    per_count = None if args.full else (args.per_count or DEFAULT_PER_COUNT)
    captions = eval_captions(config, per_count)
    pool = len(eval_captions(config, None))
    sources = []  # (name, description, generate), built before anything is evaluated
    pipelines = {}
    for name in runtimes:
        if name == "torch":
            runtime = make_runtime("torch", config=config, checkpoint=checkpoint)
        else:
            runtime = make_runtime(name, artifacts=artifacts)
            if runtime.config.fingerprint() != config.fingerprint():
                raise TandemError(f"{artifacts} was exported for another config; export {config.name} again")
        pipeline = make_pipeline(runtime, args.decoding, args.block, args.proposer)
        pipelines[name] = pipeline
        sources.append((name, runtime.describe(), pipeline_generator(pipeline)))
    if args.server:
        sources.append(("triton", f"Triton ensemble at {args.server}", server_generator(args.server, args.model)))
    if per_count is None:
        # The whole pool takes long: time one batch of 8 per runtime here, say how long, then start.
        seconds = 0.0
        for _name, _description, generate in sources:
            t0 = time.monotonic()
            generate(captions[:8])
            seconds += (time.monotonic() - t0) / len(captions[:8])
        minutes = seconds * pool / 60
        print(f"tandem eval: the whole held-out pool, {pool:,} captions x {len(sources)} runtime(s): about "
              f"{minutes / 60:.1f} h ({minutes:.0f} min) at this machine's pace just measured (drop --full for a sample "
              f"of {DEFAULT_PER_COUNT} per object count)", file=sys.stderr, flush=True)
    else:
        print(f"tandem eval: {len(captions)} of the {pool:,} held-out captions ({per_count} per object count; "
              "--per-count N for more, --full for every one)", file=sys.stderr, flush=True)
    runs = [evaluate_runtime(name, description, generate, captions, vocab) for name, description, generate in sources]
    agreements = [agreement(runs[0], other) for other in runs[1:]]
    report = write_report(out, config, checkpoint, runs, agreements, per_count=per_count)
    plot_samples(plot, runs[0])
    print(f"held-out compositional accuracy ({len(captions)} captions, greedy):")
    for run in runs:
        counts = "  ".join(
            f"{k} object{'s' if k != '1' else ''}: {v['accuracy']:.2%} of {v['captions']}"
            for k, v in run.summary()["by_objects"].items()
        )
        print(f"  {run.runtime:<12} image {run.accuracy:7.2%}   tokens {run.token_accuracy:7.2%}   ({run.wall_s:.0f} s)   {counts}")
    for a in agreements:
        print(f"  {a.runtimes[0]} vs {a.runtimes[1]}: identical tokens for {a.identical_tokens}/{a.captions} captions")
    decoding = {name: decoding_summary(p) for name, p in pipelines.items() if decoding_summary(p)}
    for name, d in decoding.items():
        print(f"  {name:<12} jacobi decoding: {d['mean_steps_per_image']:.1f} sequential steps per image on average "
              f"(at most {d['max_steps_per_image']}; sequential decoding takes {d['sequential_steps_per_image']})")
    print(f"report: {out}  samples: {plot}")
    if args.verbose:
        print(json.dumps(report, indent=2))
    checks = [
        {
            "name": f"{a.runtimes[0]} and {a.runtimes[1]} agree",
            "ok": a.exact,
            "detail": f"identical tokens for {a.identical_tokens}/{a.captions} captions",
        }
        for a in agreements
    ]
    if args.min_accuracy is not None:
        checks += [
            {
                "name": f"{run.runtime} accuracy >= {args.min_accuracy:.2%}",
                "ok": run.accuracy >= args.min_accuracy,
                "detail": f"{run.accuracy:.2%} of {run.captions} held-out captions",
            }
            for run in runs
        ]
    failed = [c for c in checks if not c["ok"]]
    for check in failed:
        print(f"tandem eval: check failed: {check['name']}: {check['detail']}", file=sys.stderr)
    payload = {
        "config": config.name,
        "report": str(out.resolve()),
        "plot": str(plot.resolve()),
        "captions": len(captions),
        "runtimes": {run.runtime: {"accuracy": run.accuracy, "token_accuracy": run.token_accuracy, "wall_s": run.wall_s}
                     for run in runs},
        "all_agree": report["all_agree"],
        "decoding": decoding or {"decoding": args.decoding},
        "min_accuracy": args.min_accuracy,
        "checks": checks,
    }
    if failed:
        payload["error"] = "; ".join(f"check failed: {c['name']}: {c['detail']}" for c in failed)
    return finish(args, payload, EXIT_CHECK_FAILED if failed else EXIT_OK)
