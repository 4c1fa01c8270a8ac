"""`tandem deploy`: settings validation, every generated manifest validated offline (kubernetes-validate,
kserve SDK models, Istio schemas), typo'd fields refused, the bundle from a real build, the hop."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tandem.cli import main
from tandem.formats.targets import get_target
from tandem.deploy.manifests import build_objects
from tandem.deploy.settings import load_settings, parse_settings
from tandem.deploy.validate import ManifestError, validate_all, validate_object
from tandem.errors import TandemError
from tandem.serving.repository import CONFIG_NAME, parse_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs" / "deploy" / "kserve.yaml"


@pytest.fixture(scope="module")
def settings():
    return load_settings(SHIPPED)


@pytest.fixture(scope="module")
def objects(settings):
    return build_objects(settings, get_target("h100"))


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def isvc(objects, stage):
    return next(o for o in by_kind(objects, "InferenceService") if o["metadata"]["name"].endswith(stage))


@pytest.mark.parametrize("target", ["cpu", "h100", "a100", "inf2"])
def test_every_object_validates_offline(settings, target):
    objects = build_objects(settings, get_target(target))
    how = validate_all(objects)
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "PeerAuthentication", "DestinationRule", "ServingRuntime", "InferenceService", "InferenceGraph"} <= kinds
    assert any("kubernetes-validate" in h for h in how) and any("kserve" in h for h in how) and any("istio" in h for h in how)
    limits = {o["metadata"]["name"]: o["spec"]["predictor"]["model"]["resources"]["limits"] for o in by_kind(objects, "InferenceService")}
    expected = {"cpu": None, "h100": "nvidia.com/gpu", "a100": "nvidia.com/gpu", "inf2": "aws.amazon.com/neuron"}[target]
    for name, limit in limits.items():
        accelerators = {k for k in limit if k not in ("cpu", "memory")}
        assert accelerators == ({expected} if expected else set()), (name, limit)


def test_pools_scaling_probes_graph_and_mtls(settings, objects):
    reasoning, refinement = isvc(objects, "reasoning"), isvc(objects, "refinement")
    for stage, service in (("reasoning", reasoning), ("refinement", refinement)):
        predictor, pool = service["spec"]["predictor"], settings.pool(stage)
        assert predictor["nodeSelector"] == pool.node_selector
        assert predictor["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert (predictor["minReplicas"], predictor["maxReplicas"]) == (pool.replicas.min, pool.replicas.max)
        assert (predictor["scaleMetric"], predictor["scaleTarget"]) == (pool.autoscaling.metric, pool.autoscaling.target)
        assert predictor["model"]["storageUri"] == pool.storage_uri
        assert "logger" not in predictor  # no payload logging: scene tokens never land in a log
    assert reasoning["spec"]["predictor"]["nodeSelector"] != refinement["spec"]["predictor"]["nodeSelector"]
    assert "transformer" in refinement["spec"] and "transformer" not in reasoning["spec"]

    for runtime in by_kind(objects, "ServingRuntime"):
        container = runtime["spec"]["containers"][0]
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert "--log-verbose=0" in container["args"] and "--model-control-mode=none" in container["args"]
        # admin APIs closed as in single-server `tandem serve`: behind a key from the Secret
        restricted = [a for a in container["args"] if a.startswith(("--http-restricted-api=", "--grpc-restricted-protocol="))]
        assert len(restricted) == 2 and all("shared-memory" in a and a.endswith("=$(TANDEM_ADMIN_KEY)") for a in restricted)
        secret_ref = container["env"][0]["valueFrom"]["secretKeyRef"]
        assert secret_ref["name"] == by_kind(objects, "Secret")[0]["metadata"]["name"]

    graph = by_kind(objects, "InferenceGraph")[0]["spec"]["nodes"]["root"]
    assert graph["routerType"] == "Sequence"
    first, second = graph["steps"]
    assert first["data"] == "$request" and first["serviceUrl"].endswith("/v2/models/reasoning/infer")
    assert second["data"] == "$response" and "-refinement-transformer." in second["serviceUrl"]

    assert by_kind(objects, "PeerAuthentication")[0]["spec"]["mtls"]["mode"] == "STRICT"
    assert by_kind(objects, "DestinationRule")[0]["spec"]["trafficPolicy"]["tls"]["mode"] == "ISTIO_MUTUAL"
    assert by_kind(objects, "Namespace")[0]["metadata"]["labels"]["istio-injection"] == "enabled"


def _mutated(objects, kind, edit):
    obj = copy.deepcopy(next(o for o in objects if o["kind"] == kind))
    edit(obj)
    return obj


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


@pytest.mark.parametrize(
    "kind,edit,message",
    [
        ("InferenceService", lambda o: _rename(o["spec"]["predictor"], "minReplicas", "minReplica"), "did you mean 'minReplicas'"),
        ("InferenceService", lambda o: _rename(o["spec"]["predictor"]["model"], "storageUri", "storageURI"), "storageURI"),
        ("InferenceService", lambda o: o["spec"]["predictor"].update(maxReplicas="6"), "expected int"),
        ("ServingRuntime", lambda o: _rename(o["spec"]["containers"][0], "readinessProbe", "readinesProbe"), "readinessProbe"),
        ("InferenceGraph", lambda o: _rename(o["spec"]["nodes"]["root"]["steps"][1], "serviceUrl", "serviceURL"), "serviceURL"),
        ("Namespace", lambda o: _rename(o["metadata"], "labels", "lables"), "lables"),
        ("PodDisruptionBudget", lambda o: _rename(o["spec"], "minAvailable", "minAvailible"), "minAvailible"),
        ("PeerAuthentication", lambda o: _rename(o["spec"]["mtls"], "mode", "mdoe"), "mdoe"),
        ("DestinationRule", lambda o: o["spec"]["trafficPolicy"]["tls"].update(mode="ISTIO_MUTAL"), "ISTIO_MUTUAL"),
    ],
)
def test_a_typo_fails_validation(objects, kind, edit, message):
    validate_object(next(o for o in objects if o["kind"] == kind))  # the original passes
    with pytest.raises(ManifestError, match=message.replace("(", r"\(")):
        validate_object(_mutated(objects, kind, edit))


def _settings_with(edit) -> dict:
    data = yaml.safe_load(SHIPPED.read_text())
    edit(data)
    return data


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: _rename(d["pools"]["reasoning"], "replicas", "replica"), r"pools\.reasoning\.replica: unknown field; did you mean 'replicas'"),
        (lambda d: d["pools"]["refinement"]["replicas"].update(min=5, max=2), r"pools\.refinement\.replicas: max \(2\) must be >= min \(5\)"),
        (lambda d: d.update(deployment_mode="RawDeployment"), r"'concurrency' is not available in RawDeployment mode"),
        (lambda d: d["images"].update(triton="nvcr.io/nvidia/tritonserver:latest"), r"images\.triton: .*fixed tag"),
        (lambda d: d["pools"]["reasoning"].update(storage_uri="/local/path"), r"pools\.reasoning\.storage_uri: .*s3://"),
        (lambda d: d.update(mtls="PERMISSIVE"), r"mtls: .*STRICT"),
        (lambda d: d.pop("namespace"), r"namespace: required field is missing"),
    ],
)
def test_settings_errors_name_the_field_and_the_fix(edit, message):
    with pytest.raises(TandemError, match=message):
        parse_settings(_settings_with(edit), "kserve.yaml")


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory, tiny_artifacts: Path) -> Path:
    out = tmp_path_factory.mktemp("deploy") / "build"
    assert main(["build", "--config", "tiny", "--target", "cpu", "--out", str(out), "--export", str(tiny_artifacts)]) == 0
    return out


def test_bundle_from_a_build(tiny_build: Path, tmp_path: Path, capsys):
    out = tmp_path / "bundle"
    assert main(["deploy", "--build", str(tiny_build), "--config", str(SHIPPED), "--out", str(out)]) == 0
    assert "kubectl apply -f" in capsys.readouterr().out
    for stage, other in (("reasoning", "refinement"), ("refinement", "reasoning")):
        repo = out / "repositories" / stage
        assert sorted(p.name for p in repo.iterdir()) == [stage]  # this stage only: no other stage, no ensemble
        assert parse_config(repo / stage / CONFIG_NAME).name == stage
    applied = [o for o in yaml.safe_load_all((out / "manifests" / "kserve.yaml").read_text()) if o]
    validate_all(applied)
    record = json.loads((out / "deploy.json").read_text())
    assert record["target"] == "cpu" and len(record["objects"]) == len(applied)
    key = next(o for o in applied if o["kind"] == "Secret")["stringData"]["key"]
    assert len(key) >= 32 and key not in (out / "deploy.json").read_text()
    assert (out / "manifests" / "kserve.yaml").stat().st_mode & 0o077 == 0  # holds the Secret: private
    # again over its own bundle: replaced; over a folder it did not write: refused, untouched
    assert main(["deploy", "--build", str(tiny_build), "--out", str(out), "--config", str(SHIPPED)]) == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert main(["deploy", "--build", str(tiny_build), "--out", str(foreign), "--config", str(SHIPPED)]) == 2
    assert "not a tandem deploy bundle" in capsys.readouterr().err
    assert (foreign / "keep.txt").read_text() == "mine"


def test_deploy_refuses_what_is_not_a_build(tmp_path: Path, capsys):
    assert main(["deploy", "--build", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "tandem build" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


HOP_CHECK = r"""
import json, sys
import numpy as np
from kserve import InferOutput, InferResponse
from tandem.deploy.hop import HopError, refinement_request, with_scene_tokens

