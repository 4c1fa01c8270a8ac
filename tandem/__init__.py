"""tandem: export, compile and serve a two-stage text-to-image model (MoE reasoning -> UNet refinement)."""

__version__ = "0.1.0"
