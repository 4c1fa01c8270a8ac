"""The split deployment's Kubernetes objects, built from typed models (never string templates).

Core kinds (Namespace, ServiceAccount, PodDisruptionBudget, containers, probes, resources,
security contexts, volumes, tolerations) are the ``kubernetes`` client's models; KServe kinds (ServingRuntime, InferenceService, InferenceGraph)
are the ``kserve`` SDK's models; Istio kinds are dicts checked by :mod:`tandem.deploy.istio`.
Every object is serialised with the kubernetes client's ``sanitize_for_serialization`` (camelCase
keys, no nulls) and validated offline by :mod:`tandem.deploy.validate` before it is written.

Topology::

    client -> InferenceGraph (Sequence)
                 1. reasoning pool:  <name>-reasoning  (Triton, reasoning only)  /v2/models/reasoning/infer
                 2. refinement pool: <name>-refinement (hop transformer -> Triton, refinement only)
                    the hop turns reasoning's v2 response into refinement's request and returns
                    image + scene_tokens (tandem.deploy.hop)
    every hop: Istio mutual TLS (PeerAuthentication STRICT + DestinationRule ISTIO_MUTUAL)
    who may call: AuthorizationPolicies (allow-nothing by default; the router -> reasoning predictor and
                  refinement transformer, the transformer -> refinement predictor, access.graph_callers -> graph)
    body size:    EnvoyFilters (Envoy's buffer filter) cap request bodies at the graph and both predictors
                  to the repositories' recorded tandem.max_request_bytes

Every pod runs as a numeric non-root user with a read-only root filesystem, no privilege escalation,
every capability dropped and the RuntimeDefault seccomp profile; /tmp (and Triton's /dev/shm) are
size-limited emptyDirs; CPU and memory requests equal their limits.
"""

from __future__ import annotations

from typing import Any

from tandem.formats.targets import Target
from tandem.deploy import istio
from tandem.deploy.sdk import kserve_api_client, kserve_models, kubernetes_models
from tandem.deploy.settings import DeploySettings, Pool
from tandem.serving.interface import REASONING, REFINEMENT

STAGES = (REASONING, REFINEMENT)
HTTP_PORT, METRICS_PORT = 8080, 8002  # gRPC is off: the graph and the hop speak the v2 REST protocol only
MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts the stage's repository
# Extended resource per replica, by the build target's device.
ACCELERATOR_RESOURCE = {"cuda": "nvidia.com/gpu", "neuron": "aws.amazon.com/neuron"}
PART_OF = "tandem"


def _labels(settings: DeploySettings, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/part-of": PART_OF, "app.kubernetes.io/instance": settings.name, "tandem.io/component": component}


def service_name(settings: DeploySettings, stage: str) -> str:
    return f"{settings.name}-{stage}"


def runtime_name(settings: DeploySettings, stage: str) -> str:
    return f"{settings.name}-triton-{stage}"


def model_format(stage: str) -> str:
    return f"tandem-{stage}"


def _meta(settings: DeploySettings, name: str, component: str, annotations: dict[str, str] | None = None):
    k8s = kubernetes_models()

    return k8s.V1ObjectMeta(name=name, namespace=settings.namespace, labels=_labels(settings, component), annotations=annotations)


def _resources(cpu: str, memory: str, accelerator: tuple[str, int] | None = None):
    """Requests equal to limits for CPU and memory (Guaranteed QoS: no noisy neighbour takes a replica's share)."""
    k8s = kubernetes_models()

    requests = {"cpu": cpu, "memory": memory}
    limits = {"cpu": cpu, "memory": memory}
    if accelerator is not None:
        limits[accelerator[0]] = str(accelerator[1])  # extended resources: limits only (requests default to them)
    return k8s.V1ResourceRequirements(requests=requests, limits=limits)


def _tolerations(pool: Pool):
    k8s = kubernetes_models()

    return [k8s.V1Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect) for t in pool.tolerations] or None


TMP_VOLUME, SHM_VOLUME = "tmp", "dshm"


def container_security(settings: DeploySettings):
    """Non-root (numeric uid/gid), read-only root filesystem, no privilege escalation, no capabilities."""
    k8s = kubernetes_models()

    return k8s.V1SecurityContext(
        run_as_non_root=True,
        run_as_user=settings.security.run_as_user,
        run_as_group=settings.security.run_as_group,
        read_only_root_filesystem=True,
        allow_privilege_escalation=False,
        privileged=False,
        capabilities=k8s.V1Capabilities(drop=["ALL"]),
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
    )


