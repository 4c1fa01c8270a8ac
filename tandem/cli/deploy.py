"""`tandem deploy`: the split KServe deployment (per-stage repositories + validated manifests) from a build."""

from __future__ import annotations

import argparse

DEFAULT_DEPLOY_CONFIG = "configs/deploy/kserve.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deploy",
        help="split deployment bundle: one Triton repository per stage + KServe/Istio manifests, validated offline",
        description="Write <out>/repositories/{reasoning,refinement} and <out>/manifests/kserve.yaml from a finished "
        "`tandem build` output. Upload each repository to its pool's storage_uri, then `kubectl apply -f "
        "<out>/manifests/kserve.yaml` on a cluster with KServe and Istio.",
    )
    p.add_argument("--build", required=True, help="a finished `tandem build --out DIR` directory")
    p.add_argument("--config", default=DEFAULT_DEPLOY_CONFIG, help=f"deployment YAML (default {DEFAULT_DEPLOY_CONFIG})")
    p.add_argument("--out", required=True, help="bundle folder (new, or a bundle this command wrote)")
    p.set_defaults(handler=cmd_deploy)


def cmd_deploy(args: argparse.Namespace) -> int:
    from tandem.deploy.bundle import MANIFESTS_FILE, write_bundle
    from tandem.deploy.settings import load_settings

    settings = load_settings(args.config)
    bundle = write_bundle(args.build, settings, args.out)
    print(f"tandem deploy: {bundle.target.name} build {args.build} -> {bundle.out}")
    for obj, how in zip(bundle.objects, bundle.validated_by):
        print(f"  OK  {obj['kind']:<20} {obj['metadata']['name']:<28} {how}")
    for stage in ("reasoning", "refinement"):
        print(f"  repository {stage:<11} {bundle.repository(stage)} -> {settings.pool(stage).storage_uri}")
    print(f"apply: kubectl apply -f {bundle.out / MANIFESTS_FILE}")
    return 0
