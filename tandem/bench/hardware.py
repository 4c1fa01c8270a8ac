"""Cross-hardware rows: published peaks (configs/hardware.yaml) x counted work = *modelled* times.

A modelled time is a roofline lower bound, ``max(FLOPs / peak, bytes / bandwidth)`` per graph
call, plus what this run measured of the host's work per decode step (sampling and the step's
bookkeeping in Python, which every target does on the host today). It ignores kernel launches,
synchronisation and imperfect kernels, so real engines are slower, most of all for small graphs at
batch 1. Each row is modelled twice for the reasoning graphs: *as shipped* (what the target's
graphs read at the model's precision: TensorRT's reasoning graphs route their experts at
fp32/fp16/bf16 through tandem's plugin pair, and read every expert at int8/fp8; Neuron's standard-op
graph evaluates every expert, with zero gates for the unchosen ones) and *routed* (only the experts
the step routed to: the floor once a routed MoE kernel ships for that target). Rows built here are always labelled
``"kind": "modelled"``; rows from measurements carry ``"kind": "measured"``."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from tandem.bench.roofline import bytes_at_precision
from tandem.errors import TandemError

DEFAULT_HARDWARE = Path(__file__).resolve().parent.parent.parent / "configs" / "hardware.yaml"
ELEMENT_BYTES = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "fp8": 1}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Accelerator(_Strict):
    name: str
    target: str | None = None  # the tandem build target for it (tandem.formats.targets): how its graphs read experts
    peak_tflops: dict[str, float]
    memory_bandwidth_gb_s: float
    memory_gb: float | None = None
    source: str
    checked: str | None = None
    notes: str | None = None


class Instance(_Strict):
    accelerator: str
    accelerators: int
    usd_per_hour: float
    source: str
    as_of: str | None = None
    notes: str | None = None

    @property
    def usd_per_accelerator_hour(self) -> float:
        return self.usd_per_hour / self.accelerators


class MeasuredMachine(_Strict):
    instance: str
    usd_per_hour: float
    source: str | None = None
    as_of: str | None = None


class ModelSettings(_Strict):
    precision: str = "fp16"
    batches: list[int] = [1, 8]


class HardwareConfig(_Strict):
    accelerators: dict[str, Accelerator]
    instances: dict[str, Instance] = {}
    measured_machine: MeasuredMachine | None = None
    model: ModelSettings = ModelSettings()

    @model_validator(mode="after")
    def _check(self) -> "HardwareConfig":
        for name, inst in self.instances.items():
            if inst.accelerator not in self.accelerators:
                raise ValueError(f"instance {name} names unknown accelerator {inst.accelerator!r}")
        if self.model.precision not in ELEMENT_BYTES:
            raise ValueError(f"model.precision must be one of {sorted(ELEMENT_BYTES)}")
        for name, acc in self.accelerators.items():
            if self.model.precision not in acc.peak_tflops:
                raise ValueError(f"accelerator {name} has no peak for precision {self.model.precision!r}")
        return self


def load_hardware(path: str | Path | None = None) -> HardwareConfig:
    path = Path(path) if path is not None else DEFAULT_HARDWARE
    if not path.exists():
        raise TandemError(f"hardware file {path} does not exist; pass --hardware with a YAML like {DEFAULT_HARDWARE}")
    try:
        raw = yaml.safe_load(path.read_text())
        return HardwareConfig.model_validate(raw)
    except yaml.YAMLError as exc:
        raise TandemError(f"{path} is not valid YAML: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise TandemError(f"invalid hardware file {path}: {problems}") from None


def modelled_call(work: dict, acc: Accelerator, precision: str) -> dict:
    flops_s = work["flops"] / (acc.peak_tflops[precision] * 1e12)
    nbytes = bytes_at_precision(work, ELEMENT_BYTES[precision])
    bytes_s = nbytes / (acc.memory_bandwidth_gb_s * 1e9)
    return {
        "seconds": max(flops_s, bytes_s),
        "compute_seconds": flops_s,
        "memory_seconds": bytes_s,
        "bytes": nbytes,
        "bound": "compute" if flops_s >= bytes_s else "memory",
    }


def dense_work(work: dict, n_experts: int) -> dict:
    """``work`` (counted with only the routed experts read) as a standard-op graph runs it: every
    expert of every MoE layer read. FLOPs stay the routed ones (the decode step is memory-bound;
    a lower bound either way)."""
    routed = work.get("routed_experts_per_layer") or []
    per_expert = work.get("expert_bytes_per_layer") or []
    extra = sum((n_experts - r) * b for r, b in zip(routed, per_expert))
    if not extra:
        return work
    weights = work["weight_bytes_touched"] + extra
    total = work["bytes"] + extra
    return {**work, "weight_bytes_touched": int(weights), "bytes": int(total),
            "intensity_flop_per_byte": work["flops"] / total if total else 0.0}


def per_image_seconds(call_seconds: dict[str, float], batch: int, decode_steps: int) -> float:
    """One generation of ``batch`` images: a prefill, ``decode_steps`` decode steps, a refinement."""
    total = call_seconds["reasoning_prefill"] + decode_steps * call_seconds["reasoning_decode"]
    return (total + call_seconds["refinement"]) / batch


def cost_per_1000_images(seconds_per_image: float, usd_per_hour: float) -> float:
    return seconds_per_image * 1000 * usd_per_hour / 3600


def ships_routed(acc: Accelerator, precision: str) -> bool:
    """Whether the graphs tandem builds for ``acc`` (its ``target``) read only the routed experts at
    ``precision`` (the target's toolchain says: TensorRT's routed plugin pair at fp32/fp16/bf16;
    Neuron's graphs stay dense). An accelerator without a target is modelled dense."""
    if acc.target is None:
        return False
    from tandem.formats.targets import get_target
    from tandem.toolchains import get_toolchain

    return precision in get_toolchain(get_target(acc.target).toolchain).routed_precisions


def modelled_rows(
    hw: HardwareConfig, work: dict[str, dict[str, dict]], decode_steps: int, n_experts: int | None = None,
    host_seconds_per_step: dict[int, float] | None = None,
) -> list[dict]:
    """work[graph][str(batch)] -> one row per accelerator and modelled batch: ``seconds_per_image``
    as shipped (every expert read when ``n_experts`` is given and the target's graphs are dense at
    the model's precision (:func:`ships_routed`), plus ``host_seconds_per_step`` per decode step)
    and ``routed_seconds_per_image`` (routed experts only, the same host time)."""
    rows = []
    precision = hw.model.precision
    host = host_seconds_per_step or {}
    for key, acc in hw.accelerators.items():
        for batch in hw.model.batches:
            if any(str(batch) not in work[g] for g in ("reasoning_prefill", "reasoning_decode", "refinement")):
                continue
            calls = {g: modelled_call(work[g][str(batch)], acc, precision) for g in work}
            routed = {g: c["seconds"] for g, c in calls.items()}
            shipped_calls = dict(calls)
            routed_as_shipped = ships_routed(acc, precision)
            if n_experts and not routed_as_shipped:
                for g in ("reasoning_prefill", "reasoning_decode"):
                    shipped_calls[g] = modelled_call(dense_work(work[g][str(batch)], n_experts), acc, precision)
            shipped = {g: c["seconds"] for g, c in shipped_calls.items()}
            host_s = host.get(batch, 0.0)
            host_per_image = host_s * decode_steps / batch
            per_image = per_image_seconds(shipped, batch, decode_steps) + host_per_image
            routed_per_image = per_image_seconds(routed, batch, decode_steps) + host_per_image
            costs = [
                {
                    "instance": name,
                    "usd_per_accelerator_hour": inst.usd_per_accelerator_hour,
                    "usd_per_1000_images": cost_per_1000_images(per_image, inst.usd_per_accelerator_hour),
                    "price_as_of": inst.as_of,
                    "price_source": inst.source,
                }
                for name, inst in hw.instances.items()
                if inst.accelerator == key
            ]
            rows.append(
                {
                    "kind": "modelled",
                    "hardware": key,
                    "name": acc.name,
                    "precision": precision,
                    "batch": batch,
                    "graphs": shipped_calls,
                    "routed_graphs": calls,
                    "decode_ms_per_token": 1e3 * (shipped["reasoning_decode"] + host_s) / batch,
                    "routed_decode_ms_per_token": 1e3 * (routed["reasoning_decode"] + host_s) / batch,
                    "dense_factor": shipped_calls["reasoning_decode"]["bytes"] / calls["reasoning_decode"]["bytes"],
                    "ships_routed": routed_as_shipped,
                    "host_ms_per_step": 1e3 * host_s,
                    "seconds_per_image": per_image,
                    "routed_seconds_per_image": routed_per_image,
                    "images_per_s": 1.0 / per_image,
                    "costs": costs,
                    "source": acc.source,
                }
            )
    return rows