def pod_security(settings: DeploySettings):
    k8s = kubernetes_models()

    return k8s.V1PodSecurityContext(
        run_as_non_root=True,
        run_as_user=settings.security.run_as_user,
        run_as_group=settings.security.run_as_group,
        fs_group=settings.security.run_as_group,
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
    )


def _scratch(tmp: str, shm: str | None = None) -> tuple[list, list]:
    """(volumes, mounts): the only writable paths. /tmp for Python and Triton's scratch files; /dev/shm,
    memory-backed, for the python backend's shared-memory tensors (counted in the memory limit)."""
    k8s = kubernetes_models()

    volumes = [k8s.V1Volume(name=TMP_VOLUME, empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=tmp))]
    mounts = [k8s.V1VolumeMount(name=TMP_VOLUME, mount_path="/tmp")]
    if shm is not None:
        volumes.append(k8s.V1Volume(name=SHM_VOLUME, empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=shm)))
        mounts.append(k8s.V1VolumeMount(name=SHM_VOLUME, mount_path="/dev/shm"))
    return volumes, mounts


def _scratch_env() -> list:
    """Python and anything reading $HOME write under /tmp (the root filesystem is read-only); no bytecode written."""
    k8s = kubernetes_models()

    return [
        k8s.V1EnvVar(name="HOME", value="/tmp"),
        k8s.V1EnvVar(name="TMPDIR", value="/tmp"),
        k8s.V1EnvVar(name="PYTHONDONTWRITEBYTECODE", value="1"),
    ]


def _health_probes(port: int) -> dict[str, Any]:
    """Readiness and liveness on the KServe v2 / Triton health endpoints."""
    k8s = kubernetes_models()

    return {
        "readiness_probe": k8s.V1Probe(
            http_get=k8s.V1HTTPGetAction(path="/v2/health/ready", port=port), period_seconds=5, failure_threshold=3, timeout_seconds=2
        ),
        "liveness_probe": k8s.V1Probe(
            http_get=k8s.V1HTTPGetAction(path="/v2/health/live", port=port),
            initial_delay_seconds=30, period_seconds=10, failure_threshold=3, timeout_seconds=2,
        ),
    }


ADMIN_KEY_ENV = "TANDEM_ADMIN_KEY"


def admin_secret_name(settings: DeploySettings) -> str:
    return f"{settings.name}-triton-admin"


def triton_args(stage: str) -> list[str]:
    """tritonserver over this stage's repository only, HTTP only (the graph and the hop speak v2 REST;
    a Knative revision exposes one port, so gRPC stays off rather than declared and unreachable).
    Repository control (load/unload) stays off (--model-control-mode=none); the APIs no client needs
    (shared memory, logging, trace, model repository: tandem.serving.security.ADMIN_APIS) need a key
    from a Secret nobody is told, as single-server `tandem serve` does (Kubernetes expands $(VAR) in
    args from the container's env, so the key is not in the manifest's args);
    --log-verbose=0 keeps request contents out of the log."""
    from tandem.serving.security import ADMIN_APIS, ADMIN_KEY_HEADER

    admin = f"{','.join(ADMIN_APIS)}:{ADMIN_KEY_HEADER}=$({ADMIN_KEY_ENV})"
    return [
        "tritonserver",
        f"--model-repository={MODEL_DIR}",
        "--allow-http=true",
        f"--http-port={HTTP_PORT}",
        "--allow-grpc=false",
        f"--metrics-port={METRICS_PORT}",
        "--allow-metrics=true",
        "--model-control-mode=none",
        "--strict-readiness=true",
        "--exit-on-error=true",
        "--exit-timeout-secs=30",
        "--log-verbose=0",
        "--log-info=true",
        f"--http-restricted-api={admin}",
    ]


def admin_secret(settings: DeploySettings, key: str):
    """The key behind Triton's admin APIs: random per bundle, never printed (the APIs stay closed)."""
    k8s = kubernetes_models()
    return k8s.V1Secret(
        api_version="v1", kind="Secret", type="Opaque",
        metadata=k8s.V1ObjectMeta(name=admin_secret_name(settings), namespace=settings.namespace, labels=_labels(settings, "admin-key")),
        string_data={"key": key},
    )


