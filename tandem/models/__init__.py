"""Reference PyTorch stages, their construction, weights and parameter counts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tandem.config import ModelConfig
from tandem.errors import ArtifactError
from tandem.models.reasoning import MoEFeedForward, ReasoningTransformer
from tandem.models.refinement import RefinementUNet
from tandem.util import atomic_write_path

STAGE_CLASSES: dict[str, type[nn.Module]] = {"reasoning": ReasoningTransformer, "refinement": RefinementUNet}


@dataclass
class Stages:
    reasoning: ReasoningTransformer
    refinement: RefinementUNet

    def items(self) -> list[tuple[str, nn.Module]]:
        return [("reasoning", self.reasoning), ("refinement", self.refinement)]


def build_stages(config: ModelConfig, checkpoint: str | Path | None = None) -> Stages:
    """Both stages in eval mode: weights from ``checkpoint`` (or the config's), else a deterministic
    initialisation from ``config.seed`` (same seed -> bitwise identical weights)."""
    checkpoint = checkpoint if checkpoint is not None else config.checkpoint
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(config.seed)
        stages = Stages(ReasoningTransformer(config), RefinementUNet(config))
        for _, module in stages.items():
            module.reset_parameters()
    finally:
        torch.random.set_rng_state(generator_state)
    if checkpoint is not None:
        load_weights(stages, checkpoint)
    for _, module in stages.items():
        module.eval().requires_grad_(False)
    return stages


def save_weights(stages: Stages, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    tensors = {f"{name}.{key}": t.contiguous() for name, m in stages.items() for key, t in m.state_dict().items()}
    with atomic_write_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata or {})


def load_weights(stages: Stages, path: str | Path) -> None:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"checkpoint {path} does not exist; train one with `tandem train` or drop 'checkpoint'")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"checkpoint {path} is not a readable safetensors file ({exc}); re-create it") from exc
    for name, module in stages.items():
        prefix = f"{name}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        expected = module.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or wrong_shape:
            raise ArtifactError(
                f"checkpoint {path} does not match the {name} stage of this config "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong_shape[:3]}); "
                "use the config it was trained with"
            )
        module.load_state_dict(state)


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
