"""The launchers' command line: an unknown config key is a few lines naming the closest keys
(exit 2), --print_config lists every key, and a missing model source names its kind and path.

The launcher runs are subprocesses that stop before anything is built or compiled."""

import os
import subprocess
import sys

import ml_collections
import pytest
from absl import flags

from rl_reason.experiments import cli
from rl_reason.experiments.config import base_config


SFT = "--config=configs/sft_synthetic.py"  # the default config is the study in miniature


def _launch(repo_root, script, *args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(repo_root), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, str(repo_root / "launch" / script), *args],
        env=env,
        cwd=cwd or repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "script, args, key, suggestion",
    [
        ("train.py", ["--config.study.seed=1"], "study.seed", "study.seeds"),  # the default
        (
            "train.py",  # an explicit config file is parsed later, inside app.run
            ["--config=configs/sft_synthetic.py", "--config.optim.lrr", "1"],
            "optim.lrr",
            "optim.lr",
        ),
        ("train.py", [SFT, "--config.lr=1"], "lr", "optim.lr"),
        ("train.py", [SFT, "--noconfig.data.shufle"], "data.shufle", "data.shuffle"),
        ("evaluate.py", ["--config.model_source.pth=x"], "model_source.pth", "model_source.path"),
    ],
)
def test_unknown_config_key_is_a_short_error_with_a_suggestion(
    repo_root, tmp_path, script, args, key, suggestion
):
    result = _launch(repo_root, script, *args, f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) < 10 and "Traceback" not in result.stderr, result.stderr
    assert f"unknown config key {key} " in lines[0] and f"Did you mean {suggestion}?" in lines[0]
    assert "--print_config" in result.stderr
    assert not (tmp_path / "run").exists()


def test_several_unknown_keys_are_all_named(repo_root):
    result = _launch(
        repo_root, "train.py", SFT, "--config.optim.lrr=1", "--config.model.num_layer=2"
    )
    assert result.returncode == 2
    assert "optim.lrr" in result.stderr and "Did you mean model.num_layers?" in result.stderr


def test_print_config_lists_every_key_with_overrides_applied(repo_root, tmp_path):
    result = _launch(
        repo_root,
        "train.py",
        SFT,
        "--print_config",
        "--config.optim.lr=3e-4",
        f"--workdir={tmp_path}/r",
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in result.stdout.splitlines()[1:]}
    assert rows["optim.lr"] == ["float", "0.0003"]
    assert rows["train.num_steps"] == ["int", "300"] and rows["data.task"] == ["str", "'synthetic'"]
    assert set(rows) == set(cli.config_keys(base_config()))
    assert not (tmp_path / "r").exists()


def test_the_default_config_is_the_study_in_miniature(repo_root):
    result = _launch(repo_root, "train.py", "--print_config")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in result.stdout.splitlines()[1:]}
    assert rows["algorithm"] == ["str", "'study'"] and "study.runs" in rows
    assert rows["stages.eval.eval.num_samples"] == ["int", "16"]


def test_print_config_of_evaluate(repo_root):
    result = _launch(repo_root, "evaluate.py", "--print_config")
    assert result.returncode == 0, result.stderr
    keys = {line.split()[0] for line in result.stdout.splitlines()[1:]}
    assert {"model_source.path", "model_source.kind", "eval.num_samples"} <= keys
    assert "eval.compiler_options" in keys  # an empty section is listed too


def test_help_mentions_print_config(repo_root):
    result = _launch(repo_root, "train.py", "--help")
    assert "--[no]print_config" in result.stdout and "--config.KEY=VALUE" in result.stdout


# ------------------------------------------------------------------ in process


def test_suggest_keys():
    keys = list(cli.config_keys(base_config()))
    assert cli.suggest_keys("optim.lrr", keys) == ["optim.lr"]
    assert cli.suggest_keys("lr", keys) == ["optim.lr"]
    assert cli.suggest_keys("optm.warmup_step", keys) == ["optim.warmup_steps"]
    assert cli.suggest_keys("zzzzzz", keys) == []


