"""The deployment YAML (``configs/deploy/kserve.yaml``): pools, replicas, autoscaling, images, storage,
pod security, and who may call the graph.

Validated with pydantic, unknown keys refused; :func:`load_settings` turns every validation
problem into one line naming the field (``pools.refinement.replicas.max``), what is wrong and the
fix, with the closest known key for a misspelled one.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tandem.deploy.images import BUILD_COMMANDS, HOP_IMAGE, IMAGE_USER, PLACEHOLDER_REGISTRIES, TRITON_IMAGE
from tandem.errors import TandemError

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
STORAGE_URI = re.compile(r"^(s3|gs|pvc|https?|hdfs|webhdfs|oci|hf)://\S+$")
# An Istio principal: <trust domain>/ns/<namespace>/sa/<service account> (the SPIFFE ID without spiffe://).
PRINCIPAL = re.compile(r"^[a-z0-9.-]+/ns/[a-z0-9]([-a-z0-9]*[a-z0-9])?/sa/[a-z0-9]([-.a-z0-9]*[a-z0-9])?$")
INGRESS_GATEWAY = "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"

# KServe's scale metrics per deployment mode: Knative's autoscaler (Serverless) scales on in-flight
# requests or request rate, an HPA (RawDeployment) on resource utilisation.
SCALE_METRICS = {"Serverless": ("concurrency", "rps", "cpu", "memory"), "RawDeployment": ("cpu", "memory")}


def quantity(value: str) -> str:
    if not QUANTITY.match(str(value)):
        raise ValueError(f"{value!r} is not a Kubernetes quantity; write e.g. \"4\", \"500m\", \"16Gi\" (quoted)")
    return str(value)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Replicas(Strict):
    min: int = Field(ge=0, description="0 lets Knative scale the pool to zero (cold starts)")
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "Replicas":
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min}); raise max or lower min")
        return self


class Autoscaling(Strict):
    metric: Literal["concurrency", "rps", "cpu", "memory"]
    target: int = Field(ge=1, description="per replica: in-flight requests, requests/s, or utilisation percent")


class Toleration(Strict):
    key: str
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] = "NoSchedule"

    @model_validator(mode="after")
    def _value(self) -> "Toleration":
        if self.operator == "Equal" and self.value is None:
            raise ValueError("operator Equal needs a value; give value: or use operator: Exists")
        if self.operator == "Exists" and self.value is not None:
            raise ValueError("operator Exists takes no value; drop value: or use operator: Equal")
        return self


class Pool(Strict):
    """One stage's node pool and its InferenceService's scaling."""

    node_selector: dict[str, str] = Field(min_length=1, description="labels of this pool's nodes")
    tolerations: list[Toleration] = []
    replicas: Replicas
    autoscaling: Autoscaling
    accelerators: int = Field(1, ge=1, le=16, description="GPUs / Neuron devices per replica (GPU/Neuron targets)")
    cpu: str = Field("4", description="CPU request and limit per replica (Guaranteed QoS: requests = limits)")
    memory: str = Field("16Gi", description="memory request and limit per replica")
    shm: str = Field("2Gi", description="size of the memory-backed /dev/shm (Triton's python backend passes tensors through it)")
    tmp: str = Field("1Gi", description="size of the writable /tmp (the root filesystem is read-only)")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: object) -> object:
        if isinstance(data, dict) and "storage_uri" in data:
            raise ValueError(
                "storage_uri moved: set storage.uri to the bucket prefix (e.g. s3://tandem-models); each stage's "
                "repository then goes to <storage.uri>/<the build's model config>/<stage>"
            )
        return data

    @field_validator("cpu", "memory", "shm", "tmp")
    @classmethod
    def _quantity(cls, value: str) -> str:
        return quantity(value)


class Pools(Strict):
    reasoning: Pool
    refinement: Pool


class Images(Strict):
    triton: str = Field(TRITON_IMAGE, description="deploy/Dockerfile --target triton: Triton 2.51 with tandem in its python backend")
    hop: str = Field(HOP_IMAGE, description="deploy/Dockerfile --target hop: runs `python -m tandem.deploy.hop` in front of refinement")

    @field_validator("triton", "hop")
    @classmethod
    def _tagged(cls, value: str) -> str:
        last = value.rsplit("/", 1)[-1]
        if "@sha256:" not in value and (":" not in last or last.endswith(":latest")):
            raise ValueError(f"image {value!r} needs a fixed tag or digest (not :latest), e.g. {value.split(':')[0]}:0.1.0")
        if any(p in value for p in PLACEHOLDER_REGISTRIES):
            raise ValueError(
                f"image {value!r} is a placeholder nothing builds; build the images with `{BUILD_COMMANDS[0]}` (README, "
                "'Deploying past one machine'), push them to your registry and name them here"
            )
        return value


class Hop(Strict):
    replicas: Replicas = Replicas(min=1, max=4)
    cpu: str = "1"
    memory: str = "1Gi"
    tmp: str = "256Mi"

    @field_validator("cpu", "memory", "tmp")
    @classmethod
    def _quantity(cls, value: str) -> str:
        return quantity(value)


class Graph(Strict):
    timeout_seconds: int = Field(120, ge=1, description="end-to-end request timeout of the InferenceGraph router")
    cpu: str = Field("1", description="CPU request and limit of the router")
    memory: str = Field("512Mi", description="memory request and limit of the router")

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, value: str) -> str:
        return quantity(value)


class S3(Strict):
    """The storage annotations KServe's storage initializer reads from the credentials Secret."""

    endpoint: str = "s3.amazonaws.com"
    region: str = "us-east-1"
    use_https: bool = True
    verify_ssl: bool = True


