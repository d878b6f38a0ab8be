import functools

import pytest
import torch

from mad.optim import build_optimizers, split_parameters
from models.attention.parallax import ParallaxAttention
from models.attention.softmax import SoftmaxAttention
from models.backbone import AutoEncoder, LanguageModel, count_parameters
from models.mlp import SwiGLU


def language_model(mixer, vocab_size=16):
    return LanguageModel(vocab_size, dim=128, num_layers=4, mixer=mixer, mlp=SwiGLU)


def test_mad_default_model_has_the_published_parameter_count():
    torch.manual_seed(0)
    assert count_parameters(language_model(SoftmaxAttention)) == 407_184  # docs/mad-protocol.md 2.1


def test_zero_probe_parallax_layer_matches_softmax_layer_with_the_same_weights():
    torch.manual_seed(0)
    softmax = SoftmaxAttention(128, num_heads=16)
    parallax = ParallaxAttention(128, num_heads=16, probe_init="zero")
    missing = parallax.load_state_dict(softmax.state_dict(), strict=False).missing_keys
    assert missing == ["r_proj.weight"]
    x = torch.randn(3, 20, 128)
    torch.testing.assert_close(parallax(x), softmax(x), rtol=1e-5, atol=1e-6)


def test_zero_probe_survives_the_backbone_init():
    model = language_model(functools.partial(ParallaxAttention, probe_init="zero"))
    probes = [m.r_proj.weight for m in model.modules() if isinstance(m, ParallaxAttention)]
    assert len(probes) == 2 and all(torch.count_nonzero(w) == 0 for w in probes)


@pytest.mark.parametrize("mixer", [SoftmaxAttention, ParallaxAttention])
def test_language_model_is_causal(mixer):
    torch.manual_seed(0)
    model = language_model(mixer)
    x = torch.randint(0, 16, (2, 12))
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % 16
    torch.testing.assert_close(model(x)[:, :7], model(y)[:, :7])
    assert not torch.allclose(model(x)[:, 7:], model(y)[:, 7:])


def test_autoencoder_decodes_every_position_from_the_last_one():
    torch.manual_seed(0)
    model = AutoEncoder(16, seq_len=10, dim=128, num_layers=4, mixer=SoftmaxAttention, mlp=SwiGLU)
    x = torch.randint(0, 16, (3, 10))
    assert model(x).shape == (3, 10, 16)


def test_width_not_divisible_by_heads_is_rejected():
    with pytest.raises(ValueError, match="not divisible by num_heads=3"):
        SoftmaxAttention(128, num_heads=3)


@pytest.mark.parametrize("backbone", ["language_model", "autoencoder"])
def test_muon_routing_takes_every_hidden_matrix_and_nothing_else(backbone):
    if backbone == "language_model":
        model = language_model(ParallaxAttention)
    else:
        model = AutoEncoder(16, seq_len=8, dim=128, num_layers=4, mixer=ParallaxAttention, mlp=SwiGLU)
    hidden, rest = split_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    hidden_names = {names[id(p)] for p in hidden}
    expected = {
        n for n, p in model.named_parameters()
        if p.ndim == 2 and not n.startswith(("stack.embedding.", "head."))
    }  # fmt: skip
    assert hidden_names == expected
    assert any(n.endswith("r_proj.weight") for n in hidden_names)
    assert all(p.ndim != 2 or names[id(p)].startswith(("stack.embedding.", "head.")) for p in rest)
    muon, adamw = build_optimizers(model, {
        "name": "muon", "lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.999], "eps": 1e-8,
        "momentum": 0.95, "nesterov": True, "ns_steps": 5, "adjust_lr_fn": "match_rms_adamw"})  # fmt: skip
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert in_muon.isdisjoint(in_adamw) and in_muon | in_adamw == set(names)
