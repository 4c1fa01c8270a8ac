"""Reference PyTorch stages, their construction, weights and parameter counts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from tandem.errors import ArtifactError, TandemError
from tandem.models.reasoning import MoEFeedForward, ReasoningTransformer
from tandem.models.refinement import RefinementUNet
from tandem.util import atomic_write_path

if TYPE_CHECKING:  # annotations only: torch alone imports the models (safetensors and pydantic where used;
    # benchmarks/device_check.py runs on a GPU machine that has torch and numpy)
    from tandem.config import ModelConfig

STAGE_CLASSES: dict[str, type[nn.Module]] = {"reasoning": ReasoningTransformer, "refinement": RefinementUNet}


@dataclass
class Stages:
    reasoning: ReasoningTransformer
    refinement: RefinementUNet

    def items(self) -> list[tuple[str, nn.Module]]:
        return [("reasoning", self.reasoning), ("refinement", self.refinement)]


# Weight dtypes an export may use (--dtype): fp32 everywhere, bf16/fp16 halve the weights for GPU targets.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_stages(config: ModelConfig, checkpoint: str | Path | None = None, dtype: str = "fp32") -> Stages:
    """Both stages in eval mode: weights from ``checkpoint`` (or the config's), else a deterministic
    initialisation from ``config.seed`` (same seed -> bitwise identical weights), in ``dtype``.

    Every weight is allocated once, in ``dtype``: the modules are built on the meta device, then
    each module's own parameters are materialised and initialised in turn (fp32, then rounded), or
    assigned tensor by tensor from the safetensors file. At no point are there two copies of the
    weights, so the peak is the weights in ``dtype`` plus the largest single module in fp32."""
    if dtype not in DTYPES:
        raise TandemError(f"unknown weight dtype {dtype!r}; use one of {sorted(DTYPES)}")
    checkpoint = checkpoint if checkpoint is not None else config.checkpoint
    with torch.device("meta"):
        stages = Stages(ReasoningTransformer(config), RefinementUNet(config))
    if checkpoint is not None:
        load_weights(stages, checkpoint, dtype)
    else:
        generator_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(config.seed)
            for _, module in stages.items():
                _materialize_seeded(module, DTYPES[dtype])
        finally:
            torch.random.set_rng_state(generator_state)
    for _, module in stages.items():
        module.eval().requires_grad_(False)
    return stages


def _materialize_seeded(stage: nn.Module, dtype: torch.dtype) -> None:
    """The stage's seeded init (its ``init_module`` over ``modules()`` in order, the same random
    draws as ``reset_parameters``), one module's parameters at a time off the meta device."""
    for module in stage.modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        module.to_empty(device="cpu", recurse=False)
        stage.init_module(module)
        for name, param in module.named_parameters(recurse=False):
            if param.dtype != dtype:
                module._parameters[name] = nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)


def save_weights(stages: Stages, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {f"{name}.{key}": t.contiguous() for name, m in stages.items() for key, t in m.state_dict().items()}
    with atomic_write_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata or {})


def load_weights(stages: Stages, path: str | Path, dtype: str | None = None) -> None:
    """Weights from a safetensors file, read tensor by tensor and converted to ``dtype`` (the
    modules' own dtype when None). Modules on the meta device get the loaded tensors assigned
    (no second copy); materialised ones are copied into."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"checkpoint {path} does not exist; train one with `tandem train` or drop 'checkpoint'")
    try:
        handle = safe_open(str(path), framework="pt")
        keys = set(handle.keys())
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"checkpoint {path} is not a readable safetensors file ({exc}); re-create it") from exc
    for name, module in stages.items():
        prefix = f"{name}."
        expected = module.state_dict()
        on_disk = {k[len(prefix) :] for k in keys if k.startswith(prefix)}
        missing = sorted(set(expected) - on_disk)
        unexpected = sorted(on_disk - set(expected))
        wrong_shape = [k for k in expected if k in on_disk and list(handle.get_slice(prefix + k).get_shape()) != list(expected[k].shape)]
        if missing or unexpected or wrong_shape:
            raise ArtifactError(
                f"checkpoint {path} does not match the {name} stage of this config "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong_shape[:3]}); "
                "use the config it was trained with"
            )
        meta = any(t.is_meta for t in expected.values())
        target = {k: DTYPES[dtype] if dtype else t.dtype for k, t in expected.items()}
        try:
            state = {k: handle.get_tensor(prefix + k).to(target[k]) for k in expected}
        except (SafetensorError, OSError) as exc:
            raise ArtifactError(f"checkpoint {path} could not be read ({exc}); re-create it") from exc
        module.load_state_dict(state, assign=meta)


@dataclass
class ParameterCount:
    stage: str
    total: int
    active: int  # used per token: MoE layers count only top_k of n_experts


def count_parameters(config: ModelConfig) -> list[ParameterCount]:
    """Counts on the meta device: no weight is allocated, so the full-size config is instant."""
    with torch.device("meta"):
        reasoning = ReasoningTransformer(config)
        refinement = RefinementUNet(config)
    total_r = sum(p.numel() for p in reasoning.parameters())
    inactive = 0
    for module in reasoning.modules():
        if isinstance(module, MoEFeedForward):
            per_expert = (module.w_gate.numel() + module.w_up.numel() + module.w_down.numel()) // module.n_experts
            inactive += per_expert * (module.n_experts - module.top_k)
    total_f = sum(p.numel() for p in refinement.parameters())
    return [
        ParameterCount("reasoning", total_r, total_r - inactive),
        ParameterCount("refinement", total_f, total_f),
    ]