class Storage(Strict):
    uri: str = Field(description="bucket prefix; each stage's repository goes to <uri>/<model config>/<stage>")
    service_account: str = Field("tandem-storage", description="ServiceAccount the predictors run as (KServe reads its secrets)")
    credentials_secret: str | None = Field(
        "tandem-storage-credentials",
        description="Secret holding the storage keys, created by you (tandem writes only its name); null: none needed",
    )
    s3: S3 | None = S3()

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        if not STORAGE_URI.match(value):
            raise ValueError(f"{value!r} is not a storage URI KServe's storage initializer reads; use e.g. s3://bucket/path")
        return value.rstrip("/")

    @field_validator("service_account", "credentials_secret")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and (not DNS_LABEL.match(value) or len(value) > 63):
            raise ValueError(f"{value!r} must be a DNS label (lower-case letters, digits, '-')")
        return value

    def stage_uri(self, config_name: str, stage: str) -> str:
        return f"{self.uri}/{config_name}/{stage}"


class Security(Strict):
    """Every container runs as this numeric non-root user (the image's, see deploy/Dockerfile)."""

    run_as_user: int = Field(IMAGE_USER, ge=1, description="numeric uid, not 0 (runAsNonRoot)")
    run_as_group: int = Field(IMAGE_USER, ge=1, description="numeric gid, not 0")


class Callers(Strict):
    principals: list[str] = Field(
        [INGRESS_GATEWAY], description="Istio principals (<trust domain>/ns/<namespace>/sa/<service account>)"
    )
    namespaces: list[str] = []

    @field_validator("principals")
    @classmethod
    def _principals(cls, values: list[str]) -> list[str]:
        for value in values:
            if value.strip() in ("*", ""):
                raise ValueError(
                    f"{value!r} would let any caller in; name each caller as <trust domain>/ns/<namespace>/sa/<service account>, "
                    f"e.g. {INGRESS_GATEWAY}"
                )
            if value.startswith("spiffe://"):
                raise ValueError(f"{value!r}: Istio principals are written without spiffe://; use {value.removeprefix('spiffe://')!r}")
            if not PRINCIPAL.match(value):
                raise ValueError(
                    f"{value!r} is not an Istio principal; write <trust domain>/ns/<namespace>/sa/<service account>, "
                    f"e.g. {INGRESS_GATEWAY}"
                )
        if len(set(values)) != len(values):
            raise ValueError("lists a principal twice; remove the duplicate")
        return values

    @field_validator("namespaces")
    @classmethod
    def _namespaces(cls, values: list[str]) -> list[str]:
        for value in values:
            if value.strip() in ("*", ""):
                raise ValueError(f"{value!r} would let every namespace in; name the namespaces, or list principals instead")
            if not DNS_LABEL.match(value):
                raise ValueError(f"{value!r} is not a namespace name (a DNS label)")
        return values


