"""Serving commands: repo (write a Triton model repository), serve (run tritonserver over it),
demo (export -> repository -> server -> generate through the ensemble -> PNG -> stop)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tandem.cli.common import (
    DEFAULT_CONFIG, add_alias, add_config_argument, add_decoding_arguments, add_list_argument, default_build_dir, positive_int,
)
from tandem.errors import TandemError

DEFAULT_REPOSITORY = "model_repository"
DEFAULT_ARTIFACTS = str(default_build_dir(DEFAULT_CONFIG))
DEMO_PROMPT = "a red circle above a blue square"


def register(sub: argparse._SubParsersAction) -> None:
    from tandem.serving.repository import FLAVORS

    p = sub.add_parser("repo", help="write a Triton model repository (reasoning, refinement, ensemble tandem) from an export")
    p.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, help=f"an export or a build folder (default {DEFAULT_ARTIFACTS})")
    p.add_argument("--repository", default=DEFAULT_REPOSITORY, help=f"repository folder to write (default {DEFAULT_REPOSITORY})")
    add_alias(p, "--out", dest="repository")
    add_repository_arguments(p, sorted(FLAVORS))
    p.set_defaults(handler=cmd_repo)

    p = sub.add_parser("serve", help="run tritonserver (from nvidia-pytriton) over a model repository until Ctrl-C")
    p.add_argument("--artifacts", help="an export or a build folder: write (a new version of) the repository from it first")
    p.add_argument("--repository", default=DEFAULT_REPOSITORY, help="a model repository or a `tandem build` folder "
                   f"(default {DEFAULT_REPOSITORY})")
    add_repository_arguments(p, sorted(FLAVORS))
    add_listen_arguments(p, defaults=True)
    add_security_arguments(p)
    p.add_argument("--quiet", action="store_true", help="do not echo the server's log")
    p.add_argument("--grace", type=float, default=60.0, metavar="SECONDS", help="on SIGTERM/Ctrl-C, refuse new "
                   "generations and wait this long for those in flight before stopping (default 60); exit status 1 if "
                   "any had to be dropped")
    p.add_argument("--poll", type=int, metavar="SECONDS", help="rescan the repository every SECONDS and serve new "
                   "versions as `tandem repo` writes them (default: load once)")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("demo", help="export (if needed), write the repository, serve, generate through the ensemble, stop")
    add_config_argument(p)
    p.add_argument("--artifacts", help="export folder, reused when it matches the config (default build/<config>)")
    p.add_argument("--repository", default=DEFAULT_REPOSITORY, help=f"model repository to write and serve (default {DEFAULT_REPOSITORY})")
    p.add_argument("--prompt", default=DEMO_PROMPT, help=f"what to draw (default {DEMO_PROMPT!r})")
    p.add_argument("--out", default="build/demo.png", help="PNG to write (default build/demo.png)")
    p.add_argument("--tokens-out", help="also save the served scene tokens (.npy)")
    p.add_argument("--protocol", choices=("http", "grpc"), default="grpc", help="client protocol (default grpc)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0; greedy decoding ignores it)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k best tokens (0 = all)")
    add_listen_arguments(p, defaults=False)
    p.set_defaults(handler=cmd_demo)


def add_repository_arguments(p: argparse.ArgumentParser, flavors: list[str]) -> None:
    add_decoding_arguments(p, "the served reasoning model, with --scheduler inflight")
    g = p.add_argument_group("repository")
    g.add_argument("--flavor", default="local", choices=flavors, help="local: python backend + ONNX Runtime (default); "
                   "native: refinement on Triton's onnxruntime_onnx backend (NVIDIA's container)")
    g.add_argument("--max-batch-size", type=int, default=8, help="batch per model; with --scheduler inflight, the reasoning slots")
    g.add_argument("--scheduler", choices=("inflight", "request"), default="inflight",
                   help="reasoning batching: inflight (requests join and leave the decode batch at every step, default) "
                   "or request (Triton's dynamic batcher groups whole generations)")
    add_list_argument(g, "--preferred-batch-sizes", item_type=positive_int, legacy_spaces=True,
                      help="dynamic batching preferred sizes, comma-separated (e.g. 2,4,8)")
    g.add_argument("--max-queue-delay-us", type=int,
                   help="how long a batch waits to fill: Triton's dynamic batcher (default 5000 for request-level reasoning, "
                   "2000 for a native refinement); under concurrent traffic, the python refinement's render thread and idle "
                   "in-flight reasoning wait up to it (default 10000) while the rest of a wave keeps arriving, so the wave "
                   "runs as one batch")
    g.add_argument("--max-queue-size", type=int, help="waiting prompts (rows) per model before refusing more (default 4 x batch)")
    g.add_argument("--queue-timeout-ms", type=int, default=60_000, help="refuse requests still waiting to start after this "
                   "long (default 60000)")
    g.add_argument("--instances", type=int, default=1, help="model instances per model")
    g.add_argument("--instance-kind", choices=("cpu", "gpu"), help="default: the flavor's")
    g.add_argument("--thread-budget", type=int, metavar="CORES", help="cores the served stages share in time (default: "
                   "the cores this process may use): each stage's ONNX Runtime pool gets them, instances divide them; "
                   "recorded as tandem.threads in each config.pbtxt")
    g.add_argument("--spinning", choices=("always", "run", "never"), default="run", help="how idle ONNX Runtime threads "
                   "wait: spin only inside a run (default), always (ONNX Runtime's default), or never")
    g.add_argument("--intra-op-threads", type=int, default=0, help="ONNX Runtime intra-op threads per session for every "
                   "stage (default 0: from --thread-budget)")
    g.add_argument("--model-version", dest="version", type=int, help="version folder to write (default: next)")
    add_alias(g, "--version", dest="version", type=int)
    g.add_argument("--keep-versions", type=int, default=2, help="newest version folders to keep (default 2)")
    g.add_argument("--link", action="store_true", help="hard-link artifacts instead of copying them (saves disk; the "
                   "repository then shares the export's files: editing one changes both)")


def add_listen_arguments(p: argparse.ArgumentParser, defaults: bool) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--address", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it)")
    g.add_argument("--http-port", type=int, default=8000 if defaults else None, help="default " + ("8000" if defaults else "free"))
    g.add_argument("--grpc-port", type=int, default=8001 if defaults else None, help="default " + ("8001" if defaults else "free"))
    g.add_argument("--metrics-port", type=int, default=8002 if defaults else None, help="default " + ("8002" if defaults else "free"))
    g.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for the models to load")


def add_security_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security (see README, Security)")
    g.add_argument("--tls-cert", help="PEM server certificate: serve gRPC over TLS (clients use grpcs://)")
    g.add_argument("--tls-key", help="PEM private key of --tls-cert")
    g.add_argument("--tls-client-ca", help="PEM CA bundle: mutual TLS, gRPC clients must present a certificate it signed")
    g.add_argument("--http-address", help="bind the plaintext HTTP and metrics endpoints here (default --address); "
                   "e.g. 127.0.0.1 while gRPC with TLS listens on 0.0.0.0")
    g.add_argument("--api-key-file", help="file holding a key every client must send (header tandem-api-key) for "
                   "inference, metadata, model config and statistics; health stays open")
    g.add_argument("--admin-key-file", help="file holding the key (header tandem-admin-key) that opens the admin APIs: "
                   "shared memory, logging, trace, model control (default: closed to everyone)")
    g.add_argument("--open-admin-api", action="store_true", help="leave the admin APIs open to any client "
                   "(unsafe: a client can register shared memory, silence logging, load models)")
    g.add_argument("--max-request-bytes", type=int, help="refuse HTTP bodies and gRPC messages larger than this before "
                   "reading them (default: the largest request the repository's models take, recorded by `tandem repo`)")


def security_options(args: argparse.Namespace) -> dict:
    """TritonServer keyword options from the flags of add_security_arguments."""
    from tandem.serving.security import TLSOptions, admin_restriction, client_restriction, read_key_file

    if bool(args.tls_cert) != bool(args.tls_key):
        raise TandemError("--tls-cert and --tls-key go together: pass the server certificate and its key")
    if args.tls_client_ca and not args.tls_cert:
        raise TandemError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key for the server's own certificate")
    if args.open_admin_api and args.admin_key_file:
        raise TandemError("--open-admin-api and --admin-key-file contradict each other; pass one")
    restrictions = []
    if not args.open_admin_api:
        key = read_key_file(args.admin_key_file, "admin key") if args.admin_key_file else None
        restrictions.append(admin_restriction(key))
    if args.api_key_file:
        restrictions.append(client_restriction(read_key_file(args.api_key_file, "API key")))
    return {
        "tls": TLSOptions(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None,
        "restrictions": tuple(restrictions),
        "http_address": args.http_address,
        "max_request_bytes": args.max_request_bytes,
    }


def repository_options(args: argparse.Namespace) -> dict:
    return {
        "preferred_batch_sizes": tuple(args.preferred_batch_sizes) if args.preferred_batch_sizes else None,
        "max_queue_delay_us": args.max_queue_delay_us,
        "max_queue_size": args.max_queue_size,
        "queue_timeout_ms": args.queue_timeout_ms,
        "instances": args.instances,
        "instance_kind": args.instance_kind,
        "intra_op_threads": args.intra_op_threads,
        "thread_budget": args.thread_budget,
        "spinning": args.spinning,
        "version": args.version,
        "keep_versions": args.keep_versions,
        "link": args.link,
        "scheduler": args.scheduler,
        "decoding": args.decoding,
        "block": args.block,
        "proposer": args.proposer,
    }


def _write(artifacts: str, out: str, args: argparse.Namespace) -> Path:
    from tandem.formats import folders
    from tandem.serving.repository import CONFIG_NAME, existing_versions, parse_config, write_repository

    repo = write_repository(folders.export_dir(artifacts), out, flavor=args.flavor, max_batch_size=args.max_batch_size, **repository_options(args))
    for model in ("reasoning", "refinement", "tandem"):
        config = parse_config(repo / model / CONFIG_NAME)
        kind = config.platform or config.backend
        print(f"  {model:<11} {kind:<17} versions {existing_versions(repo / model)}  {repo / model / CONFIG_NAME}")
    return repo


def cmd_repo(args: argparse.Namespace) -> int:
    print(f"writing {args.flavor} repository from {args.artifacts} to {args.repository}")
    _write(args.artifacts, args.repository, args)
    print(f"serve it with: tandem serve --repository {args.repository}")
    return 0


def _server(repository: str | Path, args: argparse.Namespace, echo: bool):
    from tandem.serving.repository import repository_models
    from tandem.serving.server import TritonServer

    if getattr(args, "poll", None) is not None and args.poll < 1:
        raise TandemError(f"--poll must be at least 1 second, got {args.poll}")
    return TritonServer(
        repository,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        address=args.address,
        startup_timeout=args.startup_timeout,
        echo_log=echo,
        poll_seconds=getattr(args, "poll", None),
        ready_models=repository_models(repository),  # a one-stage repository (tandem deploy) serves its stage
        **(security_options(args) if hasattr(args, "tls_cert") else {}),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    if args.artifacts:
        print(f"writing {args.flavor} repository from {args.artifacts} to {args.repository}")
        _write(args.artifacts, args.repository, args)
    from tandem.formats import folders

    args.repository = str(folders.repository_dir(args.repository))
    server = _server(args.repository, args, echo=not args.quiet)
    print(f"starting tritonserver over {args.repository} ...", flush=True)
    server.start()
    print(
        f"serving {server.repository}\n  HTTP    {server.http_url}\n  gRPC    {server.grpc_url}"
        f"{' (mutual TLS)' if server.tls and server.tls.mutual else ' (TLS)' if server.tls else ''}\n"
        f"  metrics {server.metrics_url}\n  {_exposure(server)}\n"
        f"try: {try_command(server)}\n"
        "Ctrl-C (or SIGTERM) stops the server",
        flush=True,
    )
    report = server.serve_forever(grace_s=args.grace)
    print(report.describe(), flush=True)
    return 0 if report.ok else 1


def try_command(server) -> str:
    """A first command against this server, with the credentials it needs and a model it serves."""
    from tandem.serving.interface import ENSEMBLE, REASONING, REFINEMENT

    credentials = ""
    if server.tls:
        credentials += " --tls-ca CA.pem"
        if server.tls.mutual:
            credentials += " --tls-client-cert CLIENT.pem --tls-client-key CLIENT.key"
    if server.restriction_headers("inference"):
        credentials += " --api-key-file KEY_FILE"
    models = set(server.ready_models)
    if ENSEMBLE in models or not models:
        return f"tandem generate \"{DEMO_PROMPT}\" --server {server.grpc_url}{credentials} --out build/out.png"
    if models == {REASONING}:
        return (f"tandem generate \"{DEMO_PROMPT}\" --server {server.grpc_url} --refinement-server REFINEMENT_URL"
                f"{credentials} --out build/out.png  (this server runs reasoning only)")
    if models == {REFINEMENT}:
        return f"tandem render --tokens TOKENS.npy --server {server.grpc_url}{credentials} --out build/out.png  (refinement only)"
    return f"tandem generate \"{DEMO_PROMPT}\" --server {server.grpc_url}{credentials} --out build/out.png"


def _exposure(server) -> str:
    """One line saying who can reach what; printed at start so an exposed plaintext port is seen."""
    admin = "admin APIs need tandem-admin-key" if server.restriction_headers("shared-memory") else "admin APIs OPEN"
    clients = "; clients need tandem-api-key" if server.restriction_headers("inference") else ""
    public = [name for name, bound in (("gRPC", server.address), ("HTTP+metrics", server.http_address)) if bound not in LOOPBACK]
    reach = f"reachable from other hosts: {', '.join(public)}" if public else "loopback only"
    plaintext = " (HTTP has no TLS: bind it with --http-address 127.0.0.1)" if "HTTP+metrics" in public else ""
    return f"{reach}{plaintext}; {admin}{clients}; requests over {server.max_request_bytes} bytes refused"


LOOPBACK = ("127.0.0.1", "localhost", "::1")


SKIPPED = object()


class _Steps:
    """Model-Navigator-style status lines: every step reports OK, SKIPPED or FAILED with its time."""

    def __init__(self, total: int):
        self.total, self.index = total, 0

    def run(self, title: str, action):
        self.index += 1
        print(f"[{self.index}/{self.total}] {title} ...", flush=True)
        start = time.perf_counter()
        try:
            result = action()
        except BaseException:
            print(f"[{self.index}/{self.total}] {title}: FAILED", flush=True)
            raise
        status = "SKIPPED" if result is SKIPPED else "OK"
        print(f"[{self.index}/{self.total}] {title}: {status} ({time.perf_counter() - start:.1f} s)", flush=True)
        return result


def _export_if_needed(config_name: str, artifacts: str) -> object:
    from tandem.config import load_config
    from tandem.formats.export_manifest import read_manifest
    from tandem.export.onnx_export import export_model

    config = load_config(config_name)
    try:
        manifest = read_manifest(artifacts)
        if manifest.passed and manifest.config_fingerprint == config.fingerprint():
            print(f"  {artifacts} already holds a validated export of {config.name}")
            return SKIPPED
    except TandemError:
        pass
    export_model(config, artifacts)
    return None


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from tandem.cli.core import save_png, save_tokens
    from tandem.serving.client import TandemClient

    if args.artifacts is None:
        from tandem.config import load_config

        args.artifacts = str(default_build_dir(load_config(args.config).name))
    steps = _Steps(6)
    steps.run(f"export {args.config} to {args.artifacts}", lambda: _export_if_needed(args.config, args.artifacts))
    steps.run(
        f"write the local repository to {args.repository}",
        lambda: _write(args.artifacts, args.repository, _repo_defaults()),
    )
    server = _server(args.repository, args, echo=False)
    steps.run("start tritonserver", server.start)
    try:
        print(f"  HTTP {server.http_url}  gRPC {server.grpc_url}")
        url = server.grpc_url if args.protocol == "grpc" else server.http_url

        def generate():
            with TandemClient(url) as client:
                result = client.generate(args.prompt, args.seed, args.temperature, args.top_k)
            tokens, image = result.tokens[0], result.images[0]
            path = save_png(image, args.out)
            print(f"  image {path.resolve()} ({image.shape[1]}x{image.shape[0]}), scene tokens {tokens.shape[0]}x{tokens.shape[1]}")
            if args.tokens_out:
                save_tokens(tokens, args.tokens_out)
                print(f"  scene tokens {args.tokens_out}")
            return np.asarray(tokens)

        served = steps.run(f"generate {args.prompt!r} through the tandem ensemble over {args.protocol}", generate)
    finally:
        steps.run("stop tritonserver", server.stop)

    def compare():
        from tandem.pipeline import Pipeline
        from tandem.runtimes import make_runtime

        local = Pipeline(make_runtime("onnxruntime", artifacts=args.artifacts))
        expected = local.generate(args.prompt, seed=args.seed, temperature=args.temperature, top_k=args.top_k).tokens
        identical = bool(np.array_equal(served, expected))
        print(f"  served scene tokens identical to the in-process pipeline's: {identical}")
        if not identical:
            raise TandemError(f"{int((served != expected).sum())} served scene tokens differ from the in-process pipeline's")

    steps.run("check the served tokens against the in-process pipeline", compare)
    return 0


def _repo_defaults() -> argparse.Namespace:
    """The repository options `tandem repo` uses when given none (flavor local)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_repository_arguments(parser, ["local"])
    return parser.parse_args([])
