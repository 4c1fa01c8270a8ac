"""Serving on Triton Inference Server: a generated model repository (:mod:`.repository`), the
``tritonserver`` launcher (:mod:`.server`) and a tritonclient HTTP/gRPC client (:mod:`.client`)."""