class Access(Strict):
    """Who may call what (Istio AuthorizationPolicies; everything else in the namespace is denied)."""

    trust_domain: str = Field("cluster.local", description="the mesh's trust domain (the principals' first part)")
    graph_callers: Callers = Field(
        Callers(), description="who may call the InferenceGraph, besides the graph's own service account"
    )

    @field_validator("trust_domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        if not re.match(r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$", value):
            raise ValueError(f"{value!r} is not a trust domain (e.g. cluster.local)")
        return value

    @model_validator(mode="after")
    def _same_domain(self) -> "Access":
        for principal in self.graph_callers.principals:
            domain = principal.split("/", 1)[0]
            if domain != self.trust_domain:
                raise ValueError(
                    f"graph_callers.principals: {principal!r} is in trust domain {domain!r}, the mesh's is "
                    f"{self.trust_domain!r} (access.trust_domain); write it as {self.trust_domain}/{principal.split('/', 1)[1]} "
                    "or set access.trust_domain"
                )
        return self

    def principal(self, namespace: str, service_account: str) -> str:
        return f"{self.trust_domain}/ns/{namespace}/sa/{service_account}"


class DeploySettings(Strict):
    namespace: str
    name: str = "tandem"
    deployment_mode: Literal["Serverless", "RawDeployment"] = "Serverless"
    images: Images = Images()
    pools: Pools
    hop: Hop = Hop()
    graph: Graph = Graph()
    storage: Storage
    security: Security = Security()
    access: Access = Access()
    mtls: Literal["STRICT"] = Field(
        "STRICT", description="scene tokens never cross the network in clear: STRICT is the only mode offered"
    )

    @field_validator("namespace", "name")
    @classmethod
    def _dns(cls, value: str) -> str:
        if not DNS_LABEL.match(value) or len(value) > 40:
            raise ValueError(f"{value!r} must be a DNS label (lower-case letters, digits, '-'; at most 40 characters)")
        return value

    @model_validator(mode="after")
    def _metrics(self) -> "DeploySettings":
        allowed = SCALE_METRICS[self.deployment_mode]
        for stage in ("reasoning", "refinement"):
            metric = getattr(self.pools, stage).autoscaling.metric
            if metric not in allowed:
                raise ValueError(
                    f"pools.{stage}.autoscaling.metric {metric!r} is not available in {self.deployment_mode} mode "
                    f"(it offers {', '.join(allowed)}); choose one of those or set deployment_mode: Serverless"
                )
        if self.deployment_mode == "RawDeployment":
            for stage in ("reasoning", "refinement"):
                if getattr(self.pools, stage).replicas.min < 1:
                    raise ValueError(f"pools.{stage}.replicas.min must be >= 1 in RawDeployment mode (no scale to zero)")
        return self

    @model_validator(mode="after")
    def _accounts(self) -> "DeploySettings":
        own = {self.graph_service_account: "the graph's", self.hop_service_account: "the hop's"}
        if self.storage.service_account in own:
            raise ValueError(
                f"storage.service_account {self.storage.service_account!r} is {own[self.storage.service_account]} service account; "
                "choose another name (the predictors alone get the storage credentials)"
            )
        return self

    def pool(self, stage: str) -> Pool:
        return getattr(self.pools, stage)

    @property
    def graph_service_account(self) -> str:
        return f"{self.name}-graph"

    @property
    def hop_service_account(self) -> str:
        return f"{self.name}-hop"


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names known at ``loc`` (for suggesting the one a typo meant)."""
    current: type[BaseModel] | None = model
    for part in loc[:-1]:
        if current is None or not isinstance(part, str) or part not in current.model_fields:
            return []
        annotation = current.model_fields[part].annotation
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return list(current.model_fields) if current is not None else []


def describe_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            known = _fields_at(DeploySettings, loc)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known fields here: {', '.join(known)}"
            message = f"unknown field; {hint}"
        elif error["type"] == "missing":
            message = "required field is missing; add it (see configs/deploy/kserve.yaml)"
        lines.append(f"  {where}: {message}")
    return f"{source} is not a valid deployment config:\n" + "\n".join(lines)


def parse_settings(data: object, source: str = "deployment config") -> DeploySettings:
    if not isinstance(data, dict):
        raise TandemError(f"{source} must be a YAML mapping (namespace:, images:, pools: ...), got {type(data).__name__}")
    try:
        return DeploySettings.model_validate(data)
    except ValidationError as exc:
        raise TandemError(describe_errors(exc, source)) from None


def load_settings(path: str | Path) -> DeploySettings:
    path = Path(path)
    if not path.is_file():
        raise TandemError(f"deployment config {path} does not exist; start from configs/deploy/kserve.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TandemError(f"{path} is not valid YAML: {exc}") from None
    return parse_settings(data, str(path))
