"""The two images a deployment runs, and the names ``deploy/Dockerfile`` builds them under.

``deploy/Dockerfile`` has two targets: ``triton`` (NVIDIA's Triton container of the release tandem
serves with, plus tandem and its pinned dependencies in the python backend's interpreter) and ``hop``
(the KServe transformer, ``python -m tandem.deploy.hop``). The README's build commands tag them with
:data:`TRITON_IMAGE` and :data:`HOP_IMAGE`, which are also the defaults of ``images:`` in the
deployment YAML, so a bundle names exactly what the documented commands build.
"""

from __future__ import annotations

from tandem import __version__

TRITON_RELEASE = "24.10"  # NGC release of Triton 2.51, the server the repositories are written for (nvidia-pytriton 0.7)
REGISTRY = "localhost:5000"  # a local registry (kind, k3d, minikube); set images: to your registry for a real cluster
TRITON_IMAGE = f"{REGISTRY}/tandem/triton:{__version__}-{TRITON_RELEASE}"
HOP_IMAGE = f"{REGISTRY}/tandem/hop:{__version__}"
IMAGE_USER = 1000  # numeric uid:gid the images run as (deploy/Dockerfile's USER); NVIDIA's image calls it triton-server
PLACEHOLDER_REGISTRIES = ("registry.example.com", "example.com/", "example.org/")

BUILD_COMMANDS = (
    f"docker build -f deploy/Dockerfile --target triton -t {TRITON_IMAGE} .",
    f"docker build -f deploy/Dockerfile --target hop -t {HOP_IMAGE} .",
)