def test_unknown_override_keys():
    config = base_config()
    assert cli.unknown_override_keys(config, ["optim.lr", "mesh.shape", "optim.lrr", "x.y"]) == [
        "optim.lrr",
        "x.y",
    ]


def test_exit_on_unknown_keys_in_process(capsys):
    default = os.path.join(os.path.dirname(__file__), "..", "configs", "sft_synthetic.py")
    cli.exit_on_unknown_keys("config", default, ["prog", "--config.optim.lr=1"])  # known: returns
    with pytest.raises(SystemExit) as e:
        cli.exit_on_unknown_keys("config", default, ["prog", "--config.optim.lrr=1"])
    assert e.value.code == cli.USAGE_ERROR
    assert "prog: unknown config key optim.lrr" in capsys.readouterr().err


def test_define_config_flag_print_config(tmp_path, capsys):
    config_file = tmp_path / "my_config.py"
    config_file.write_text(
        "import ml_collections\n"
        "def get_config():\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.a = 1\n"
        "    c.b = ml_collections.ConfigDict({'c': 'x', 'd': (1, 2)})\n"
        "    c.e = ml_collections.config_dict.placeholder(float)\n"
        "    return c\n"
    )
    argv = ["prog", f"--config={config_file}", "--config.a=5", "--print_config"]
    values = flags.FlagValues()
    holder = cli.define_config_flag(
        "config", str(config_file), "Help.", flag_values=values, argv=argv
    )
    with pytest.raises(SystemExit) as e:
        values(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == ["a    int    5", "b.c  str    'x'", "b.d  tuple  (1, 2)", "e    float  None"]
    assert holder.value.a == 5


def test_format_config_of_an_empty_config():
    assert cli.format_config(ml_collections.ConfigDict()).startswith("# 0 config keys")


# ------------------------------------------------------------------ model sources


def _error(kind, path):
    with pytest.raises(cli.ModelSourceNotFoundError) as e:
        cli.check_model_source(kind, path)
    assert isinstance(e.value, FileNotFoundError)
    message = str(e.value)
    assert f"Model source {kind!r} at {str(path)!r}" in message and len(message.splitlines()) == 1
    return message


def test_model_source_missing_path(tmp_path):
    for kind in cli.MODEL_SOURCE_KINDS:
        message = _error(kind, tmp_path / "no" / "such" / "place")
        assert f"nearest existing directory is {tmp_path}" in message
    assert "set --config.model_source.path" in _error("run", "")


def test_model_source_run(tmp_path):
    assert "no config.json and no checkpoints" in _error("run", tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert "no checkpoints" in _error("run", tmp_path)
    (tmp_path / "checkpoints").mkdir()
    assert cli.check_model_source("run", tmp_path) == str(tmp_path)
    assert "is a file" in _error("run", tmp_path / "config.json")


def test_model_source_run_that_is_a_hf_directory(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert "use kind 'hf'" in _error("run", tmp_path)


def test_model_source_hf(tmp_path):
    assert "no config.json" in _error("hf", tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert "has no model.safetensors" in _error("hf", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert "pytorch_model.bin is there: rl_reason reads safetensors only" in _error("hf", tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert cli.check_model_source("hf", tmp_path) == str(tmp_path)
    assert "is a file; kind 'hf' takes a directory" in _error("hf", tmp_path / "config.json")
    (tmp_path / "m.gguf").write_bytes(b"")
    assert "use kind 'gguf'" in _error("hf", tmp_path / "m.gguf")


def test_model_source_gguf(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    assert "is a directory, not a GGUF file; it holds a.gguf" in _error("gguf", tmp_path)
    assert cli.check_model_source("gguf", tmp_path / "a.gguf") == str(tmp_path / "a.gguf")


def test_model_source_unknown_kind():
    with pytest.raises(ValueError, match="model_source.kind='safetensors' is not one of run, hf"):
        cli.check_model_source("safetensors", "x")
