"""The Triton model repository writer, its configs, the native refinement graph and the request
parsing shared by the python-backend models. No server here (see test_serving.py)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from tandem.errors import ArtifactError, TandemError
from tandem.pipeline import Pipeline
from tandem.runtimes import make_runtime
from tandem.serving.client import generation_arrays, parse_url, tokens_array
from tandem.serving.interface import ENSEMBLE, IMAGE, PROMPT, REASONING, REFINEMENT, RENDERED_TOKENS, SCENE_TOKENS
from tandem.serving.models.common import parse_prompts, parse_sampling, parse_scene_tokens
from tandem.serving.repository import FLAVORS, existing_versions, write_repository

MODELS = (REASONING, REFINEMENT, ENSEMBLE)


def parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


@pytest.fixture(scope="module")
def pipeline(tiny_artifacts: Path) -> Pipeline:
    return Pipeline(make_runtime("onnxruntime", artifacts=tiny_artifacts))


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
def test_every_config_parses_with_tritons_schema(tmp_path: Path, tiny_artifacts: Path, tiny_config, flavor: str):
    repo = write_repository(tiny_artifacts, tmp_path / "repo", flavor=flavor, max_batch_size=4)
    configs = {m: parse(repo / m / "config.pbtxt") for m in MODELS}
    n_tokens = tiny_config.scene.num_tokens
    for name in (REASONING, REFINEMENT):
        c = configs[name]
        assert c.name == name and c.max_batch_size == 4
        assert len(c.instance_group) == 1 and c.instance_group[0].count == 1
        assert c.parameters["tandem.grid"].string_value == "4x4"
    # The python models form their own batches, so Triton's dynamic batcher is left out (its batcher
    # thread can sit out a 500 ms wait on Triton 2.51, see stage_config): in-flight reasoning takes a
    # request at every decode step and holds the 16 waiting prompts itself, with the queue timeout.
    reasoning = configs[REASONING]
    assert not reasoning.HasField("dynamic_batching")
    assert reasoning.parameters["scheduler"].string_value == "inflight"
    assert reasoning.parameters["max_waiting"].string_value == "16"
    assert reasoning.parameters["queue_timeout_ms"].string_value == "60000"
    assert reasoning.parameters["max_queue_delay_us"].string_value == "10000"  # its admission window when idle
    # Refinement behind reasoning only gets work reasoning admitted and finished: no waiting limit and
    # no queue timeout there, so admitted work is never thrown away (a client's timeout still applies).
    refinement = configs[REFINEMENT]
    if flavor == "native":  # Triton's onnxruntime backend: Triton batches it
        assert list(refinement.dynamic_batching.preferred_batch_size) == [2, 4]
        policy = refinement.dynamic_batching.default_queue_policy
        assert policy.timeout_action == mc.ModelQueuePolicy.REJECT and policy.allow_timeout_override
        assert refinement.dynamic_batching.max_queue_delay_microseconds > 0
        assert policy.max_queue_size == 0 and policy.default_timeout_microseconds == 0
    else:  # the render thread batches it, after a gather window
        assert not refinement.HasField("dynamic_batching")
        assert int(refinement.parameters["max_queue_delay_us"].string_value) > 0
        assert "max_waiting" not in refinement.parameters and "queue_timeout_ms" not in refinement.parameters
    assert configs[REASONING].backend == "python"
    assert [i.name for i in configs[REASONING].input] == [PROMPT, "seed", "temperature", "top_k"]
    assert configs[REASONING].input[0].data_type == mc.TYPE_STRING
    assert configs[REASONING].output[0].data_type == mc.TYPE_INT32 and list(configs[REASONING].output[0].dims) == [n_tokens]
    image = configs[REFINEMENT].output[0]
    assert image.data_type == mc.TYPE_UINT8 and list(image.dims) == [tiny_config.image_height, tiny_config.image_width, 3]
    if flavor == "native":
        assert configs[REFINEMENT].platform == "onnxruntime_onnx"
        assert configs[REFINEMENT].instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
        assert (repo / REFINEMENT / "1" / "model.onnx").exists()
    else:
        assert configs[REFINEMENT].backend == "python"
        assert configs[REFINEMENT].instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        assert (repo / REFINEMENT / "1" / "model.py").exists()
    ensemble = configs[ENSEMBLE]
    assert ensemble.platform == "ensemble" and ensemble.max_batch_size == 4
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == [REASONING, REFINEMENT]
    assert {o.name for o in ensemble.output} == {IMAGE, SCENE_TOKENS}
    assert (repo / ENSEMBLE / "1").is_dir()


def test_versions_are_added_atomically_and_pruned(tmp_path: Path, tiny_artifacts: Path):
    repo = tmp_path / "repo"
    write_repository(tiny_artifacts, repo)
    write_repository(tiny_artifacts, repo, max_queue_delay_us=123)
    assert all(existing_versions(repo / m) == [1, 2] for m in MODELS)
    write_repository(tiny_artifacts, repo, keep_versions=2)
    assert all(existing_versions(repo / m) == [2, 3] for m in MODELS)

    # A broken export fails while the new version is staged: no version 4, configs untouched, no debris.
    broken = tmp_path / "broken"
    shutil.copytree(tiny_artifacts, broken)
    (broken / "refinement.ort.onnx").write_bytes(b"not onnx")
    before = {m: (repo / m / "config.pbtxt").read_text() for m in MODELS}
    with pytest.raises(ArtifactError, match="corrupt or was modified"):
        write_repository(broken, repo)
    assert all(existing_versions(repo / m) == [2, 3] for m in MODELS)
    assert {m: (repo / m / "config.pbtxt").read_text() for m in MODELS} == before
    leftovers = [p for p in repo.rglob("*") if "staging" in p.name or p.name.endswith(".tmp")]
    assert leftovers == []


def test_shipped_artifacts_are_hashed_copies_of_the_export(tmp_path: Path, tiny_artifacts: Path):
    repo = write_repository(tiny_artifacts, tmp_path / "repo", link=False)
    shipped = repo / REASONING / "1" / "artifacts"
    assert sorted(p.name for p in shipped.iterdir()) == ["manifest.json", "reasoning_decode.ort.onnx", "reasoning_prefill.ort.onnx"]
    assert (shipped / "reasoning_decode.ort.onnx").read_bytes() == (tiny_artifacts / "reasoning_decode.ort.onnx").read_bytes()


def test_bad_repository_requests_are_refused(tmp_path: Path, tiny_artifacts: Path):
    with pytest.raises(TandemError, match="unknown repository flavor 'tensorrt'"):
        write_repository(tiny_artifacts, tmp_path / "r", flavor="tensorrt")
    with pytest.raises(TandemError, match=r"unknown repository option\(s\) \['max_delay'\]"):
        write_repository(tiny_artifacts, tmp_path / "r", max_delay=5)
    with pytest.raises(TandemError, match="exceeds the batch size the graphs were exported"):
        write_repository(tiny_artifacts, tmp_path / "r", max_batch_size=64)
    with pytest.raises(TandemError, match="preferred batch size 16"):
        write_repository(tiny_artifacts, tmp_path / "r", preferred_batch_sizes=(16,))
    with pytest.raises(ArtifactError, match="does not exist"):
        write_repository(tmp_path / "missing", tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_native_refinement_graph_matches_the_pipeline(tmp_path: Path, tiny_artifacts: Path, pipeline: Pipeline):
    """The onnxruntime_onnx model speaks the wire format (INT32 [B, N] -> UINT8 [B, H, W, 3]) and
    paints what the in-process pipeline paints."""
    repo = write_repository(tiny_artifacts, tmp_path / "repo", flavor="native")
    session = ort.InferenceSession(str(repo / REFINEMENT / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [(SCENE_TOKENS, "tensor(int32)")]
    assert [(o.name, o.type) for o in session.get_outputs()] == [(IMAGE, "tensor(uint8)"), (RENDERED_TOKENS, "tensor(int32)")]
    h, w = pipeline.grid
    tokens = np.random.default_rng(0).integers(0, pipeline.config.scene.codebook_size, size=(3, h * w)).astype(np.int32)
    served, rendered = session.run([IMAGE, RENDERED_TOKENS], {SCENE_TOKENS: tokens})
    assert np.array_equal(rendered, tokens)  # passed through for the ensemble's scene_tokens output
    expected = pipeline.render(tokens.reshape(3, h, w))
    assert served.shape == expected.shape and served.dtype == np.uint8
    # The native graph runs the plain export, in-process runs ORT's optimised copy: one level of rounding.
    assert int(np.abs(served.astype(np.int16) - expected).max()) <= 1


def test_request_parsing_names_the_problem():
    prompts = parse_prompts(np.array([["a red circle".encode()], ["two squares".encode()]], dtype=object))
    assert prompts == ["a red circle", "two squares"]
    with pytest.raises(TandemError, match="not valid UTF-8"):
        parse_prompts(np.array([[b"\xff\xfe"]], dtype=object))
    params = parse_sampling(2, np.array([[1], [2]]), np.array([[0.5], [0.0]]), None)
    assert [(p.seed, p.temperature, p.top_k) for p in params] == [(1, 0.5, 0), (2, 0.0, 0)]
    with pytest.raises(TandemError, match="seed must be in"):
        parse_sampling(1, np.array([[-3]]), None, None)
    with pytest.raises(TandemError, match="'temperature' has 1 rows but 'prompt' has 2"):
        parse_sampling(2, None, np.array([[0.5]]), None)
    ok = parse_scene_tokens(np.arange(32, dtype=np.int32).reshape(2, 16) % 64, (4, 4), 64)
    assert ok.shape == (2, 4, 4) and ok.dtype == np.int64
    with pytest.raises(TandemError, match=r"1 scene tokens are outside the codebook \[0, 64\)") as info:
        parse_scene_tokens(np.array([[7] * 15 + [9999]], dtype=np.int32), (4, 4), 64)
    assert "9999" not in str(info.value)  # token values never appear in messages (or server logs)


def test_client_helpers():
    assert parse_url("grpc://127.0.0.1:8001").protocol == "grpc"
    assert parse_url("http://127.0.0.1:8000").url == "http://127.0.0.1:8000"
    with pytest.raises(TandemError, match="has no scheme; write grpc://127.0.0.1:8000 or http://127.0.0.1:8000"):
        parse_url("127.0.0.1:8000")  # which protocol a bare port speaks is not guessed (issue 15)
    for bad in ("ftp://h:1", "http://nohost", ""):
        with pytest.raises(TandemError):
            parse_url(bad)
    arrays = generation_arrays(["a", "b"], seed=[1, 2], temperature=0.7, top_k=3)
    assert arrays["seed"].tolist() == [[1], [2]] and arrays["temperature"].dtype == np.float64
    assert tokens_array(np.zeros((4, 4), dtype=np.int64), grid=(4, 4)).shape == (1, 16)
    assert tokens_array(np.zeros((3, 16), dtype=np.int64), grid=(4, 4)).shape == (3, 16)
    with pytest.raises(TandemError, match="must be integers"):
        tokens_array(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(TandemError, match="do not fit INT32"):
        tokens_array(np.array([2**40]))


def test_tandem_repo_command(tmp_path: Path, tiny_artifacts: Path, capsys):
    from tandem.cli import main

    out = tmp_path / "repo"
    argv = ["repo", "--artifacts", str(tiny_artifacts), "--out", str(out), "--max-batch-size", "4", "--instances", "2"]
    assert main(argv) == 0
    assert "tandem serve --repository" in capsys.readouterr().out
    config = parse(out / REASONING / "config.pbtxt")
    assert config.max_batch_size == 4 and config.instance_group[0].count == 2
    assert main(["repo", "--artifacts", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_later_targets_plug_into_the_writer(tmp_path: Path, tiny_artifacts: Path):
    """A flavor registered from outside (as a TensorRT or Neuron build would) reuses the writer:
    its options reach its targets, batching/queueing/ensemble come for free."""
    from tandem.serving.repository import Flavor, PythonRuntimeTarget, get_flavor, register_flavor

    class PlainGraphs(PythonRuntimeTarget):
        option_names = ("label",)

        def configure(self, ctx, stage, config):
            super().configure(ctx, stage, config)
            config.parameters["label"].string_value = ctx.target_options["label"]

    flavor = Flavor("test-plain", "unoptimised ONNX graphs", {REASONING: PlainGraphs(), REFINEMENT: PlainGraphs()})
    register_flavor(flavor)
    try:
        with pytest.raises(TandemError, match="already registered"):
            register_flavor(flavor)
        repo = write_repository(tiny_artifacts, tmp_path / "repo", flavor="test-plain", label="x1", optimized=False)
        config = parse(repo / REFINEMENT / "config.pbtxt")
        assert config.parameters["label"].string_value == "x1"
        assert config.parameters["tandem.flavor"].string_value == "test-plain"
        assert "max_waiting" not in config.parameters  # behind reasoning: never refuses its work
        assert parse(repo / REASONING / "config.pbtxt").parameters["max_waiting"].string_value == "32"
        assert sorted(p.name for p in (repo / REFINEMENT / "1" / "artifacts").iterdir()) == ["manifest.json", "refinement.onnx"]
        with pytest.raises(TandemError, match="unknown repository option"):
            write_repository(tiny_artifacts, tmp_path / "repo2", label="x1")  # local does not take it
    finally:
        FLAVORS.pop("test-plain", None)
    with pytest.raises(TandemError, match="no target for"):
        register_flavor(Flavor("half", "", {REASONING: PythonRuntimeTarget()}))
    assert get_flavor("local").name == "local"


def test_request_level_batching_stays_selectable(tmp_path: Path, tiny_artifacts: Path):
    repo = write_repository(tiny_artifacts, tmp_path / "repo", max_batch_size=4, scheduler="request")
    reasoning = parse(repo / REASONING / "config.pbtxt")
    assert reasoning.parameters["scheduler"].string_value == "request" and "max_waiting" not in reasoning.parameters
    assert reasoning.dynamic_batching.max_queue_delay_microseconds == 5_000
    assert reasoning.dynamic_batching.default_queue_policy.max_queue_size == 16
    with pytest.raises(TandemError, match="scheduler must be one of inflight, request"):
        write_repository(tiny_artifacts, tmp_path / "bad", scheduler="continuous")


def test_refinement_alone_keeps_its_queue_limit(tmp_path: Path, tiny_artifacts: Path):
    """A one-stage refinement repository (a split deployment's pool) faces clients itself: its
    waiting rows stay bounded and timed out; only behind reasoning is it unbounded."""
    repo = write_repository(tiny_artifacts, tmp_path / "repo", max_batch_size=4, max_queue_size=3, stages=(REFINEMENT,))
    config = parse(repo / REFINEMENT / "config.pbtxt")
    assert config.parameters["max_waiting"].string_value == "3" and config.parameters["queue_timeout_ms"].string_value == "60000"


def test_every_served_file_is_checked_against_what_tandem_wrote(tmp_path: Path, tiny_artifacts: Path):
    """`tandem repo` records the sha256 of each config.pbtxt and every file of each version folder;
    verify_repository refuses an edited config (codebook_size 512 -> 1024 used to be served), an
    edited, missing or added file in the served version, a foreign model folder and a repository
    with no manifest, each naming the file and the fix."""
    from tandem.serving.repository import REPOSITORY_MANIFEST, RepositoryIntegrityError, verify_repository

    repo = write_repository(tiny_artifacts, tmp_path / "repo")
    verify_repository(repo)
    write_repository(tiny_artifacts, repo)  # --poll adds versions while serving: still verified
    verify_repository(repo)
    pristine = tmp_path / "pristine"
    shutil.copytree(repo, pristine)

    def tampered(edit) -> str:
        shutil.rmtree(repo)
        shutil.copytree(pristine, repo)
        edit()
        with pytest.raises(RepositoryIntegrityError) as info:
            verify_repository(repo)
        assert "rewrite it with `tandem repo`" in str(info.value)
        return str(info.value)

    config = repo / ENSEMBLE / "config.pbtxt"
    codebook = re.compile(r'(key: "tandem.codebook_size"\s*value \{\s*string_value: ")(\d+)"')
    assert codebook.search(config.read_text())
    message = tampered(lambda: config.write_text(codebook.sub(r'\g<1>1024"', config.read_text())))
    assert f"{config} was changed" in message
    model_py = repo / REASONING / "2" / "model.py"
    assert f"{model_py} was changed" in tampered(lambda: model_py.write_text(model_py.read_text() + "\nimport os\n"))
    graph = repo / REFINEMENT / "2" / "artifacts" / "refinement.ort.onnx"
    assert f"{graph} is missing" in tampered(graph.unlink)
    extra = repo / REASONING / "2" / "artifacts" / "evil.onnx"
    assert f"{extra} was not written by tandem repo" in tampered(lambda: extra.write_bytes(b"x"))
    newer = repo / REASONING / "3"
    assert "version folder tandem repo did not write" in tampered(lambda: shutil.copytree(repo / REASONING / "2", newer))
    assert "model folder tandem repo did not write" in tampered(lambda: (repo / "other").mkdir())
    assert REPOSITORY_MANIFEST in tampered(lambda: (repo / REPOSITORY_MANIFEST).unlink())
    # An older, unserved version is not what Triton serves: a change there does not block serving.
    shutil.rmtree(repo)
    shutil.copytree(pristine, repo)
    (repo / REASONING / "1" / "model.py").write_text("# edited\n")
    verify_repository(repo)


def test_pruning_deletes_only_what_tandem_wrote(tmp_path: Path, tiny_artifacts: Path, caplog):
    """--keep-versions used to delete a foreign reasoning/1/precious.txt with the old version. Now a
    pruned version loses only the files tandem wrote; a folder holding anything else is kept (with
    a warning naming the file), and a version folder tandem did not write is not touched."""
    from tandem.serving.repository import verify_repository

    repo = write_repository(tiny_artifacts, tmp_path / "repo")
    (repo / REASONING / "1" / "precious.txt").write_text("mine")
    write_repository(tiny_artifacts, repo, keep_versions=1)
    assert (repo / REASONING / "1" / "precious.txt").read_text() == "mine"
    assert sorted(p.name for p in (repo / REASONING / "1").iterdir()) == ["precious.txt"]
    assert not (repo / REFINEMENT / "1").exists() and not (repo / ENSEMBLE / "1").exists()
    assert "precious.txt" in caplog.text and "did not write" in caplog.text
    verify_repository(repo)  # version 2 is served, untouched
    foreign = repo / REFINEMENT / "1"
    foreign.mkdir()
    (foreign / "model.onnx").write_bytes(b"someone else's")
    write_repository(tiny_artifacts, repo, keep_versions=1)
    assert (foreign / "model.onnx").read_bytes() == b"someone else's"
    assert existing_versions(repo / REFINEMENT) == [1, 3] and existing_versions(repo / ENSEMBLE) == [3]
    assert f"kept {foreign}" in caplog.text
    verify_repository(repo)


def _runtime_options(repo: Path, model: str) -> dict:
    import json

    from tandem.serving.repository import CONFIG_NAME, parse_config

    config = parse_config(repo / model / CONFIG_NAME)
    return json.loads(config.parameters["runtime_options"].string_value), config.parameters["tandem.threads"].string_value


def test_stages_share_a_thread_budget_in_time(tmp_path: Path, tiny_artifacts: Path):
    """Issue 27: each python-backend stub's ONNX Runtime sessions defaulted to one intra-op thread per
    core with ONNX Runtime's spinning (idle threads keep spinning after a run), in every stage. Each
    stage now has the thread budget, its threads spinning only inside a run (recorded in each
    config.pbtxt); instances divide it; explicit settings override."""
    from tandem.serving.repository import available_cores

    for budget in (1, 2, 3, 8):
        repo = write_repository(tiny_artifacts, tmp_path / f"b{budget}", thread_budget=budget)
        reasoning, said = _runtime_options(repo, REASONING)
        refinement, _ = _runtime_options(repo, REFINEMENT)
        assert reasoning["inter_op_threads"] == refinement["inter_op_threads"] == 1
        assert reasoning["intra_op_threads"] == refinement["intra_op_threads"] == budget
        assert reasoning["spinning"] == refinement["spinning"] == "run"
        assert f"of a {budget}-core budget" in said and "spinning run" in said
    repo = write_repository(tiny_artifacts, tmp_path / "default")
    assert _runtime_options(repo, REASONING)[0]["intra_op_threads"] == available_cores()
    repo = write_repository(tiny_artifacts, tmp_path / "instances", thread_budget=8, instances=2)
    assert _runtime_options(repo, REASONING)[0]["intra_op_threads"] == 4
    repo = write_repository(tiny_artifacts, tmp_path / "explicit", thread_budget=4, intra_op_threads=3, spinning="never")
    assert _runtime_options(repo, REASONING)[0]["intra_op_threads"] == 3 and _runtime_options(repo, REASONING)[0]["spinning"] == "never"
    with pytest.raises(TandemError, match="spinning must be one of"):
        write_repository(tiny_artifacts, tmp_path / "bad-spin", spinning="sometimes")
    with pytest.raises(TandemError, match="thread_budget must be >= 1"):
        write_repository(tiny_artifacts, tmp_path / "bad", thread_budget=0)
    # the sessions really get them
    runtime = make_runtime("onnxruntime", artifacts=repo / REASONING / "1" / "artifacts",
                           **{k: v for k, v in _runtime_options(repo, REASONING)[0].items()})
    options = runtime.sessions["reasoning_decode"].get_session_options()
    assert options.intra_op_num_threads == 3
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_jacobi_decoding_ships_the_verify_graph_and_is_checked_at_write(tmp_path: Path, tiny_artifacts: Path):
    repo = write_repository(tiny_artifacts, tmp_path / "repo", decoding="jacobi", block=4)
    reasoning = parse(repo / REASONING / "config.pbtxt")
    assert reasoning.parameters["decoding"].string_value == "jacobi" and reasoning.parameters["block"].string_value == "4"
    assert any(p.name.startswith("reasoning_verify") for p in (repo / REASONING / "1" / "artifacts").iterdir())
    with pytest.raises(TandemError, match="--block must lie in"):
        write_repository(tiny_artifacts, tmp_path / "bad", decoding="jacobi", block=10_000)
    with pytest.raises(TandemError, match="--scheduler inflight"):
        write_repository(tiny_artifacts, tmp_path / "bad2", decoding="jacobi", scheduler="request")
    plain = parse(write_repository(tiny_artifacts, tmp_path / "plain") / REASONING / "config.pbtxt")
    assert plain.parameters["decoding"].string_value == "sequential" and "block" not in plain.parameters
