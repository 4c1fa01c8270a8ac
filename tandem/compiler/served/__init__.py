"""Python-backend models for compiled targets: tandem's reasoning and refinement models, with each
Triton instance first placed on its own accelerator (a GPU for KIND_GPU instances, a range of
NeuronCores for Neuron's KIND_MODEL instances). :func:`placement` needs no Triton and is tested."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from tandem.errors import TandemError

log = logging.getLogger(__name__)

NEURON_CORES_ENV = "NEURON_RT_VISIBLE_CORES"


def instance_index(instance_name: str) -> int:
    """Triton names instances ``<group>_<index>`` (the group defaults to ``<model>_<group number>``)."""
    tail = instance_name.rsplit("_", 1)[-1]
    if not tail.isdigit():
        raise TandemError(f"cannot tell the instance index from Triton instance name {instance_name!r}")
    return int(tail)


def neuron_cores(instance_name: str, cores_per_instance: int) -> str:
    """``NEURON_RT_VISIBLE_CORES`` for one instance: consecutive, non-overlapping core ranges."""
    first = instance_index(instance_name) * cores_per_instance
    last = first + cores_per_instance - 1
    return str(first) if first == last else f"{first}-{last}"


def placement(args: Mapping[str, Any], parameters: Mapping[str, str]) -> dict[str, Any]:
    """Where one Triton model instance runs: {"cuda_device": int} or {"env": {...}} (or nothing)."""
    kind = str(args.get("model_instance_kind", "")).upper()
    if "neuron_cores_per_instance" in parameters:
        if NEURON_CORES_ENV in os.environ:  # the operator chose the cores for this server: keep them
            return {}
        cores = neuron_cores(str(args.get("model_instance_name", "")), int(parameters["neuron_cores_per_instance"]))
        return {"env": {NEURON_CORES_ENV: cores}}
    if kind.endswith("GPU"):
        return {"cuda_device": int(args.get("model_instance_device_id", 0))}
    return {}


def place_instance(args: Mapping[str, Any], parameters: Mapping[str, str]) -> None:
    """Apply :func:`placement` before the runtime loads (the Neuron runtime reads the variable once)."""
    where = placement(args, parameters)
    for key, value in where.get("env", {}).items():
        os.environ[key] = value
    if "cuda_device" in where:
        import torch

        torch.cuda.set_device(where["cuda_device"])