def namespace(settings: DeploySettings):
    k8s = kubernetes_models()

    labels = {**_labels(settings, "namespace"), "istio-injection": "enabled"}  # sidecars: mTLS on every hop
    return k8s.V1Namespace(api_version="v1", kind="Namespace", metadata=k8s.V1ObjectMeta(name=settings.namespace, labels=labels))


CONTAINER = "kserve-container"  # KServe merges the predictor's model spec into the runtime's container of this name


def serving_runtime(settings: DeploySettings, stage: str, target: Target):
    K = kserve_models()
    k8s = kubernetes_models()

    pool = settings.pool(stage)
    volumes, mounts = _scratch(pool.tmp, pool.shm)
    container = k8s.V1Container(
        name=CONTAINER,
        image=settings.images.triton,
        args=triton_args(stage),
        env=[k8s.V1EnvVar(name=ADMIN_KEY_ENV, value_from=k8s.V1EnvVarSource(
            secret_key_ref=k8s.V1SecretKeySelector(name=admin_secret_name(settings), key="key"))), *_scratch_env()],
        ports=[k8s.V1ContainerPort(container_port=HTTP_PORT, name="http1", protocol="TCP")],
        security_context=container_security(settings),
        volume_mounts=mounts,
        **_health_probes(HTTP_PORT),
    )
    spec = K.V1alpha1ServingRuntimeSpec(
        supported_model_formats=[K.V1alpha1SupportedModelFormat(name=model_format(stage), version="1", auto_select=True)],
        protocol_versions=["v2"],
        containers=[container],
        volumes=volumes,
        annotations={"prometheus.kserve.io/port": str(METRICS_PORT), "prometheus.kserve.io/path": "/metrics"},
    )
    return K.V1alpha1ServingRuntime(
        api_version="serving.kserve.io/v1alpha1",
        kind="ServingRuntime",
        metadata=_meta(settings, runtime_name(settings, stage), f"runtime-{stage}"),
        spec=spec,
    )


def _accelerator(target: Target, pool: Pool) -> tuple[str, int] | None:
    resource = ACCELERATOR_RESOURCE.get(target.device)
    return (resource, pool.accelerators) if resource else None


def inference_service(settings: DeploySettings, stage: str, target: Target, config_name: str):
    K = kserve_models()
    k8s = kubernetes_models()

    pool = settings.pool(stage)
    predictor = K.V1beta1PredictorSpec(
        service_account_name=settings.storage.service_account,  # KServe's storage initializer reads its secrets
        security_context=pod_security(settings),
        min_replicas=pool.replicas.min,
        max_replicas=pool.replicas.max,
        scale_metric=pool.autoscaling.metric,
        scale_target=pool.autoscaling.target,
        node_selector=dict(pool.node_selector),
        tolerations=_tolerations(pool),
        timeout=settings.graph.timeout_seconds,
        model=K.V1beta1ModelSpec(
            name=CONTAINER,  # the runtime container this spec is merged into (the SDK's default is '')
            model_format=K.V1beta1ModelFormat(name=model_format(stage), version="1"),
            runtime=runtime_name(settings, stage),
            protocol_version="v2",
            storage_uri=settings.storage.stage_uri(config_name, stage),
            resources=_resources(pool.cpu, pool.memory, _accelerator(target, pool)),
        ),
    )
    transformer = None
    if stage == REFINEMENT:
        hop = settings.hop
        volumes, mounts = _scratch(hop.tmp)
        transformer = K.V1beta1TransformerSpec(
            min_replicas=hop.replicas.min,
            max_replicas=hop.replicas.max,
            timeout=settings.graph.timeout_seconds,
            service_account_name=settings.hop_service_account,  # its own identity: the one refinement's predictor admits
            security_context=pod_security(settings),
            volumes=volumes,
            containers=[
                k8s.V1Container(
                    name=CONTAINER,
                    image=settings.images.hop,
                    command=["python", "-m", "tandem.deploy.hop"],
                    args=[f"--model_name={REFINEMENT}", "--predictor_protocol=v2"],
                    env=_scratch_env(),
                    resources=_resources(hop.cpu, hop.memory),
                    security_context=container_security(settings),
                    volume_mounts=mounts,
                    **_health_probes(HTTP_PORT),
                )
            ],
        )
    annotations = {"serving.kserve.io/deploymentMode": settings.deployment_mode, "sidecar.istio.io/inject": "true"}
    return K.V1beta1InferenceService(
        api_version="serving.kserve.io/v1beta1",
        kind="InferenceService",
        metadata=_meta(settings, service_name(settings, stage), stage, annotations),
        spec=K.V1beta1InferenceServiceSpec(predictor=predictor, transformer=transformer),
    )