tokens = np.array([[7, 3, 63, 0], [1, 2, 3, 4]], dtype=np.int32)
reasoning_response = {"model_name": "reasoning", "id": "r1",
                      "outputs": [{"name": "scene_tokens", "datatype": "INT32", "shape": [2, 4], "data": tokens.ravel().tolist()}]}
request = refinement_request(json.loads(json.dumps(reasoning_response)))
rest, _ = request.to_rest()
assert request.model_name == "refinement" and [i["name"] for i in rest["inputs"]] == ["scene_tokens"], rest
assert np.array_equal(request.inputs[0].as_numpy(), tokens)
image = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
out = InferOutput("image", list(image.shape), "UINT8"); out.set_data_from_numpy(image, binary_data=False)
body = with_scene_tokens(InferResponse("r1", "refinement", [out]), request)
outputs = {o["name"]: o for o in body["outputs"]}
assert set(outputs) == {"image", "scene_tokens"}
assert outputs["scene_tokens"]["data"] == tokens.ravel().tolist() and outputs["scene_tokens"]["shape"] == [2, 4]
for bad in ({"inputs": []}, {"outputs": [{"name": "image"}]},
            {"outputs": [{"name": "scene_tokens", "datatype": "INT32", "shape": [1, 3], "data": [9991, 9992]}]}):
    try:
        refinement_request(bad)
    except HopError as exc:
        assert "9991" not in str(exc), exc  # names and shapes, never token values
    else:
        raise AssertionError(f"accepted {bad}")
print("HOP OK")
"""


def test_hop_turns_reasoning_response_into_refinement_request_and_returns_tokens():
    # its own process: kserve's model server and tritonclient register the same protobuf symbols
    result = subprocess.run([sys.executable, "-c", HOP_CHECK], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and "HOP OK" in result.stdout, result.stderr[-3000:]
