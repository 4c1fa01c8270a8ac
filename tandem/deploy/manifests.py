"""The split deployment's Kubernetes objects, built from typed models (never string templates).

Core kinds (Namespace, PodDisruptionBudget, containers, probes, resources, tolerations) are the
``kubernetes`` client's models; KServe kinds (ServingRuntime, InferenceService, InferenceGraph)
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
"""

from __future__ import annotations

from typing import Any

from tandem.formats.targets import Target
from tandem.deploy import istio
from tandem.deploy.sdk import kserve_api_client, kserve_models, kubernetes_models
from tandem.deploy.settings import DeploySettings, Pool
from tandem.serving.interface import REASONING, REFINEMENT

STAGES = (REASONING, REFINEMENT)
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8080, 9000, 8002
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
    k8s = kubernetes_models()

    requests = {"cpu": cpu, "memory": memory}
    limits = {"memory": memory}
    if accelerator is not None:
        limits[accelerator[0]] = str(accelerator[1])  # extended resources: limits only (requests default to them)
    return k8s.V1ResourceRequirements(requests=requests, limits=limits)


def _tolerations(pool: Pool):
    k8s = kubernetes_models()

    return [k8s.V1Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect) for t in pool.tolerations] or None


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
    """tritonserver over this stage's repository only. Repository control (load/unload) stays off
    (--model-control-mode=none); the APIs no client needs (shared memory, logging, trace, model
    repository: tandem.serving.security.ADMIN_APIS) need a key from a Secret nobody is told, as
    single-server `tandem serve` does (Kubernetes expands $(VAR) in args from the container's env);
    --log-verbose=0 keeps request contents out of the log."""
    from tandem.serving.security import ADMIN_APIS, ADMIN_KEY_HEADER

    admin = f"{','.join(ADMIN_APIS)}:{ADMIN_KEY_HEADER}=$({ADMIN_KEY_ENV})"
    return [
        "tritonserver",
        f"--model-repository={MODEL_DIR}",
        f"--http-port={HTTP_PORT}",
        f"--grpc-port={GRPC_PORT}",
        f"--metrics-port={METRICS_PORT}",
        "--allow-metrics=true",
        "--model-control-mode=none",
        "--strict-readiness=true",
        "--exit-on-error=true",
        "--exit-timeout-secs=30",
        "--log-verbose=0",
        "--log-info=true",
        f"--http-restricted-api={admin}",
        f"--grpc-restricted-protocol={admin}",
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


def serving_runtime(settings: DeploySettings, stage: str, target: Target):
    K = kserve_models()
    k8s = kubernetes_models()

    container = k8s.V1Container(
        name="kserve-container",
        image=settings.images.triton,
        args=triton_args(stage),
        env=[k8s.V1EnvVar(name=ADMIN_KEY_ENV, value_from=k8s.V1EnvVarSource(
            secret_key_ref=k8s.V1SecretKeySelector(name=admin_secret_name(settings), key="key")))],
        ports=[k8s.V1ContainerPort(container_port=HTTP_PORT, name="http1", protocol="TCP")],
        **_health_probes(HTTP_PORT),
    )
    spec = K.V1alpha1ServingRuntimeSpec(
        supported_model_formats=[K.V1alpha1SupportedModelFormat(name=model_format(stage), version="1", auto_select=True)],
        protocol_versions=["v2", "grpc-v2"],
        containers=[container],
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


def inference_service(settings: DeploySettings, stage: str, target: Target):
    K = kserve_models()
    k8s = kubernetes_models()

    pool = settings.pool(stage)
    predictor = K.V1beta1PredictorSpec(
        min_replicas=pool.replicas.min,
        max_replicas=pool.replicas.max,
        scale_metric=pool.autoscaling.metric,
        scale_target=pool.autoscaling.target,
        node_selector=dict(pool.node_selector),
        tolerations=_tolerations(pool),
        timeout=settings.graph.timeout_seconds,
        model=K.V1beta1ModelSpec(
            model_format=K.V1beta1ModelFormat(name=model_format(stage), version="1"),
            runtime=runtime_name(settings, stage),
            protocol_version="v2",
            storage_uri=pool.storage_uri,
            resources=_resources(pool.cpu, pool.memory, _accelerator(target, pool)),
        ),
    )
    transformer = None
    if stage == REFINEMENT:
        hop = settings.hop
        transformer = K.V1beta1TransformerSpec(
            min_replicas=hop.replicas.min,
            max_replicas=hop.replicas.max,
            timeout=settings.graph.timeout_seconds,
            containers=[
                k8s.V1Container(
                    name="kserve-container",
                    image=settings.images.hop,
                    command=["python", "-m", "tandem.deploy.hop"],
                    args=[f"--model_name={REFINEMENT}", "--predictor_protocol=v2"],
                    resources=_resources(hop.cpu, hop.memory),
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
        metadata=_meta(settings, settings.name, "graph", {"sidecar.istio.io/inject": "true"}),
        spec=K.V1alpha1InferenceGraphSpec(
            nodes={"root": K.V1alpha1InferenceRouter(router_type="Sequence", steps=steps)},
            timeout=settings.graph.timeout_seconds,
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


def serialize(obj: Any) -> dict:
    """A typed model -> the dict kubectl applies (camelCase keys, nulls dropped)."""
    if isinstance(obj, dict):
        return obj
    return kserve_api_client()().sanitize_for_serialization(obj)  # camelCase via each model's attribute_map


def build_objects(settings: DeploySettings, target: Target, admin_key: str | None = None) -> list[dict]:
    """Every object of the deployment, in apply order (namespace and mesh policy first). ``admin_key``
    defaults to a fresh random one."""
    import secrets

    mesh_labels = _labels(settings, "mtls")
    objects: list[Any] = [
        namespace(settings),
        istio.peer_authentication(settings.namespace, mesh_labels),
        istio.destination_rule(f"{settings.name}-mtls", settings.namespace, mesh_labels),
        admin_secret(settings, admin_key or secrets.token_urlsafe(32)),
    ]
    for stage in STAGES:
        objects.append(serving_runtime(settings, stage, target))
    for stage in STAGES:
        objects.append(inference_service(settings, stage, target))
        if settings.pool(stage).replicas.min >= 2:  # a PDB with minAvailable 1 over one replica would block drains
            objects.append(disruption_budget(settings, stage))
    objects.append(inference_graph(settings))
    return [serialize(o) for o in objects]
