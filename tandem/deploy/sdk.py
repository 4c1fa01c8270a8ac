"""The kserve SDK's resource models without its model server.

``import kserve`` loads the KServe model server, whose gRPC stubs register the protobuf package
``inference`` (grpc_predict_v2.proto) in protobuf's default descriptor pool; tritonclient's gRPC
stubs register the same symbols from grpc_service.proto, and protobuf refuses the second file
("duplicate symbol 'inference.ServerLiveRequest'"). tandem imports tritonclient, so the manifest
code loads only ``kserve.models`` and ``kserve.api_client`` (plain generated classes that touch no
protobuf) under a bare package entry, and removes that entry again so a later real ``import kserve``
(the hop transformer, in its own process) runs the package normally.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

from tandem.errors import TandemError

INSTALL_HINT = "the deployment tools need the deploy extra: pip install -e '.[deploy]' (kserve, kubernetes, kubernetes-validate)"


def _load(submodule: str) -> types.ModuleType:
    name = f"kserve.{submodule}"
    if name in sys.modules:
        return sys.modules[name]
    if "kserve" in sys.modules:
        return importlib.import_module(name)
    spec = importlib.util.find_spec("kserve")
    if spec is None or not spec.submodule_search_locations:
        raise TandemError(f"kserve is not installed; {INSTALL_HINT}")
    bare = types.ModuleType("kserve")
    bare.__path__ = list(spec.submodule_search_locations)
    bare.__spec__ = spec
    sys.modules["kserve"] = bare
    try:
        return importlib.import_module(name)
    finally:
        if sys.modules.get("kserve") is bare:
            del sys.modules["kserve"]


def kserve_models() -> types.ModuleType:
    """``kserve.models`` (V1beta1InferenceService, V1alpha1ServingRuntime, V1alpha1InferenceGraph, ...)."""
    return _load("models")


def kserve_api_client():
    """kserve's ApiClient class (serialises kserve and kubernetes models by their attribute maps)."""
    return _load("api_client").ApiClient


def kubernetes_models() -> types.ModuleType:
    try:
        import kubernetes.client as client
    except ImportError as exc:
        raise TandemError(f"kubernetes is not installed; {INSTALL_HINT}") from exc
    return client
