"""Cross-hardware rows: published peaks (configs/hardware.yaml) x counted work = *modelled* times.

A modelled time is a roofline lower bound, ``max(FLOPs / peak, bytes / bandwidth)`` per graph
call; it ignores kernel launches, host round trips and imperfect kernels, so real engines are
slower, most of all for small graphs at batch 1. Rows built here are always labelled
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


def per_image_seconds(call_seconds: dict[str, float], batch: int, decode_steps: int) -> float:
    """One generation of ``batch`` images: a prefill, ``decode_steps`` decode steps, a refinement."""
    total = call_seconds["reasoning_prefill"] + decode_steps * call_seconds["reasoning_decode"]
    return (total + call_seconds["refinement"]) / batch


def cost_per_1000_images(seconds_per_image: float, usd_per_hour: float) -> float:
    return seconds_per_image * 1000 * usd_per_hour / 3600


def modelled_rows(hw: HardwareConfig, work: dict[str, dict[str, dict]], decode_steps: int) -> list[dict]:
    """work[graph][str(batch)] -> one row per accelerator and modelled batch."""
    rows = []
    precision = hw.model.precision
    for key, acc in hw.accelerators.items():
        for batch in hw.model.batches:
            if any(str(batch) not in work[g] for g in ("reasoning_prefill", "reasoning_decode", "refinement")):
                continue
            calls = {g: modelled_call(work[g][str(batch)], acc, precision) for g in work}
            seconds = {g: c["seconds"] for g, c in calls.items()}
            per_image = per_image_seconds(seconds, batch, decode_steps)
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
                    "graphs": calls,
                    "decode_ms_per_token": 1e3 * seconds["reasoning_decode"] / batch,
                    "seconds_per_image": per_image,
                    "images_per_s": 1.0 / per_image,
                    "costs": costs,
                    "source": acc.source,
                }
            )
    return rows
