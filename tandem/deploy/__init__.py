"""Split deployment: reasoning and refinement as separately scaled KServe InferenceServices.

* :mod:`tandem.deploy.settings` - the deployment YAML (``configs/deploy/*.yaml``), validated.
* :mod:`tandem.deploy.manifests` - Kubernetes/KServe/Istio objects built from typed models.
* :mod:`tandem.deploy.validate` - offline validation of every generated object.
* :mod:`tandem.deploy.bundle` - ``tandem deploy``: per-stage repositories + manifests from a build.
* :mod:`tandem.deploy.hop` - the KServe transformer in front of refinement (reasoning's v2
  response -> refinement's v2 request; returns image and scene tokens).
* :mod:`tandem.deploy.split` - the client that chains two servers the way the InferenceGraph does.
* :mod:`tandem.deploy.capacity` - discrete-event capacity model (monolithic vs split pools).
"""
