"""Triton python-backend model ``refinement`` over compiled artifacts: tandem's served refinement model
(:mod:`tandem.serving.models.refinement`), placed on this instance's accelerator before it loads.
Imported only inside Triton's python backend stub."""

from __future__ import annotations

import json

from tandem.compiler.served import place_instance
from tandem.serving.models.common import model_parameters
from tandem.serving.models.refinement import TritonPythonModel as _ServedModel


class TritonPythonModel(_ServedModel):
    def initialize(self, args: dict) -> None:
        place_instance(args, model_parameters(json.loads(args["model_config"])))
        super().initialize(args)
