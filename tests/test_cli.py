"""The `tandem` command as a user runs it: real subprocesses, real files."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def tandem(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "tandem", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"tandem {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def test_small_export_matches_pytorch_and_generates_a_png(small_artifacts, tmp_path):
    out = small_artifacts
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["passed"] and manifest["generation"]["tokens_equal"]
    assert all(g["passed"] for g in manifest["graphs"].values())

    png, tokens = tmp_path / "out.png", tmp_path / "tokens.npy"
    result = tandem(
        "generate", "a red circle above a blue square", "--runtime", "onnxruntime",
        "--artifacts", str(out), "--out", str(png), "--tokens-out", str(tokens),
    )
    assert str(png) in result.stdout
    image = Image.open(png)
    factor = 2 ** len(manifest["config"]["refinement"]["decoder_channels"])
    assert image.size == (manifest["config"]["scene"]["grid_width"] * factor, manifest["config"]["scene"]["grid_height"] * factor)

    # Edit a token and re-render with the refinement stage alone.
    grid = np.load(tokens)
    grid[0, 0] = (grid[0, 0] + 1) % manifest["config"]["scene"]["codebook_size"]
    np.save(tokens, grid)
    rendered = tmp_path / "edited.png"
    tandem("render", "--tokens", str(tokens), "--artifacts", str(out), "--out", str(rendered))
    assert np.asarray(Image.open(rendered)).shape == np.asarray(image).shape


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "", "--artifacts", "{art}"], "prompt is empty"),
        (["generate", "hi", "--artifacts", "{tmp}/missing"], "does not exist"),
        (["generate", "hi", "--runtime", "tvm", "--artifacts", "{art}"], "unknown runtime 'tvm'"),
        (["generate", "y" * 500, "--artifacts", "{art}"], "shorten the prompt"),
        (["export", "--config", "{tmp}/typo.yaml", "--out", "{tmp}/x"], "unknown config key 'scene.grid_heigth'"),
        (["render", "--tokens", "{tmp}/bad.npy", "--artifacts", "{art}"], "outside the codebook"),
    ],
)
def test_cli_errors_are_clear(args, message, tiny_artifacts, tmp_path):
    (tmp_path / "typo.yaml").write_text("name: typo\nscene:\n  grid_heigth: 4\n")
    np.save(tmp_path / "bad.npy", np.full((4, 4), 10_000, dtype=np.int64))
    args = [a.format(art=tiny_artifacts, tmp=tmp_path) for a in args]
    result = tandem(*args, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- one vocabulary (issue 15)


def run(*args):
    return tandem(*args, check=False)



def test_version_and_verbose_anywhere(capsys):
    from tandem import __version__
    from tandem.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"tandem {__version__}"
    for args in (["-v", "params", "--config", "tiny"], ["params", "--config", "tiny", "-v"], ["params", "tiny"]):
        assert main(args) == 0
        assert "reasoning" in capsys.readouterr().out, args


def test_usage_errors_exit_2_and_json_is_alone_on_stdout():
    result = run("build", "--config", "tiny", "--target", "nope")
    assert result.returncode == 2 and "invalid choice: 'nope'" in result.stderr
    result = run("params", "--config", "tiny", "--json")
    data = json.loads(result.stdout)  # nothing but the JSON object
    assert data["schema_version"] == 1 and data["command"] == "params" and data["exit_code"] == 0
    assert data["total"] == sum(s["total"] for s in data["stages"])
    result = run("params", "--config", "nope", "--json")
    assert result.returncode == 2 and "unknown config 'nope'" in json.loads(result.stdout)["error"]


def test_one_list_syntax_and_hidden_old_spellings():
    from tandem.cli import build_parser

    parser = build_parser()
    comma = parser.parse_args(["repo", "--preferred-batch-sizes", "2,4"])
    spaces = parser.parse_args(["repo", "--preferred-batch-sizes", "2", "4"])  # the old spelling still parses
    assert comma.preferred_batch_sizes == spaces.preferred_batch_sizes == [2, 4]
    assert parser.parse_args(["eval", "--runtime", "torch", "--runtime", "cpu-aot"]).runtime == ["torch", "cpu-aot"]
    assert parser.parse_args(["eval", "--runtimes", "torch,onnxruntime"]).runtime == ["torch", "onnxruntime"]
    assert parser.parse_args(["bench", "--runtimes", "torch", "--compiled", "b"]).artifacts == [Path("b")]
    assert parser.parse_args(["bench", "--batches", "1,2"]).batches == [1, 2]
    assert parser.parse_args(["repo", "--out", "r"]).repository == "r"
    assert parser.parse_args(["repo", "--version", "3"]).version == parser.parse_args(["repo", "--model-version", "3"]).version == 3
    assert parser.parse_args(["build", "--config", "tiny", "--target", "cpu", "--export", "e"]).reuse_export == "e"
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    hidden = {"bench": ["--runtimes", "--compiled"], "build": ["--export"], "repo": ["--out", "--version"], "params": ["positional arguments"]}
    for command, flags in hidden.items():
        text = commands[command].format_help()
        assert all(flag not in text for flag in flags), (command, text)


def test_runtime_names_equal_target_names(tiny_artifacts, tmp_path):
    from tandem.cli.common import runtime_name

    assert runtime_name("cpu") == "onnxruntime" and runtime_name("cpu-aot") == runtime_name("cuda-torch") == "torch_aot"
    assert runtime_name("h100") == runtime_name("a100") == "tensorrt" and runtime_name("inf2") == "neuron"
    png = tmp_path / "cpu.png"
    result = run("generate", "a red circle", "--runtime", "cpu", "--artifacts", str(tiny_artifacts), "--out", str(png))
    assert result.returncode == 0 and png.exists(), result.stderr


def test_default_outputs_are_untracked():
    """train and eval write under build/ (ignored) unless told otherwise; nothing tracked by default."""
    from tandem.cli.common import default_build_dir
    from tandem.cli.train import DEFAULT_CHECKPOINT, DEFAULT_EVAL_OUT

    repo = Path(__file__).resolve().parents[1]
    for path in (DEFAULT_CHECKPOINT.format(config="small"), DEFAULT_EVAL_OUT.format(config="small"), default_build_dir("small")):
        ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=repo)
        assert ignored.returncode == 0, f"{path} would be tracked by git"


def test_in_process_render_accepts_flat_tokens_and_refuses_other_grids(tiny_artifacts, tmp_path):
    grid = np.arange(16, dtype=np.int64).reshape(4, 4) % 64
    np.save(tmp_path / "flat.npy", grid.ravel())
    np.save(tmp_path / "grid.npy", grid)
    flat, full = tmp_path / "flat.png", tmp_path / "grid.png"
    assert run("render", "--tokens", str(tmp_path / "flat.npy"), "--artifacts", str(tiny_artifacts), "--out", str(flat)).returncode == 0
    assert run("render", "--tokens", str(tmp_path / "grid.npy"), "--artifacts", str(tiny_artifacts), "--out", str(full)).returncode == 0
    assert np.array_equal(np.asarray(Image.open(flat)), np.asarray(Image.open(full)))
    np.save(tmp_path / "wrong.npy", np.zeros(17, dtype=np.int64))
    result = run("render", "--tokens", str(tmp_path / "wrong.npy"), "--artifacts", str(tiny_artifacts))
    assert result.returncode == 2 and "[17] do not fit the 4x4 grid: give [4, 4] or [16] for one image" in result.stderr


# ----------------------------------------------------------------------------- issue 26: one vocabulary, work not redone


def test_every_flag_has_help_and_configs_list_medium():
    from tandem.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, sub in commands.items()
        for action in sub._actions
        if action.help is None and not isinstance(action, argparse._HelpAction)
    ]
    assert missing == []
    for name in ("export", "build", "eval", "bench", "train", "doctor"):
        text = " ".join(commands[name].format_help().split())
        if "--config" in text and name != "doctor":
            assert "tiny, small, medium, seed" in text, name


def test_defaults_a_ci_runner_can_afford():
    from tandem.cli import build_parser
    from tandem.cli.train import DEFAULT_PER_COUNT
    from tandem.compiler.precision_gate import DEFAULT_GATE_CAPTIONS

    parser = build_parser()
    assert parser.parse_args(["build", "--target", "cpu"]).config == "small"  # like every other command
    build = parser.parse_args(["build", "--target", "cpu", "--precision", "int8"])
    assert build.gate_captions == DEFAULT_GATE_CAPTIONS <= 32
    assert parser.parse_args(["build", "--target", "cpu", "--gate-captions", "all"]).gate_captions is None
    assert parser.parse_args(["precision", "--artifacts", "a", "--target", "cpu", "--precision", "int8", "--out", "o",
                              "--gate-captions", "all"]).gate_captions is None
    assert DEFAULT_PER_COUNT <= 10 and parser.parse_args(["eval"]).per_count is None and not parser.parse_args(["eval"]).full
    result = run("eval", "--full", "--per-count", "2")
    assert result.returncode == 2 and "not allowed with argument --full" in result.stderr


def test_export_skips_unchanged_work_and_force_redoes_it(tmp_path):
    out = tmp_path / "tiny"
    first = json.loads(tandem("export", "--config", "tiny", "--out", str(out), "--json").stdout)
    assert first["reused"] is False and first["passed"]
    stamp = (out / "manifest.json").stat().st_mtime_ns
    again = tandem("export", "--config", "tiny", "--out", str(out), "--json")
    assert json.loads(again.stdout)["reused"] is True and "up to date" in again.stderr and "--force" in again.stderr
    assert (out / "manifest.json").stat().st_mtime_ns == stamp  # nothing rewritten
    # a modified artifact is not reused: exported again
    graph = next(out.glob("*.onnx"))
    graph.write_bytes(graph.read_bytes() + b"\0")
    assert json.loads(tandem("export", "--config", "tiny", "--out", str(out), "--json").stdout)["reused"] is False
    forced = json.loads(tandem("export", "--config", "tiny", "--out", str(out), "--force", "--json").stdout)
    assert forced["reused"] is False


def test_a_prompt_outside_the_grammar_gets_a_warning(tiny_artifacts, tmp_path):
    result = tandem("generate", "a purple elephant", "--artifacts", str(tiny_artifacts), "--out", str(tmp_path / "p.png"), "--json")
    data = json.loads(result.stdout)
    assert "warning" in result.stderr and "not in the synthetic-scene grammar" in data["warnings"][0]
    assert (tmp_path / "p.png").exists()  # still drawn
    ok = tandem("generate", "a red circle above a blue square", "--artifacts", str(tiny_artifacts), "--out", str(tmp_path / "q.png"), "--json")
    assert json.loads(ok.stdout)["warnings"] == [] and "warning" not in ok.stderr


def test_readme_command_line_writes_only_under_build():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Command line", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    for flag in ("--out", "--tokens-out"):
        for value in [line.split(flag + " ", 1)[1].split()[0] for line in block.splitlines() if flag + " " in line]:
            assert value.startswith("build/"), f"{flag} {value} writes outside build/"


def test_serve_hint_names_the_credentials_and_a_model_the_server_has(tmp_path, tiny_repository):
    """Issue 26: `tandem serve`'s "try:" line left out the TLS and API-key flags, and suggested
    `generate` against a one-stage (split) server that has no tandem ensemble."""
    from tandem.cli.serving import try_command
    from tandem.serving.interface import REASONING, REFINEMENT
    from tandem.serving.security import TLSOptions, admin_restriction, client_restriction
    from tandem.serving.server import TritonServer

    pem = tmp_path / "x.pem"
    pem.write_text("-")
    plain = TritonServer(tiny_repository, grpc_port=8001)
    assert try_command(plain).startswith("tandem generate") and "--tls-ca" not in try_command(plain)
    secured = TritonServer(tiny_repository, grpc_port=8001, tls=TLSOptions(pem, pem, client_ca=pem),
                           restrictions=(admin_restriction(), client_restriction("k" * 20)))
    hint = try_command(secured)
    assert "grpcs://" in hint and "--tls-ca" in hint and "--tls-client-cert" in hint and "--api-key-file" in hint
    assert "--refinement-server" in try_command(TritonServer(tiny_repository, grpc_port=8001, ready_models=(REASONING,)))
    assert try_command(TritonServer(tiny_repository, grpc_port=8001, ready_models=(REFINEMENT,))).startswith("tandem render")