def _cluster_url(settings: DeploySettings, service: str, path: str) -> str:
    return f"http://{service}.{settings.namespace}.svc.cluster.local{path}"


def inference_graph(settings: DeploySettings):
    K = kserve_models()

    reasoning, refinement = service_name(settings, REASONING), service_name(settings, REFINEMENT)
    steps = [
        K.V1alpha1InferenceStep(
            name=REASONING,
            service_url=_cluster_url(settings, f"{reasoning}-predictor", f"/v2/models/{REASONING}/infer"),
            data="$request",
        ),
        K.V1alpha1InferenceStep(  # the hop's v1 route takes reasoning's v2 response body as it is
            name=REFINEMENT,
            service_url=_cluster_url(settings, f"{refinement}-transformer", f"/v1/models/{REFINEMENT}:predict"),
            data="$response",
        ),
    ]
    return K.V1alpha1InferenceGraph(
        api_version="serving.kserve.io/v1alpha1",
        kind="InferenceGraph",
        metadata=_meta(settings, settings.name, "graph", {
            "serving.kserve.io/deploymentMode": settings.deployment_mode, "sidecar.istio.io/inject": "true"}),
        spec=K.V1alpha1InferenceGraphSpec(
            nodes={"root": K.V1alpha1InferenceRouter(router_type="Sequence", steps=steps)},
            timeout=settings.graph.timeout_seconds,
            # the identity the predictors and the hop admit; KServe gives the router container a
            # non-root, read-only, no-capabilities securityContext of its own (the spec has no field for it)
            service_account_name=settings.graph_service_account,
            resources=_resources(settings.graph.cpu, settings.graph.memory),
        ),
    )


def disruption_budget(settings: DeploySettings, stage: str):
    """Node drains never take a pool below one serving replica."""
    k8s = kubernetes_models()

    return k8s.V1PodDisruptionBudget(
        api_version="policy/v1",
        kind="PodDisruptionBudget",
        metadata=_meta(settings, f"{service_name(settings, stage)}-predictor", f"pdb-{stage}"),
        spec=k8s.V1PodDisruptionBudgetSpec(
            min_available=1,
            selector=k8s.V1LabelSelector(
                match_labels={"serving.kserve.io/inferenceservice": service_name(settings, stage), "component": "predictor"}
            ),
        ),
    )


def service_account(settings: DeploySettings, name: str, component: str, secrets: list[str] | None = None):
    """A pod identity without an API token (nothing here talks to the Kubernetes API). ``secrets``:
    the storage credentials KServe's storage initializer mounts, by name only (you create the Secret)."""
    k8s = kubernetes_models()

    return k8s.V1ServiceAccount(
        api_version="v1", kind="ServiceAccount",
        metadata=_meta(settings, name, component),
        automount_service_account_token=False,
        secrets=[k8s.V1ObjectReference(name=secret) for secret in secrets] if secrets else None,
    )


def storage_secret_annotations(settings: DeploySettings) -> dict[str, str]:
    """The annotations KServe reads from the credentials Secret (S3 endpoint, region, TLS)."""
    s3 = settings.storage.s3
    if s3 is None or not settings.storage.uri.startswith("s3://"):
        return {}
    return {
        "serving.kserve.io/s3-endpoint": s3.endpoint,
        "serving.kserve.io/s3-region": s3.region,
        "serving.kserve.io/s3-usehttps": "1" if s3.use_https else "0",
        "serving.kserve.io/s3-verifyssl": "1" if s3.verify_ssl else "0",
    }


# Pod labels KServe puts on each workload (serving.kserve.io/inferenceservice + component, and
# serving.kserve.io/inferencegraph on the router's pods): what the policies select.
def graph_selector(settings: DeploySettings) -> dict[str, str]:
    return {"serving.kserve.io/inferencegraph": settings.name}


def component_selector(settings: DeploySettings, stage: str, component: str) -> dict[str, str]:
    return {"serving.kserve.io/inferenceservice": service_name(settings, stage), "component": component}


