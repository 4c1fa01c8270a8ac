"""Model configuration: one YAML file describes both stages and the scene grid they share.

Unknown keys are rejected (``extra="forbid"``) so a typo in a config never silently falls back
to a default.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from tandem.errors import TandemError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SceneConfig(_Strict):
    """The discrete scene the reasoning stage writes and the refinement stage paints."""

    grid_height: int = 16
    grid_width: int = 16
    codebook_size: int = 512

    @property
    def num_tokens(self) -> int:
        return self.grid_height * self.grid_width


class ReasoningConfig(_Strict):
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512  # hidden width of one expert (SwiGLU)
    n_experts: int = 8
    top_k: int = 2
    max_prompt_len: int = 64  # tokens, BOS and BOI included
    norm_eps: float = 1e-5

    @model_validator(mode="after")
    def _check(self) -> "ReasoningConfig":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) must be between 1 and n_experts ({self.n_experts})")
        if self.max_prompt_len < 3:
            raise ValueError("max_prompt_len must allow at least BOS, one byte and BOI (>= 3)")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class RefinementConfig(_Strict):
    embed_dim: int = 64
    unet_channels: list[int] = [64, 128]  # one entry per UNet level at grid resolution and below
    decoder_channels: list[int] = [64, 32, 16]  # one entry per x2 upsampling stage after the UNet
    group_width: int = 16  # channels per group in the grouped convolutions
    norm_groups: int = 8
    blocks_per_level: int = 1  # residual blocks per UNet level, on the way down and on the way up

    @field_validator("unet_channels", "decoder_channels")
    @classmethod
    def _non_empty(cls, value: list[int]) -> list[int]:
        if not value or any(c <= 0 for c in value):
            raise ValueError("channel lists must be non-empty and positive")
        return value

    @model_validator(mode="after")
    def _check(self) -> "RefinementConfig":
        for c in [self.embed_dim, *self.unet_channels, *self.decoder_channels]:
            if c % self.group_width:
                raise ValueError(f"channel count {c} is not a multiple of group_width {self.group_width}")
            if c % self.norm_groups:
                raise ValueError(f"channel count {c} is not a multiple of norm_groups {self.norm_groups}")
        return self

    @property
    def upsample_factor(self) -> int:
        return 2 ** len(self.decoder_channels)


class ModelConfig(_Strict):
    name: str
    seed: int = 0  # deterministic initialisation when no checkpoint is given
    checkpoint: str | None = None  # safetensors file, relative to the config file
    scene: SceneConfig = SceneConfig()
    reasoning: ReasoningConfig = ReasoningConfig()
    refinement: RefinementConfig = RefinementConfig()

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        levels = len(self.refinement.unet_channels)
        factor = 2 ** (levels - 1)
        if self.scene.grid_height % factor or self.scene.grid_width % factor:
            raise ValueError(
                f"grid {self.scene.grid_height}x{self.scene.grid_width} must be divisible by {factor} "
                f"for {levels} UNet levels; use fewer unet_channels or a larger grid"
            )
        return self

    @property
    def max_len(self) -> int:
        """Positions in the static KV cache: the longest prompt plus every scene token."""
        return self.reasoning.max_prompt_len + self.scene.num_tokens

    @property
    def image_height(self) -> int:
        return self.scene.grid_height * self.refinement.upsample_factor

    @property
    def image_width(self) -> int:
        return self.scene.grid_width * self.refinement.upsample_factor

    def fingerprint(self) -> str:
        """Content hash of everything that shapes the exported graphs."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def resolve_config_path(name_or_path: str | Path) -> Path:
    """Accept a path to a YAML file or the bare name of a bundled config (``tiny``, ``small``, ``seed``).

    A bare name always means the bundled config, whatever the current folder holds (a folder called
    ``tiny`` there, e.g. an export, does not shadow it)."""
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.is_file():
        if not path.is_file():
            raise TandemError(f"config file {path} does not exist; bundled configs: {bundled_configs()}")
        return path
    bundled = CONFIG_DIR / f"{name_or_path}.yaml"
    if bundled.exists():
        return bundled
    raise TandemError(f"unknown config {name_or_path!r}; give a YAML path or one of {bundled_configs()}")


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str | Path) -> ModelConfig:
    path = resolve_config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TandemError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise TandemError(f"{path} must hold a mapping of config keys, got {type(raw).__name__}")
    try:
        config = ModelConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "<root>"
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown config key '{where}' (remove it or fix the spelling)")
            else:
                problems.append(f"'{where}': {err['msg']}")
        raise TandemError(f"invalid config {path}:\n  " + "\n  ".join(problems)) from None
    if config.checkpoint is not None:
        ckpt = (path.parent / config.checkpoint).resolve()
        config = config.model_copy(update={"checkpoint": str(ckpt)})
    return config
