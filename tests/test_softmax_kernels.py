"""The softmax attention's two kernels (kernels/softmax.py): fla-core's Triton kernel computes what SDPA computes, in
our layer and in a model built from a run config, and a kernel that cannot run is refused before any work.

Without a GPU, fla's kernel runs under Triton's interpreter (tests/conftest.py switches it on), in fp32."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

from kernels.softmax import check_kernel, interpreting, softmax_attention
from mad.config_checks import ConfigError, check_config
from mad.run import build_model
from models.attention.softmax import SoftmaxAttention
from tests.test_configs import compose_run

needs_triton = pytest.mark.skipif(
    not torch.cuda.is_available() and not interpreting(),
    reason="fla's Triton kernel needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)",
)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@needs_triton
@pytest.mark.parametrize("shape", [(2, 37, 4, 8), (1, 130, 2, 16)])  # ragged lengths; MAD's head dim 8, and 16
def test_fla_kernel_equals_sdpa(shape):
    q, k, v, g = (torch.randn(shape, device=_device()) for _ in range(4))
    outs = {}
    for kernel in ("sdpa", "fla"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = softmax_attention(*leaves, scale=shape[-1] ** -0.5, kernel=kernel)
        outs[kernel] = [out, *torch.autograd.grad(out, leaves, g)]
    for want, got in zip(outs["sdpa"], outs["fla"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_triton
def test_a_model_built_with_launch_softmax_kernel_fla_trains_as_with_sdpa():
    # The same weights through both kernels: the loss and every parameter's gradient agree. 4 heads of MAD's dim 8
    # rather than 16: the interpreter runs each program in turn.
    cfg = compose_run("attention=softmax", "task.seq_len=24", "launch.softmax_kernel=fla", "model.dim=32",
                      "attention.num_heads=4")  # fmt: skip
    check_config(OmegaConf.to_container(cfg, resolve=True))
    fla_model = build_model(cfg).to(_device())
    assert {m.kernel for m in fla_model.modules() if isinstance(m, SoftmaxAttention)} == {"fla"}
    sdpa_model = copy.deepcopy(fla_model)
    for m in sdpa_model.modules():
        if isinstance(m, SoftmaxAttention):
            m.kernel = "sdpa"
    tokens = torch.randint(0, cfg.task.vocab_size, (3, 23), device=_device())
    losses = []
    for model in (sdpa_model, fla_model):
        loss = model(tokens).logsumexp(-1).mean()
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(sdpa_model.named_parameters(), fla_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_an_unknown_kernel_is_refused_with_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown softmax attention kernel 'flash'; allowed: sdpa, fla"):
        SoftmaxAttention(32, num_heads=4, kernel="flash")
    with pytest.raises(ConfigError, match="launch.softmax_kernel=flash: unknown"):
        check_config(OmegaConf.to_container(compose_run("launch.softmax_kernel=flash"), resolve=True))


def test_fla_on_the_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA, not cpu"):
        check_kernel("fla", "cpu")
    cfg = compose_run("launch.softmax_kernel=fla", "launch.device=cpu")
    with pytest.raises(ConfigError, match="launch.softmax_kernel=fla: .*needs CUDA"):
        check_config(OmegaConf.to_container(cfg, resolve=True))


def test_the_fla_kernel_is_for_softmax_attention_only():
    cfg = compose_run("attention=parallax", "launch.softmax_kernel=fla")
    with pytest.raises(ConfigError, match="applies to attention=softmax only"):
        check_config(OmegaConf.to_container(cfg, resolve=True))
