"""``tandem build``: deployable artifacts for one target (CPU/ONNX Runtime, TensorRT for H100/A100,
Neuron for Inferentia2, AOTInductor for CUDA or CPU) through status-reporting steps
(:mod:`.steps`): export -> optimise -> compile -> Triton model repository (:mod:`.core`), each step
decided by the target's toolchain object (:mod:`tandem.toolchains`)."""
