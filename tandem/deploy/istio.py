"""Istio objects for mutual TLS between the hops.

Istio publishes no Python SDK models, so these are plain dicts checked against the small pydantic
schemas below, written here from Istio's API reference for ``security.istio.io/v1``
PeerAuthentication and ``networking.istio.io/v1`` DestinationRule. They cover only the fields
tandem sets, with unknown fields refused, so a misspelled field fails validation instead of being
dropped by the API server's pruning.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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


SCHEMAS: dict[tuple[str, str], type[BaseModel]] = {
    ("security.istio.io/v1", "PeerAuthentication"): PeerAuthentication,
    ("networking.istio.io/v1", "DestinationRule"): DestinationRule,
}


def peer_authentication(namespace: str, labels: dict[str, str]) -> dict:
    """Namespace-wide STRICT: every sidecar refuses plaintext, so no hop accepts a clear-text caller."""
    obj = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": namespace, "labels": labels},
        "spec": {"mtls": {"mode": "STRICT"}},
    }
    return PeerAuthentication.model_validate(obj).model_dump(exclude_none=True)


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
    return DestinationRule.model_validate(obj).model_dump(exclude_none=True)
