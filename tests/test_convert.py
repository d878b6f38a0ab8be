"""init_from: a softmax run converted into a Parallax run (W_R added at zero) computes exactly what it computed."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mad.config_checks import ConfigError
from mad.convert import check_fit, load_converted, load_source
from mad.run import build_model
from tests.conftest import REPO, records_under
from tests.test_cli import TINY


def model_for(run_dir, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, *overrides])
    torch.manual_seed(0)
    return build_model(cfg), OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture(scope="module")
def softmax_run(tmp_path_factory):
    from tests.forked_python import run_cli

    root = tmp_path_factory.mktemp("softmax")
    proc = run_cli([*TINY, "hydra.run.dir=run"], root)
    assert proc.returncode == 0, proc.stderr
    return root / "run"


@pytest.mark.parametrize("attention,bitwise", [("parallax", True), ("parallax_gated", False)])
def test_converted_model_outputs_equal_the_softmax_model(softmax_run, attention, bitwise):
    """Bit for bit for Parallax; the gated layer recomputes the softmax output with the keys stacked on the values,
    so it agrees to float32 rounding."""
    record, weights = load_source(softmax_run)
    original, _ = model_for(softmax_run)
    original.load_state_dict(weights)
    converted, config = model_for(softmax_run, f"attention={attention}")
    check_fit(record, config)
    added = load_converted(converted, weights)
    assert any(name.endswith("r_proj.weight") for name in added)
    tokens = torch.randint(0, 16, (4, 47))
    with torch.no_grad():
        if bitwise:
            assert torch.equal(converted(tokens), original(tokens))
        else:
            torch.testing.assert_close(converted(tokens), original(tokens), rtol=1e-5, atol=1e-6)


def test_fine_tuning_from_a_softmax_run_through_the_cli(softmax_run, cli, tmp_path):
    proc = cli([*TINY, "attention=parallax", "optimizer=muon", f"init_from={softmax_run}", "hydra.run.dir=ft"])
    assert proc.returncode == 0, proc.stderr
    (record,) = records_under(tmp_path / "ft")
    assert record["status"] == "ok" and record["config"]["init_from"] == str(softmax_run)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.dim=64", "attention.num_heads=8"], "does not fit"),
        (["task.vocab_size=32"], "task.vocab_size is 16 there, 32 here"),
        (["task=compression"], "task.backbone"),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_refused(softmax_run, cli, overrides, message):
    proc = cli([*TINY, "attention=parallax", *overrides, f"init_from={softmax_run}", "hydra.run.dir=bad"])
    assert proc.returncode != 0 and message in proc.stderr


def test_a_missing_run_directory_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="expected a finished run directory"):
        load_source(tmp_path / "nowhere")


def test_only_correction_parameters_may_be_missing_from_the_checkpoint(softmax_run):
    _, weights = load_source(softmax_run)
    model, _ = model_for(softmax_run)
    weights = dict(weights)
    del weights["stack.layers.0.layer.q_proj.weight"]
    with pytest.raises(ConfigError, match="only in this model"):
        load_converted(model, weights)
    assert json.loads((softmax_run / "result.json").read_text())["status"] == "ok"
