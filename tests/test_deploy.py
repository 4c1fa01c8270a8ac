"""`tandem deploy`: settings validation, every generated manifest validated offline (kubernetes-validate,
kserve SDK models, Istio schemas), typo'd fields refused, pod hardening, access and body-limit policies,
the images the manifests name and the recipe that builds them, the bundle from a real build (flags,
old spellings, --json on every exit), the hop."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tandem.cli import main
from tandem.deploy.bundle import production_warning
from tandem.deploy.images import BUILD_COMMANDS, HOP_IMAGE, IMAGE_USER, TRITON_IMAGE, TRITON_RELEASE
from tandem.formats.targets import get_target
from tandem.deploy.manifests import build_objects
from tandem.deploy.settings import load_settings, parse_settings
from tandem.deploy.validate import ManifestError, validate_all, validate_object
from tandem.errors import TandemError
from tandem.serving.repository import CONFIG_NAME, parse_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs" / "deploy" / "kserve.yaml"
BODY_LIMIT = 81_920


@pytest.fixture(scope="module")
def settings():
    return load_settings(SHIPPED)


@pytest.fixture(scope="module")
def objects(settings):
    return build_objects(settings, get_target("h100"), "small", BODY_LIMIT)


def named(objects, kind, name):
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def isvc(objects, stage):
    return next(o for o in by_kind(objects, "InferenceService") if o["metadata"]["name"].endswith(stage))


@pytest.mark.parametrize("target", ["cpu", "h100", "a100", "inf2"])
def test_every_object_validates_offline(settings, target):
    objects = build_objects(settings, get_target(target), "small", BODY_LIMIT)
    how = validate_all(objects)
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "PeerAuthentication", "DestinationRule", "AuthorizationPolicy", "EnvoyFilter", "ServiceAccount",
            "ServingRuntime", "InferenceService", "InferenceGraph"} <= kinds
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
        assert predictor["model"]["storageUri"] == f"s3://tandem-models/small/{stage}"  # from the build's config name
        assert predictor["model"]["name"] == "kserve-container"  # never '' (the SDK's default)
        assert "logger" not in predictor  # no payload logging: scene tokens never land in a log
    assert reasoning["spec"]["predictor"]["nodeSelector"] != refinement["spec"]["predictor"]["nodeSelector"]
    assert "transformer" in refinement["spec"] and "transformer" not in reasoning["spec"]

    for runtime in by_kind(objects, "ServingRuntime"):
        container = runtime["spec"]["containers"][0]
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert "--log-verbose=0" in container["args"] and "--model-control-mode=none" in container["args"]
        # HTTP only: a Knative revision exposes one port, so gRPC is off rather than declared and unreachable
        assert runtime["spec"]["protocolVersions"] == ["v2"] and "--allow-grpc=false" in container["args"]
        assert [p["containerPort"] for p in container["ports"]] == [8080] and "--http-port=8080" in container["args"]
        # admin APIs closed as in single-server `tandem serve`: behind a key from the Secret
        restricted = [a for a in container["args"] if a.startswith(("--http-restricted-api=", "--grpc-restricted-protocol="))]
        assert len(restricted) == 1 and all("shared-memory" in a and a.endswith("=$(TANDEM_ADMIN_KEY)") for a in restricted)
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


def _pod_specs(objects):
    """(where, pod-level spec fields, containers) of every pod spec tandem writes."""
    for service in by_kind(objects, "InferenceService"):
        for component in ("predictor", "transformer"):
            spec = service["spec"].get(component)
            if spec is not None:
                yield f"{service['metadata']['name']}.{component}", spec


def test_every_pod_is_hardened(settings, objects):
    runtimes = {o["metadata"]["name"]: o for o in by_kind(objects, "ServingRuntime")}
    for where, spec in _pod_specs(objects):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == pod["runAsGroup"] == IMAGE_USER, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        if "model" in spec:  # a predictor: Triton's container and volumes come from its ServingRuntime
            runtime = runtimes[spec["model"]["runtime"]]["spec"]
            containers, volumes = runtime["containers"], runtime["volumes"]
            resources = spec["model"]["resources"]
        else:
            containers, volumes = spec["containers"], spec["volumes"]
            resources = containers[0]["resources"]
        assert resources["requests"]["cpu"] == resources["limits"]["cpu"] and resources["requests"]["memory"] == resources["limits"]["memory"], where
        for container in containers:
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True and isinstance(sc["runAsUser"], int) and sc["runAsUser"] > 0, where
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts, where
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["HOME"] == "/tmp" and env["PYTHONDONTWRITEBYTECODE"] == "1", where
        by_name = {v["name"]: v for v in volumes}
        assert by_name["tmp"]["emptyDir"]["sizeLimit"], where
        if "model" in spec:  # Triton's python backend passes tensors through /dev/shm: memory-backed and sized
            assert "/dev/shm" in mounts
            assert by_name["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": settings.pool(where.split("-")[1].split(".")[0]).shm}
    graph = by_kind(objects, "InferenceGraph")[0]["spec"]
    assert graph["resources"]["requests"] == graph["resources"]["limits"] == {"cpu": "1", "memory": "512Mi"}


def test_service_accounts_and_storage_credentials(settings, objects):
    accounts = {o["metadata"]["name"]: o for o in by_kind(objects, "ServiceAccount")}
    assert set(accounts) == {"tandem-storage", "tandem-graph", "tandem-hop"}
    assert all(a["automountServiceAccountToken"] is False for a in accounts.values())
    assert accounts["tandem-storage"]["secrets"] == [{"name": "tandem-storage-credentials"}]  # by name: tandem writes no key
    assert "secrets" not in accounts["tandem-graph"] and "secrets" not in accounts["tandem-hop"]
    assert [s["metadata"]["name"] for s in by_kind(objects, "Secret")] == ["tandem-triton-admin"]  # no storage Secret written
    for stage in ("reasoning", "refinement"):
        assert isvc(objects, stage)["spec"]["predictor"]["serviceAccountName"] == "tandem-storage"
    assert isvc(objects, "refinement")["spec"]["transformer"]["serviceAccountName"] == "tandem-hop"
    assert by_kind(objects, "InferenceGraph")[0]["spec"]["serviceAccountName"] == "tandem-graph"


def _sources(policy):
    rule = policy["spec"]["rules"][0]["from"]
    principals = [p for f in rule for p in f["source"].get("principals", [])]
    namespaces = [n for f in rule for n in f["source"].get("namespaces", [])]
    return principals, namespaces


@pytest.mark.parametrize("mode", ["Serverless", "RawDeployment"])
def test_who_may_call_what(mode):
    data = yaml.safe_load(SHIPPED.read_text())
    data["deployment_mode"] = mode
    if mode == "RawDeployment":
        for pool in data["pools"].values():
            pool["autoscaling"] = {"metric": "cpu", "target": 70}
    objects = build_objects(parse_settings(data), get_target("h100"), "small", BODY_LIMIT)
    validate_all(objects)
    policies = {o["metadata"]["name"]: o for o in by_kind(objects, "AuthorizationPolicy")}
    graph_sa, hop_sa = "cluster.local/ns/tandem/sa/tandem-graph", "cluster.local/ns/tandem/sa/tandem-hop"
    knative = ["knative-serving"] if mode == "Serverless" else []
    # everything else denied: an ALLOW-nothing policy over the whole namespace
    assert policies["tandem-deny-by-default"]["spec"] == {}
    expected = {
        "tandem-graph-callers": ({"serving.kserve.io/inferencegraph": "tandem"},
                                 [graph_sa, "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"]),
        "tandem-reasoning-callers": ({"serving.kserve.io/inferenceservice": "tandem-reasoning", "component": "predictor"}, [graph_sa]),
        "tandem-hop-callers": ({"serving.kserve.io/inferenceservice": "tandem-refinement", "component": "transformer"}, [graph_sa]),
        "tandem-refinement-callers": ({"serving.kserve.io/inferenceservice": "tandem-refinement", "component": "predictor"}, [hop_sa]),
    }
    assert set(policies) == {"tandem-deny-by-default", *expected}
    for name, (selector, principals) in expected.items():
        policy = policies[name]
        assert policy["spec"]["action"] == "ALLOW" and policy["spec"]["selector"]["matchLabels"] == selector, name
        assert _sources(policy) == (principals, knative), name
    # the PDBs select the predictors by the same labels the policies use
    for pdb in by_kind(objects, "PodDisruptionBudget"):
        stage = pdb["metadata"]["name"].split("-")[1]
        assert pdb["spec"]["selector"]["matchLabels"] == expected[f"tandem-{stage}-callers"][0]


def test_configured_graph_callers():
    data = yaml.safe_load(SHIPPED.read_text())
    data["access"] = {"trust_domain": "prod.example", "graph_callers": {
        "principals": ["prod.example/ns/gateways/sa/edge"], "namespaces": ["clients"]}}
    objects = build_objects(parse_settings(data), get_target("cpu"), "small", BODY_LIMIT)
    validate_all(objects)
    principals, namespaces = _sources(named(objects, "AuthorizationPolicy", "tandem-graph-callers"))
    assert principals == ["prod.example/ns/tandem/sa/tandem-graph", "prod.example/ns/gateways/sa/edge"]
    assert namespaces == ["clients", "knative-serving"]
    assert _sources(named(objects, "AuthorizationPolicy", "tandem-reasoning-callers"))[0] == ["prod.example/ns/tandem/sa/tandem-graph"]


def test_request_bodies_are_capped_at_the_graph_and_the_predictors(objects):
    filters = {o["metadata"]["name"]: o["spec"] for o in by_kind(objects, "EnvoyFilter")}
    assert {name: spec["workloadSelector"]["matchLabels"] for name, spec in filters.items()} == {
        "tandem-graph-body-limit": {"serving.kserve.io/inferencegraph": "tandem"},
        "tandem-reasoning-body-limit": {"serving.kserve.io/inferenceservice": "tandem-reasoning", "component": "predictor"},
        "tandem-refinement-body-limit": {"serving.kserve.io/inferenceservice": "tandem-refinement", "component": "predictor"},
    }
    for spec in filters.values():
        (patch,) = spec["configPatches"]
        assert patch["applyTo"] == "HTTP_FILTER" and patch["match"]["context"] == "SIDECAR_INBOUND"
        assert patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == "envoy.filters.http.router"
        assert patch["patch"]["operation"] == "INSERT_BEFORE"
        assert patch["patch"]["value"] == {"name": "envoy.filters.http.buffer", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer", "max_request_bytes": BODY_LIMIT}}


def test_the_manifests_name_the_images_the_documented_commands_build(settings):
    readme = (ROOT / "README.md").read_text()
    for command in BUILD_COMMANDS:
        assert command in readme  # the README documents the exact build commands
    tags = re.findall(r"docker build -f deploy/Dockerfile --target (\w+) -t (\S+) \.", readme)
    assert dict(tags) == {"triton": TRITON_IMAGE, "hop": HOP_IMAGE}
    assert (settings.images.triton, settings.images.hop) == (TRITON_IMAGE, HOP_IMAGE)  # the shipped config
    assert parse_settings({k: v for k, v in yaml.safe_load(SHIPPED.read_text()).items() if k != "images"}).images.triton == TRITON_IMAGE
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    for command in BUILD_COMMANDS:
        assert command in dockerfile  # its header says how it is built, with the same tags
    stages = dict(re.findall(r"^FROM (\S+) AS (\w+)$", dockerfile, re.M)[i][::-1] for i in range(2))
    assert set(stages) == {"triton", "hop"}
    assert f"ARG TRITON_RELEASE={TRITON_RELEASE}" in dockerfile and stages["triton"] == "nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3"
    assert re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.M) == [(str(IMAGE_USER), str(IMAGE_USER))] * 2  # = runAsUser
    for copied in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M):
        for path in copied.split():
            assert (ROOT / path).exists(), path


SERVED_IMPORTS = r"""
import importlib.metadata as md, json, sys, types
sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
before = {m.split(".")[0] for m in sys.modules}
import tandem.compiler.served.reasoning, tandem.compiler.served.refinement, tandem.runtimes.onnxruntime, onnxruntime
modules = {m.split(".")[0] for m in sys.modules} - before
dists = md.packages_distributions()
print(json.dumps(sorted({d for m in modules for d in dists.get(m, [])} - {"tandem"})))
"""


def test_triton_requirements_pin_every_serving_import():
    """deploy/requirements-triton.txt (installed into the Triton image's python backend) pins every
    distribution tandem's served models import, exactly (onnxruntime as its CUDA build)."""
    result = subprocess.run([sys.executable, "-c", SERVED_IMPORTS], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    pins = {}
    for line in (ROOT / "deploy" / "requirements-triton.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{line}: pin it with =="
            pins[norm(name)] = version
    needed = {norm(d) for d in json.loads(result.stdout)}
    needed = {"onnxruntime-gpu" if d == "onnxruntime" else d for d in needed}
    assert needed <= set(pins), needed - set(pins)


@pytest.mark.parametrize(
    "config,uri,warned",
    [
        ("tiny", "s3://tandem-models/tiny/reasoning", True),
        ("small", "gs://acme-inference/small/refinement", True),
        ("tiny", "s3://tandem-dev/tiny/reasoning", False),
        ("small", "s3://ci-scratch/models/small/reasoning", False),
        ("seed", "s3://tandem-models/seed/reasoning", False),
        ("my-config", "s3://tandem-models/my-config/reasoning", False),
    ],
)
def test_non_production_config_to_production_storage_is_warned(config, uri, warned):
    warning = production_warning(config, uri)
    assert (warning is not None) == warned
    if warned:
        assert config in warning and uri in warning and "dev/test bucket" in warning



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
        ("AuthorizationPolicy", lambda o: o["spec"].update(selecter={}), "selecter"),
        ("EnvoyFilter", lambda o: _rename(o["spec"], "workloadSelector", "workloadSelecter"), "workloadSelecter"),
        ("EnvoyFilter", lambda o: o["spec"]["configPatches"][0]["match"].update(context="SIDECAR_INBOUD"), "SIDECAR_INBOUND"),
        ("ServiceAccount", lambda o: _rename(o, "automountServiceAccountToken", "automountToken"), "automountToken"),
        ("InferenceService", lambda o: _rename(o["spec"]["predictor"]["securityContext"], "runAsNonRoot", "runAsNonroot"), "runAsNonroot"),
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
        (lambda d: d["images"].update(hop="registry.example.com/tandem/hop:0.1.0"), r"images\.hop: .*placeholder.*docker build -f deploy/Dockerfile"),
        (lambda d: d["storage"].update(uri="/local/path"), r"storage\.uri: .*s3://"),
        (lambda d: d["pools"]["reasoning"].update(storage_uri="s3://b/small/reasoning"), r"pools\.reasoning: .*storage_uri moved: set storage\.uri"),
        (lambda d: d["pools"]["reasoning"].update(memory="32 GB"), r"pools\.reasoning\.memory: .*not a Kubernetes quantity"),
        (lambda d: d["storage"].update(service_account="tandem-graph"), r"storage\.service_account 'tandem-graph' is the graph's"),
        (lambda d: d["security"].update(run_as_user=0), r"security\.run_as_user: .*greater than or equal to 1"),
        (lambda d: d.update(mtls="PERMISSIVE"), r"mtls: .*STRICT"),
        (lambda d: d.pop("namespace"), r"namespace: required field is missing"),
        # who may call the graph: a misconfigured principal list is refused with the field and the fix
        (lambda d: d["access"]["graph_callers"].update(principals=["*"]), r"access\.graph_callers\.principals: .*any caller in; name each caller as <trust domain>/ns/<namespace>/sa/<service account>"),
        (lambda d: d["access"]["graph_callers"].update(principals=["spiffe://cluster.local/ns/a/sa/b"]), r"access\.graph_callers\.principals: .*without spiffe://; use 'cluster\.local/ns/a/sa/b'"),
        (lambda d: d["access"]["graph_callers"].update(principals=["istio-ingressgateway"]), r"access\.graph_callers\.principals: 'istio-ingressgateway' is not an Istio principal; write <trust domain>/ns/<namespace>/sa/<service account>"),
        (lambda d: d["access"]["graph_callers"].update(principals=["example.org/ns/a/sa/b"]), r"access: .*trust domain 'example\.org'.*write it as cluster\.local/ns/a/sa/b or set access\.trust_domain"),
        (lambda d: d["access"]["graph_callers"].update(principals="cluster.local/ns/a/sa/b"), r"access\.graph_callers\.principals: Input should be a valid list"),
        (lambda d: d["access"]["graph_callers"].update(namespaces=["*"]), r"access\.graph_callers\.namespaces: .*every namespace"),
        (lambda d: _rename(d["access"], "graph_callers", "graph_caller"), r"access\.graph_caller: unknown field; did you mean 'graph_callers'"),
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
    assert main(["deploy", "--artifacts", str(tiny_build), "--deploy-config", str(SHIPPED), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "kubectl apply -f" in captured.out and "--from-env-file" in captured.out
    # a tiny build to the shipped (production-looking) bucket: warned, and stored under tiny/, not small/
    assert "warning: this is a 'tiny' build" in captured.err
    for stage, other in (("reasoning", "refinement"), ("refinement", "reasoning")):
        repo = out / "repositories" / stage
        assert sorted(p.name for p in repo.iterdir()) == [stage, "tandem-repository.json"]  # this stage only: no other stage, no ensemble
        assert parse_config(repo / stage / CONFIG_NAME).name == stage
    assert not [p for p in out.rglob("*") if p.name == "__pycache__" or p.suffix in (".pyc", ".pyo")]  # no bytecode
    applied = [o for o in yaml.safe_load_all((out / "manifests" / "kserve.yaml").read_text()) if o]
    validate_all(applied)
    for stage in ("reasoning", "refinement"):
        assert isvc(applied, stage)["spec"]["predictor"]["model"]["storageUri"] == f"s3://tandem-models/tiny/{stage}"
    record = json.loads((out / "deploy.json").read_text())
    assert record["target"] == "cpu" and record["config"] == "tiny" and len(record["objects"]) == len(applied)
    # the body limit is the repositories' recorded tandem.max_request_bytes
    recorded = max(int(parse_config(out / "repositories" / s / s / CONFIG_NAME).parameters["tandem.max_request_bytes"].string_value)
                   for s in ("reasoning", "refinement"))
    assert record["max_request_bytes"] == recorded
    for envoy_filter in by_kind(applied, "EnvoyFilter"):
        assert envoy_filter["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["max_request_bytes"] == recorded
    key = next(o for o in applied if o["kind"] == "Secret")["stringData"]["key"]
    assert len(key) >= 32 and key not in (out / "deploy.json").read_text()
    assert (out / "manifests" / "kserve.yaml").stat().st_mode & 0o077 == 0  # holds the Secret: private
    # again over its own bundle: replaced; over a folder it did not write: refused, untouched
    assert main(["deploy", "--artifacts", str(tiny_build), "--out", str(out), "--deploy-config", str(SHIPPED)]) == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert main(["deploy", "--artifacts", str(tiny_build), "--out", str(foreign), "--deploy-config", str(SHIPPED)]) == 2
    assert "not a tandem deploy bundle" in capsys.readouterr().err
    assert (foreign / "keep.txt").read_text() == "mine"


def test_old_spellings_still_work_for_one_release(tiny_build: Path, tmp_path: Path, capsys):
    out = tmp_path / "bundle"
    assert main(["deploy", "--build", str(tiny_build), "--config", str(SHIPPED), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "--build is deprecated" in err and "use --artifacts" in err and "--config for the deployment YAML is deprecated" in err
    assert (out / "manifests" / "kserve.yaml").exists()
    # --config with another meaning (a model config), or both spellings at once: refused with the fix
    for argv, message in (
        (["--artifacts", str(tiny_build), "--config", "tiny"], "takes the model config from the build (--artifacts); name the deployment YAML with --deploy-config"),
        (["--artifacts", str(tiny_build), "--config", str(SHIPPED), "--deploy-config", str(SHIPPED)], "both given"),
        (["--artifacts", str(tiny_build), "--build", str(tmp_path)], "both --artifacts and --build given"),
        ([], "name the build to deploy: tandem deploy --artifacts BUILD_DIR"),
    ):
        assert main(["deploy", *argv, "--out", str(tmp_path / "other")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "other").exists()


def test_deploy_refuses_what_is_not_a_build(tmp_path: Path, capsys):
    assert main(["deploy", "--artifacts", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "tandem build" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def _tandem_json(*argv: str) -> tuple[int, dict]:
    result = subprocess.run([sys.executable, "-m", "tandem", *argv], capture_output=True, text=True, cwd=ROOT, timeout=300)
    return result.returncode, json.loads(result.stdout)  # exactly one JSON object, nothing else


def test_json_is_one_object_on_every_exit(tiny_build: Path, tmp_path: Path):
    code, data = _tandem_json("deploy", "--artifacts", str(tiny_build), "--out", str(tmp_path / "b"), "--json")
    assert code == 0 and data["ok"] and data["command"] == "deploy" and data["schema_version"] >= 1
    assert data["config"] == "tiny" and data["target"] == "cpu" and data["deployment_mode"] == "Serverless"
    assert data["repositories"]["reasoning"]["storage_uri"] == "s3://tandem-models/tiny/reasoning"
    assert data["images"] == {"triton": TRITON_IMAGE, "hop": HOP_IMAGE}
    assert data["storage"]["credentials_secret"] == "tandem-storage-credentials" and data["max_request_bytes"] > 0
    assert any("'tiny' build" in w for w in data["warnings"]) and data["apply"].startswith("kubectl apply -f")
    assert {o["kind"] for o in data["objects"]} >= {"AuthorizationPolicy", "EnvoyFilter", "InferenceGraph"}
    for argv, code_expected, message in (
        (["--artifacts", str(tmp_path), "--out", str(tmp_path / "c")], 2, "tandem build"),  # not a build
        (["--artifacts", str(tiny_build)], 2, "--out"),  # usage: a required flag missing
        (["--artifacts", str(tiny_build), "--out", str(tmp_path / "d"), "--no-such-flag"], 2, "--no-such-flag"),  # usage: unknown flag
    ):
        code, data = _tandem_json("deploy", *argv, "--json")
        assert code == code_expected and data["exit_code"] == code_expected and not data["ok"], data
        assert message in data["error"], data


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


def test_hop_serves_on_an_inherited_socket_and_binds_nothing():
    """The start-up race of the hop (a port picked, released, then taken by another process before
    the hop bound it: uvicorn exits 3) cannot happen with --listen_fd: the parent binds and holds
    the port. Here --http_port names a port another socket holds; the hop must not even try it."""
    import socket
    import time
    import urllib.request

    listener = socket.create_server(("127.0.0.1", 0))
    occupied = socket.create_server(("127.0.0.1", 0))  # what a racing process would hold
    port = listener.getsockname()[1]
    with listener:
        process = subprocess.Popen(
            [sys.executable, "-m", "tandem.deploy.hop", "--model_name", "refinement", "--predictor_host", "127.0.0.1:9",
             "--http_port", str(occupied.getsockname()[1]), "--listen_fd", str(listener.fileno()), "--enable_grpc", "false",
             "--workers", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, pass_fds=(listener.fileno(),),
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/live", timeout=5) as response:
                    assert response.status == 200
                    break
            except OSError:
                pass
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "hop not live"
            time.sleep(0.3)
    finally:
        process.terminate()
        process.communicate(timeout=30)
        occupied.close()
