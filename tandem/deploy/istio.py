"""Istio objects: mutual TLS between the hops, who may call what, and the request body limit.

Istio publishes no Python SDK models, so these are plain dicts checked against the small pydantic
schemas below, written here from Istio's API reference for ``security.istio.io/v1``
PeerAuthentication and AuthorizationPolicy, ``networking.istio.io/v1`` DestinationRule and
``networking.istio.io/v1alpha3`` EnvoyFilter (the only version EnvoyFilter has). They cover only
the fields tandem sets, with unknown fields refused, so a misspelled field fails validation instead
of being dropped by the API server's pruning.

Request body limit: Istio has no field for it; the mechanism Istio and Envoy document is Envoy's
buffer filter (``envoy.filters.http.buffer``, ``max_request_bytes``: a larger body is answered 413
before it reaches the workload) inserted by an EnvoyFilter into the inbound HTTP filter chain of the
selected workloads' sidecars, ahead of the router (so after the authorization filters: a caller that
is not allowed is refused before its body is buffered).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Metadata(_Strict):
    name: str
    namespace: str
    labels: dict[str, str] = {}


class MutualTLS(_Strict):
    mode: Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]


class PeerAuthenticationSpec(_Strict):
    selector: dict[str, dict[str, str]] | None = None  # {"matchLabels": {...}}; absent: the whole namespace
    mtls: MutualTLS


class PeerAuthentication(_Strict):
    apiVersion: Literal["security.istio.io/v1"]
    kind: Literal["PeerAuthentication"]
    metadata: Metadata
    spec: PeerAuthenticationSpec


class ClientTLSSettings(_Strict):
    mode: Literal["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]


class TrafficPolicy(_Strict):
    tls: ClientTLSSettings


class DestinationRuleSpec(_Strict):
    host: str = Field(min_length=1)
    trafficPolicy: TrafficPolicy
    exportTo: list[str] | None = None


class DestinationRule(_Strict):
    apiVersion: Literal["networking.istio.io/v1"]
    kind: Literal["DestinationRule"]
    metadata: Metadata
    spec: DestinationRuleSpec


class WorkloadSelector(_Strict):
    matchLabels: dict[str, str] = Field(min_length=1)


class Source(_Strict):
    principals: list[str] | None = Field(None, min_length=1)
    namespaces: list[str] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _something(self) -> "Source":
        if not self.principals and not self.namespaces:
            raise ValueError("a source needs principals or namespaces")
        for value in (self.principals or []) + (self.namespaces or []):
            if value.strip() in ("", "*"):
                raise ValueError(f"{value!r} matches every caller")
        return self


class RuleFrom(_Strict):
    source: Source


class Rule(_Strict):
    from_: list[RuleFrom] = Field(alias="from", min_length=1)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class AuthorizationPolicySpec(_Strict):
    selector: WorkloadSelector | None = None  # absent: every workload of the namespace
    action: Literal["ALLOW"] | None = None  # tandem writes ALLOW policies only (deny = matched by none)
    rules: list[Rule] | None = None  # absent or empty with ALLOW: allow nothing


class AuthorizationPolicy(_Strict):
    apiVersion: Literal["security.istio.io/v1"]
    kind: Literal["AuthorizationPolicy"]
    metadata: Metadata
    spec: AuthorizationPolicySpec


HCM = "envoy.filters.network.http_connection_manager"
ROUTER = "envoy.filters.http.router"
BUFFER = "envoy.filters.http.buffer"
BUFFER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer"


class SubFilter(_Strict):
    name: Literal["envoy.filters.http.router"]


class FilterMatch(_Strict):
    name: Literal["envoy.filters.network.http_connection_manager"]
    subFilter: SubFilter


class FilterChainMatch(_Strict):
    filter: FilterMatch


class ListenerMatch(_Strict):
    filterChain: FilterChainMatch


class PatchMatch(_Strict):
    context: Literal["SIDECAR_INBOUND", "GATEWAY"]
    listener: ListenerMatch


class BufferConfig(_Strict):
    type_: Literal["type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer"] = Field(alias="@type")
    max_request_bytes: int = Field(ge=1024, le=2**32 - 1)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class BufferFilter(_Strict):
    name: Literal["envoy.filters.http.buffer"]
    typed_config: BufferConfig


class Patch(_Strict):
    operation: Literal["INSERT_BEFORE"]
    value: BufferFilter


class ConfigPatch(_Strict):
    applyTo: Literal["HTTP_FILTER"]
    match: PatchMatch
    patch: Patch


class EnvoyFilterSpec(_Strict):
    workloadSelector: WorkloadSelector  # never mesh- or namespace-wide: only the workloads named
    configPatches: list[ConfigPatch] = Field(min_length=1)


class EnvoyFilter(_Strict):
    apiVersion: Literal["networking.istio.io/v1alpha3"]
    kind: Literal["EnvoyFilter"]
    metadata: Metadata
    spec: EnvoyFilterSpec


SCHEMAS: dict[tuple[str, str], type[BaseModel]] = {
    ("security.istio.io/v1", "PeerAuthentication"): PeerAuthentication,
    ("networking.istio.io/v1", "DestinationRule"): DestinationRule,
    ("security.istio.io/v1", "AuthorizationPolicy"): AuthorizationPolicy,
    ("networking.istio.io/v1alpha3", "EnvoyFilter"): EnvoyFilter,
}


def _dump(schema: type[BaseModel], obj: dict) -> dict:
    return schema.model_validate(obj).model_dump(exclude_none=True, by_alias=True)


def authorization_policy(
    name: str,
    namespace: str,
    labels: dict[str, str],
    selector: dict[str, str] | None,
    principals: list[str] | None = None,
    namespaces: list[str] | None = None,
) -> dict:
    """ALLOW the given callers to the selected workloads. With neither principals nor namespaces:
    the allow-nothing policy (every request to the selected workloads, or the whole namespace when
    ``selector`` is None, is denied unless another ALLOW policy matches it)."""
    spec: dict = {}
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    sources = []
    if principals:
        sources.append({"source": {"principals": list(principals)}})
    if namespaces:
        sources.append({"source": {"namespaces": list(namespaces)}})
    if sources:
        spec["action"] = "ALLOW"
        spec["rules"] = [{"from": sources}]
    obj = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": spec,
    }
    return _dump(AuthorizationPolicy, obj)


def request_size_limit(name: str, namespace: str, labels: dict[str, str], selector: dict[str, str], max_request_bytes: int) -> dict:
    """The selected workloads' sidecars answer 413 to a request body over ``max_request_bytes``."""
    obj = {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "workloadSelector": {"matchLabels": selector},
            "configPatches": [{
                "applyTo": "HTTP_FILTER",
                "match": {"context": "SIDECAR_INBOUND", "listener": {"filterChain": {"filter": {"name": HCM, "subFilter": {"name": ROUTER}}}}},
                "patch": {"operation": "INSERT_BEFORE", "value": {"name": BUFFER, "typed_config": {"@type": BUFFER_TYPE, "max_request_bytes": max_request_bytes}}},
            }],
        },
    }
    return _dump(EnvoyFilter, obj)


def peer_authentication(namespace: str, labels: dict[str, str]) -> dict:
    """Namespace-wide STRICT: every sidecar refuses plaintext, so no hop accepts a clear-text caller."""
    obj = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": namespace, "labels": labels},
        "spec": {"mtls": {"mode": "STRICT"}},
    }
    return _dump(PeerAuthentication, obj)


def destination_rule(name: str, namespace: str, labels: dict[str, str]) -> dict:
    """Clients in the namespace originate Istio mutual TLS to every service in it."""
    obj = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "host": f"*.{namespace}.svc.cluster.local",
            "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}},
            "exportTo": ["."],
        },
    }
    return _dump(DestinationRule, obj)
