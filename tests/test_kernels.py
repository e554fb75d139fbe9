"""The SAE kernels' fast paths against torch's plain ones: top-k selection, bf16 autocast, and the
in-place decoder-gradient projection of `train_step`."""

import copy

import pytest
import torch

from fluxsae.kernels import FusedEncoder, topk_rows
from fluxsae.sae import SAEConfig, TopKSAE
from fluxsae.sae_training import train_step


@pytest.mark.parametrize(("n", "k"), [(2048, 24), (8192, 32), (16384, 64), (512, 64), (100, 16), (48, 48)])
def test_topk_rows_selects_what_torch_topk_selects(n, k):
    g = torch.Generator().manual_seed(n + k)
    pre = torch.randn(77, n, generator=g)
    pre[3, : 3 * k] = 5.0  # ties at the top
    pre[5] = -1.0  # a row of equal values
    values = torch.empty(77, k)
    indices = torch.empty(77, k, dtype=torch.long)
    topk_rows(pre, k, out=(values, indices))
    want = pre.topk(k).values
    assert torch.equal(values.sort(1, descending=True).values, want)
    assert torch.equal(pre.gather(1, indices), values)  # each index points at its value
    assert all(len(set(row.tolist())) == k for row in indices)  # k different features per row


def test_encoder_under_bf16_autocast_computes_its_matmul_in_bf16_and_keeps_float32_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=g, requires_grad=True)
    W = torch.randn(512, 64, generator=g, requires_grad=True)
    b = torch.zeros(512, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        acts, idx, _, _ = FusedEncoder.apply(x, W, b, 8, 0, None)
    pre = torch.addmm(b.bfloat16(), x.bfloat16(), W.bfloat16().T).float()
    assert acts.dtype == torch.float32
    assert torch.equal(acts.sort(1).values, pre.topk(8).values.relu().sort(1).values)
    acts.sum().backward()
    assert x.grad.dtype == W.grad.dtype == b.grad.dtype == torch.float32
    plain, _, _, _ = FusedEncoder.apply(x.detach(), W.detach(), b.detach(), 8, 0, None)
    assert not torch.equal(plain.sort(1).values, acts.sort(1).values)  # outside autocast: float32


def test_train_step_removes_the_radial_part_of_the_decoder_gradient_as_the_sae_method_does():
    """SGD makes the step a plain function of the gradient, so the in-place projection of `train_step` can
    be compared with `TopKSAE.remove_gradient_parallel_to_decoder_directions` step for step."""
    cfg = SAEConfig(d_in=32, n_features=256, k=8, normalization="none", aux_k=16)
    ours = TopKSAE(cfg, generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(ours)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(512, 32, generator=g)
        train_step(ours, opt_ours, x)
        out = reference(x)
        opt_ref.zero_grad(set_to_none=True)
        (out.fvu + cfg.aux_coef * out.aux_loss).backward()
        reference.remove_gradient_parallel_to_decoder_directions()
        radial = (reference.W_dec.grad * reference.W_dec).sum(1)
        assert radial.abs().max() < 1e-6
        torch.testing.assert_close(ours.W_dec.grad, reference.W_dec.grad, rtol=1e-5, atol=1e-7)
        opt_ref.step()
        reference.set_decoder_norm_to_unit_norm()
        torch.testing.assert_close(ours.W_dec, reference.W_dec, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.W_enc, reference.W_enc, rtol=1e-5, atol=1e-6)
