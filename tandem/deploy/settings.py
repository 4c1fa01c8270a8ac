"""The deployment YAML (``configs/deploy/kserve.yaml``): pools, replicas, autoscaling, images, storage.

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

from tandem.errors import TandemError

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# KServe's scale metrics per deployment mode: Knative's autoscaler (Serverless) scales on in-flight
# requests or request rate, an HPA (RawDeployment) on resource utilisation.
SCALE_METRICS = {"Serverless": ("concurrency", "rps", "cpu", "memory"), "RawDeployment": ("cpu", "memory")}


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
    cpu: str = "4"
    memory: str = "16Gi"
    storage_uri: str = Field(description="where this stage's model repository is uploaded (s3://, gs://, pvc://)")

    @field_validator("storage_uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        if not re.match(r"^(s3|gs|pvc|https?|hdfs|webhdfs|oci|hf)://\S+$", value):
            raise ValueError(f"{value!r} is not a storage URI KServe's storage initializer reads; use e.g. s3://bucket/path")
        return value


class Pools(Strict):
    reasoning: Pool
    refinement: Pool


class Images(Strict):
    triton: str = Field(description="Triton 2.51+ with tandem and onnxruntime installed (the python-backend models import them)")
    hop: str = Field(description="tandem with the kserve extra: runs `python -m tandem.deploy.hop` in front of refinement")

    @field_validator("triton", "hop")
    @classmethod
    def _tagged(cls, value: str) -> str:
        last = value.rsplit("/", 1)[-1]
        if "@sha256:" not in value and (":" not in last or last.endswith(":latest")):
            raise ValueError(f"image {value!r} needs a fixed tag or digest (not :latest), e.g. {value.split(':')[0]}:0.1.0")
        return value


class Hop(Strict):
    replicas: Replicas = Replicas(min=1, max=4)
    cpu: str = "1"
    memory: str = "1Gi"


class Graph(Strict):
    timeout_seconds: int = Field(120, ge=1, description="end-to-end request timeout of the InferenceGraph router")


class DeploySettings(Strict):
    namespace: str
    name: str = "tandem"
    deployment_mode: Literal["Serverless", "RawDeployment"] = "Serverless"
    images: Images
    pools: Pools
    hop: Hop = Hop()
    graph: Graph = Graph()
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

    def pool(self, stage: str) -> Pool:
        return getattr(self.pools, stage)


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
