"""`tandem deploy`: the split KServe deployment (per-stage repositories + validated manifests) from a build.

Vocabulary as in every command: ``--artifacts DIR`` is the tandem output folder read (here a finished
``tandem build``), ``--out`` what is written; the deployment YAML is ``--deploy-config`` (``--config``
means the model config everywhere else, and deploy takes that from the build). The old spellings
``--build DIR`` and ``--config DEPLOY.yaml`` are hidden aliases for one release, with a warning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tandem.cli.common import add_alias, add_json_argument, finish
from tandem.errors import EXIT_USAGE, TandemError

DEFAULT_DEPLOY_CONFIG = "configs/deploy/kserve.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deploy",
        help="split deployment bundle: one Triton repository per stage + KServe/Istio manifests, validated offline",
        description="Write <out>/repositories/{reasoning,refinement} and <out>/manifests/kserve.yaml from a finished "
        "`tandem build` output. Upload each repository to its storage URI (<storage.uri>/<model config>/<stage>), create "
        "the storage credentials Secret, then `kubectl apply -f <out>/manifests/kserve.yaml` on a cluster with KServe and "
        "Istio (and Knative Serving for deployment_mode: Serverless).",
    )
    p.add_argument("--artifacts", metavar="DIR", help="a finished `tandem build --out DIR` folder (the model config, "
                   "target and repository options come from it)")
    p.add_argument("--deploy-config", metavar="YAML", help=f"deployment YAML: pools, images, storage, access (default {DEFAULT_DEPLOY_CONFIG})")
    p.add_argument("--out", required=True, help="bundle folder (new, or a bundle this command wrote)")
    add_alias(p, "--build", dest="legacy_build", metavar="DIR")  # before 0.2: the build folder
    add_alias(p, "--config", dest="legacy_config", metavar="YAML")  # before 0.2: the deployment YAML
    add_json_argument(p)
    p.set_defaults(handler=cmd_deploy)
    _json_usage_errors(p)


def _json_usage_errors(p: argparse.ArgumentParser) -> None:
    """Under --json, a usage error argparse finds in deploy's arguments (a missing or unknown flag)
    is printed as the one JSON object too. Installed only where the CLI's parser class keeps
    argparse's own print-and-exit ``error`` (a CLI-wide handler, when there is one, does this)."""
    if type(p).error is not argparse.ArgumentParser.error:
        return

    def error(message: str):
        from tandem.cli.common import emit_json, envelope

        if getattr(p, "_tandem_json", False):
            emit_json(envelope("deploy", EXIT_USAGE, {"error": message}))
        p.print_usage(sys.stderr)
        print(f"{p.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)

    parse_known_args = p.parse_known_args

    def strict_parse_known_args(args=None, namespace=None):
        p._tandem_json = "--json" in (sys.argv[1:] if args is None else args)
        parsed, extras = parse_known_args(args, namespace)
        if extras:  # refused here, not by the top-level parser, so that --json still answers in JSON
            p.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras

    p.error = error
    p.parse_known_args = strict_parse_known_args


def _looks_like_deploy_config(path: Path) -> bool:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and ("pools" in data or "namespace" in data)


def resolve_inputs(args: argparse.Namespace) -> tuple[Path, Path, list[str]]:
    """(build folder, deployment YAML, deprecation warnings) from the flags, old spellings included."""
    notes: list[str] = []
    artifacts = args.artifacts
    if args.legacy_build is not None:
        if artifacts is not None and artifacts != args.legacy_build:
            raise TandemError("both --artifacts and --build given; pass the build folder once, as --artifacts")
        artifacts = args.legacy_build
        notes.append("--build is deprecated (removed in 0.2); use --artifacts DIR, as every other command does")
    if artifacts is None:
        raise TandemError("name the build to deploy: tandem deploy --artifacts BUILD_DIR (a finished `tandem build --out BUILD_DIR`)")
    deploy_config = args.deploy_config
    if args.legacy_config is not None:
        legacy = Path(args.legacy_config)
        if deploy_config is not None:
            raise TandemError(
                f"--config {args.legacy_config} and --deploy-config {deploy_config} both given; the deployment YAML is "
                "--deploy-config, and deploy takes the model config from the build (--artifacts)"
            )
        if not (legacy.is_file() and _looks_like_deploy_config(legacy)):
            raise TandemError(
                f"--config {args.legacy_config!r}: tandem deploy takes the model config from the build (--artifacts); "
                f"name the deployment YAML with --deploy-config (e.g. --deploy-config {DEFAULT_DEPLOY_CONFIG})"
            )
        deploy_config = args.legacy_config
        notes.append("--config for the deployment YAML is deprecated (removed in 0.2); use --deploy-config YAML "
                     "(--config means the model config in every other command)")
    return Path(artifacts), Path(deploy_config or DEFAULT_DEPLOY_CONFIG), notes


def storage_credentials_hint(settings) -> list[str]:
    """How to create the credentials Secret the ServiceAccount names (values from a file, never a command line)."""
    from tandem.deploy.manifests import storage_secret_annotations

    secret = settings.storage.credentials_secret
    if secret is None:
        return []
    ns = settings.namespace
    lines = [f"kubectl -n {ns} create secret generic {secret} --from-env-file=storage.env   "
             "# storage.env: AWS_ACCESS_KEY_ID=... and AWS_SECRET_ACCESS_KEY=... (keep it out of git)"]
    annotations = storage_secret_annotations(settings)
    if annotations:
        lines.append(f"kubectl -n {ns} annotate secret {secret} " + " ".join(f"{k}={v}" for k, v in annotations.items()))
    return lines


def cmd_deploy(args: argparse.Namespace) -> int:
    from tandem.deploy.bundle import MANIFESTS_FILE, write_bundle
    from tandem.deploy.manifests import storage_secret_annotations
    from tandem.deploy.settings import load_settings

    build, deploy_config, notes = resolve_inputs(args)
    for note in notes:
        print(f"tandem deploy: warning: {note}", file=sys.stderr)
    settings = load_settings(deploy_config)
    bundle = write_bundle(build, settings, args.out)
    warnings = notes + bundle.warnings
    for warning in bundle.warnings:
        print(f"tandem deploy: warning: {warning}", file=sys.stderr)
    manifests = bundle.out / MANIFESTS_FILE
    credentials = storage_credentials_hint(settings)
    print(f"tandem deploy: {bundle.config_name} {bundle.target.name} build {build} -> {bundle.out} "
          f"({settings.deployment_mode}{', needs Knative Serving' if settings.deployment_mode == 'Serverless' else ''})")
    for obj, how in zip(bundle.objects, bundle.validated_by):
        print(f"  OK  {obj['kind']:<20} {obj['metadata']['name']:<32} {how}")
    print(f"  request bodies over {bundle.max_request_bytes} bytes are refused (413) at the graph and both predictors")
    print(f"  images: {settings.images.triton}, {settings.images.hop} (build them: README, 'Deploying past one machine')")
    for stage, uri in bundle.storage_uris.items():
        print(f"  repository {stage:<11} {bundle.repository(stage)} -> {uri}")
    if credentials:
        print(f"storage credentials (Secret {settings.storage.credentials_secret}, named by ServiceAccount {settings.storage.service_account}):")
        for line in credentials:
            print(f"  {line}")
    print(f"apply: kubectl apply -f {manifests}")
    return finish(args, {
        "out": str(bundle.out.resolve()),
        "artifacts": str(build.resolve()),
        "deploy_config": str(deploy_config),
        "config": bundle.config_name,
        "target": bundle.target.name,
        "deployment_mode": settings.deployment_mode,
        "manifests": str(manifests.resolve()),
        "repositories": {stage: {"path": str(bundle.repository(stage).resolve()), "storage_uri": uri}
                         for stage, uri in bundle.storage_uris.items()},
        "images": settings.images.model_dump(),
        "max_request_bytes": bundle.max_request_bytes,
        "storage": {
            "service_account": settings.storage.service_account,
            "credentials_secret": settings.storage.credentials_secret,
            "secret_annotations": storage_secret_annotations(settings),
        },
        "objects": [{"kind": o["kind"], "name": o["metadata"]["name"], "validated_by": how}
                    for o, how in zip(bundle.objects, bundle.validated_by)],
        "warnings": warnings,
        "apply": f"kubectl apply -f {manifests}",
    })

