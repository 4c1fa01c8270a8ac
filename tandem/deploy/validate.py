"""Offline validation of every generated object; no cluster needed.

* Core kinds (``v1``, ``policy/v1``...): ``kubernetes-validate`` against the OpenAPI schemas of
  :data:`KUBERNETES_VERSION`, strict (unknown fields are errors).
* KServe kinds: rebuilt field by field through the ``kserve`` SDK's models (and the ``kubernetes``
  client's models they embed, e.g. ``V1Container``), with any key the model does not declare an
  error (the SDK's own deserializer silently drops those), then serialised again and compared:
  what is applied is exactly what the models describe.
* Istio kinds: the pydantic schemas in :mod:`tandem.deploy.istio` (Istio has no Python SDK models).
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from tandem.deploy import istio
from tandem.errors import TandemError

KUBERNETES_VERSION = "1.33"  # the API version the core kinds are checked against (KServe 0.15+ supports it)
KSERVE_KINDS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("serving.kserve.io/v1alpha1", "InferenceGraph"): "V1alpha1InferenceGraph",
}
_PRIMITIVES = {"str": str, "int": int, "float": (int, float), "bool": bool, "object": object, "datetime": str, "date": str}


class ManifestError(TandemError):
    """A generated object does not validate."""


def _model_class(name: str):
    from tandem.deploy.sdk import kserve_models, kubernetes_models

    for module in (kserve_models(), kubernetes_models()):
        cls = getattr(module, name, None)
        if isinstance(cls, type) and hasattr(cls, "openapi_types"):
            return cls
    return None


def _build(type_name: str, value: Any, path: str) -> Any:
    """``value`` (a manifest fragment) as an instance of the SDK type ``type_name``; unknown keys raise."""
    if value is None:
        return None
    if match := re.fullmatch(r"[lL]ist\[(.+)\]", type_name):
        if not isinstance(value, list):
            raise ManifestError(f"{path}: expected a list, got {type(value).__name__}")
        return [_build(match[1], item, f"{path}[{i}]") for i, item in enumerate(value)]
    if match := (re.fullmatch(r"dict\(([^,]+), (.+)\)", type_name) or re.fullmatch(r"Dict\[([^,]+), (.+)\]", type_name)):
        if not isinstance(value, dict):
            raise ManifestError(f"{path}: expected a mapping, got {type(value).__name__}")
        return {k: _build(match[2], v, f"{path}.{k}") for k, v in value.items()}
    if type_name in _PRIMITIVES:
        expected = _PRIMITIVES[type_name]
        if isinstance(value, bool) and type_name in ("int", "float"):
            raise ManifestError(f"{path}: expected {type_name}, got bool")
        if not isinstance(value, expected):
            raise ManifestError(f"{path}: expected {type_name}, got {type(value).__name__} {value!r}")
        return value
    cls = _model_class(type_name)
    if cls is None:  # quantities (ResourceQuantity, IntOrString) travel as strings or numbers
        if not isinstance(value, (str, int, float)):
            raise ManifestError(f"{path}: expected a {type_name} (string or number), got {type(value).__name__}")
        return value
    if not isinstance(value, dict):
        raise ManifestError(f"{path}: expected a {type_name} mapping, got {type(value).__name__}")
    by_key = {key: attr for attr, key in cls.attribute_map.items()}
    unknown = sorted(set(value) - set(by_key))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(by_key), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ManifestError(f"{path}: unknown field(s) {', '.join(hints)} for {type_name}")
    kwargs = {by_key[k]: _build(cls.openapi_types[by_key[k]], v, f"{path}.{k}") for k, v in value.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ManifestError(f"{path}: {type_name} refuses it: {exc}") from None


def validate_kserve(obj: dict) -> None:
    from tandem.deploy.manifests import serialize

    model_name = KSERVE_KINDS[(obj.get("apiVersion"), obj.get("kind"))]
    where = f"{obj.get('kind')} {obj.get('metadata', {}).get('name', '?')}"
    model = _build(model_name, obj, where)
    again = serialize(model)
    if again != obj:
        raise ManifestError(f"{where}: does not round-trip through kserve.{model_name} (the SDK model serialises it differently)")


def validate_core(obj: dict) -> None:
    import kubernetes_validate

    where = f"{obj.get('kind')} {obj.get('metadata', {}).get('name', '?')}"
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        location = ".".join(str(p) for p in exc.path) or "(top level)"
        raise ManifestError(f"{where}: {location}: {exc.message} (Kubernetes {KUBERNETES_VERSION} schema)") from None
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise ManifestError(f"{where}: no Kubernetes {KUBERNETES_VERSION} schema for it: {exc}") from None


def validate_istio(obj: dict) -> None:
    from pydantic import ValidationError

    schema = istio.SCHEMAS[(obj.get("apiVersion"), obj.get("kind"))]
    try:
        schema.model_validate(obj)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ManifestError(f"{obj.get('kind')} {obj.get('metadata', {}).get('name', '?')}: {problems}") from None


def validate_object(obj: dict) -> str:
    """Validate one object; returns how ("kubernetes-validate 1.33", "kserve SDK", "istio schema")."""
    if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
        raise ManifestError(f"not a Kubernetes object (needs apiVersion and kind): {str(obj)[:80]}")
    key = (obj["apiVersion"], obj["kind"])
    if key in KSERVE_KINDS:
        validate_kserve(obj)
        return "kserve SDK models, strict round trip"
    if key in istio.SCHEMAS:
        validate_istio(obj)
        return "istio schema (pydantic)"
    if "." in obj["apiVersion"].split("/")[0] and not obj["apiVersion"].startswith(("policy/", "apps/")):
        if not obj["apiVersion"].split("/")[0].endswith(".k8s.io"):
            raise ManifestError(f"{obj['kind']} ({obj['apiVersion']}) is not a kind tandem knows how to validate")
    validate_core(obj)
    return f"kubernetes-validate {KUBERNETES_VERSION} (strict)"


def validate_all(objects: list[dict]) -> list[str]:
    return [validate_object(o) for o in objects]