KNATIVE_NAMESPACE = "knative-serving"  # Serverless: the activator forwards requests, the autoscaler probes


def access_policies(settings: DeploySettings) -> list[dict]:
    """Deny by default, then allow exactly: access.graph_callers (+ the graph's own account) -> graph;
    graph -> reasoning predictor and refinement transformer; transformer -> refinement predictor.
    In Serverless mode Knative's activator (namespace knative-serving) sits in the request path and
    must be admitted to every workload (Knative's documented requirement)."""
    ns, access = settings.namespace, settings.access
    graph = access.principal(ns, settings.graph_service_account)
    hop = access.principal(ns, settings.hop_service_account)
    knative = [KNATIVE_NAMESPACE] if settings.deployment_mode == "Serverless" else []
    labels = _labels(settings, "access")
    callers = list(dict.fromkeys([graph, *access.graph_callers.principals]))
    return [
        istio.authorization_policy(f"{settings.name}-deny-by-default", ns, labels, None),
        istio.authorization_policy(
            f"{settings.name}-graph-callers", ns, labels, graph_selector(settings),
            principals=callers, namespaces=list(dict.fromkeys([*access.graph_callers.namespaces, *knative])),
        ),
        istio.authorization_policy(
            f"{settings.name}-reasoning-callers", ns, labels, component_selector(settings, REASONING, "predictor"),
            principals=[graph], namespaces=knative,
        ),
        istio.authorization_policy(
            f"{settings.name}-hop-callers", ns, labels, component_selector(settings, REFINEMENT, "transformer"),
            principals=[graph], namespaces=knative,
        ),
        istio.authorization_policy(
            f"{settings.name}-refinement-callers", ns, labels, component_selector(settings, REFINEMENT, "predictor"),
            principals=[hop], namespaces=knative,
        ),
    ]


def body_limits(settings: DeploySettings, max_request_bytes: int) -> list[dict]:
    """413 for a request body over ``max_request_bytes`` at the graph (where clients come in) and at
    both predictors (what reaches Triton), sized from the repositories' recorded limit."""
    ns, labels = settings.namespace, _labels(settings, "body-limit")
    return [
        istio.request_size_limit(f"{settings.name}-graph-body-limit", ns, labels, graph_selector(settings), max_request_bytes),
        *(
            istio.request_size_limit(
                f"{service_name(settings, stage)}-body-limit", ns, labels, component_selector(settings, stage, "predictor"), max_request_bytes
            )
            for stage in STAGES
        ),
    ]


def serialize(obj: Any) -> dict:
    """A typed model -> the dict kubectl applies (camelCase keys, nulls dropped)."""
    if isinstance(obj, dict):
        return obj
    return kserve_api_client()().sanitize_for_serialization(obj)  # camelCase via each model's attribute_map


def build_objects(
    settings: DeploySettings, target: Target, config_name: str, max_request_bytes: int, admin_key: str | None = None
) -> list[dict]:
    """Every object of the deployment, in apply order (namespace, mesh and access policy first).
    ``config_name`` (the build's model config) names the storage path of each stage;
    ``max_request_bytes`` (the repositories' recorded tandem.max_request_bytes) sizes the body limit;
    ``admin_key`` defaults to a fresh random one."""
    import secrets

    mesh_labels = _labels(settings, "mtls")
    storage_secrets = [settings.storage.credentials_secret] if settings.storage.credentials_secret else None
    objects: list[Any] = [
        namespace(settings),
        istio.peer_authentication(settings.namespace, mesh_labels),
        istio.destination_rule(f"{settings.name}-mtls", settings.namespace, mesh_labels),
        *access_policies(settings),
        *body_limits(settings, max_request_bytes),
        service_account(settings, settings.storage.service_account, "storage", storage_secrets),
        service_account(settings, settings.graph_service_account, "graph"),
        service_account(settings, settings.hop_service_account, "hop"),
        admin_secret(settings, admin_key or secrets.token_urlsafe(32)),
    ]
    for stage in STAGES:
        objects.append(serving_runtime(settings, stage, target))
    for stage in STAGES:
        objects.append(inference_service(settings, stage, target, config_name))
        if settings.pool(stage).replicas.min >= 2:  # a PDB with minAvailable 1 over one replica would block drains
            objects.append(disruption_budget(settings, stage))
    objects.append(inference_graph(settings))
    return [serialize(o) for o in objects]
