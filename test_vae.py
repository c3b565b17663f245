"""Tests for vae.py. Each checks the code against something independent of it: a hand-made
image, torch.distributions, an analytic or numerically integrated answer. The tests of what
the tutorial teaches come first, in the file's order (Part 1, then Part 2); then the metrics,
files, bad input and end-to-end runs. Run: python -m pytest -q test_vae.py"""
import json
import pickle
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn

import vae

HERE = Path(__file__).resolve().parent
TINY = dict(widths=(8, 16, 16, 16))         # a small trunk keeps the tests fast
CPU = torch.device("cpu")


def images(n, size=64, seed=0):
    """n synthetic images as the model sees them: uint8 (n, 1, size, size)"""
    return torch.from_numpy(vae.make_synthetic_channels(n, size=size, seed=seed)).permute(0, 3, 1, 2).contiguous()


def real_images():
    """The 13 re-digitized real images, (13, 128, 128) uint8 (read when a test needs them)."""
    return np.load(HERE / "results" / "real_reference.npz")["images"][..., 0]


def tiny_h5(path, n=160, seed=0):
    vae.write_h5(path, [vae.make_synthetic_channels(n, seed=seed)])
    return path


def run_main(argv, capsys):
    """main(argv) on the CPU, whatever the machine has -> (exit code, stdout, stderr)"""
    argv = [str(a) for a in argv]
    if "--device" not in argv:
        argv += ["--device", "cpu"]
    code = 0
    try:
        vae.main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_clean_error(code, err, *fragments):
    assert code == 2, err
    assert "Traceback" not in err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) <= 2, err          # argparse adds its usage line; ours is one line
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# ============================================================================ Part 1: the VAE

@pytest.mark.parametrize("arch", ["dense", "fullyconv"])
@pytest.mark.parametrize("size", [64, 128])
def test_shapes(arch, size):
    model = vae.build_model(arch, size)
    x = torch.zeros(3, 1, size, size)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (3, *model.latent_shape)
    z = torch.randn(3, *model.latent_shape)
    assert model.decode(z).shape == (3, 1, size, size)
    if arch == "fullyconv":
        assert model.latent_shape[1:] == (size // 16, size // 16)


def test_kl_matches_torch_distributions():
    mu, logvar = torch.randn(5, 7), torch.randn(5, 7)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros(5, 7), torch.ones(5, 7))
    want = torch.distributions.kl_divergence(q, p).sum(1)
    assert torch.allclose(vae.gaussian_kl(mu, logvar), want, atol=1e-5)
    # and on a spatial latent (B, C, h, w): summed over every element
    mu, logvar = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    want = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum((1, 2, 3))
    assert torch.allclose(vae.gaussian_kl(mu, logvar), want, atol=1e-5)


def test_bernoulli_nll_matches_torch_distributions():
    logits, x = torch.randn(4, 1, 8, 8), (torch.rand(4, 1, 8, 8) > 0.5).float()
    want = -torch.distributions.Bernoulli(logits=logits).log_prob(x).sum((1, 2, 3))
    assert torch.allclose(vae.bernoulli_nll(logits, x), want, atol=1e-4)


def test_reparameterize_samples_q_and_passes_gradients():
    mu = torch.tensor([1.0, -2.0], requires_grad=True)
    logvar = torch.tensor([0.0, math.log(0.25)], requires_grad=True)
    z, eps = vae.reparameterize(mu.expand(20000, 2), logvar.expand(20000, 2))
    torch.testing.assert_close(z, mu + eps * torch.tensor([1.0, 0.5]))
    assert torch.allclose(z.mean(0), torch.tensor([1.0, -2.0]), atol=0.03)   # sd / sqrt(n) < 0.01
    assert torch.allclose(z.std(0), torch.tensor([1.0, 0.5]), atol=0.03)
    z.sum().backward()
    assert torch.allclose(mu.grad, torch.full((2,), 20000.0))                 # dz/dmu = 1


def test_downsample_hand_made():
    # 4x4 image -> 2x2: blocks with 3, 1, 2 (top-left on) and 2 (top-left off) channel pixels
    img = torch.tensor([[1, 1, 0, 1],
                        [1, 0, 0, 0],
                        [1, 0, 0, 1],
                        [0, 1, 0, 1]], dtype=torch.uint8).view(1, 1, 4, 4)
    assert vae.downsample_majority(img).view(2, 2).tolist() == [[1, 0], [1, 0]]


@pytest.mark.parametrize("layout", ["nhwc", "nhw"])
def test_loader_reads_both_layouts_and_downsamples(tmp_path, layout):
    img = np.zeros((2, 128, 128), np.uint8)
    img[0, :, 10:14] = 1            # a 4-px vertical band -> columns 5 and 6 at 64x64
    img[1, 40:42, :] = 1            # a 2-px horizontal band -> row 20 at 64x64
    data = img[..., None] if layout == "nhwc" else img
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("train_images", data=data)
    full = vae.load_images(path, size=128)
    assert full.dtype == torch.uint8 and full.shape == (2, 1, 128, 128)
    assert torch.equal(full[:, 0], torch.from_numpy(img))
    small = vae.load_images(path, size=64)
    want = np.zeros((2, 64, 64), np.uint8)
    want[0, :, 5:7] = 1
    want[1, 20, :] = 1
    assert small.shape == (2, 1, 64, 64) and torch.equal(small[:, 0], torch.from_numpy(want))


def test_fullyconv_has_no_dense_layer():
    for size in (64, 128):
        model = vae.build_model("fullyconv", size)
        assert not any(isinstance(m, nn.Linear) for m in model.modules())
        bigger = model.decode(torch.randn(1, model.latent_shape[0], 6, 6))   # any grid works
        assert bigger.shape == (1, 1, 96, 96)
    assert any(isinstance(m, nn.Linear) for m in vae.build_model("dense").modules())
    # Nor a convolution whose kernel spans the whole map (a dense layer in disguise): on a
    # 128x128 image, latent cell (0, 0) must not see the far half, and must not draw there.
    # Its receptive field is 46 px of trunk plus one 16-px cell each side for the 3x3 head.
    model = vae.build_model("fullyconv", 128).eval()
    x = torch.zeros(1, 1, 128, 128, requires_grad=True)
    model.encode(x)[0][:, :, 0, 0].sum().backward()
    seen = x.grad[0, 0] != 0
    assert seen[:32, :32].any() and not seen[64:].any() and not seen[:, 64:].any()
    z = torch.randn(1, *model.latent_shape)
    moved = z.clone()
    moved[:, :, 0, 0] += 1
    drawn = (model.decode(z) != model.decode(moved))[0, 0]
    assert drawn[:32, :32].any() and not drawn[64:].any() and not drawn[:, 64:].any()


def test_training_lowers_validation_loss(tmp_path):
    train_x, val_x = images(640)[:512], images(640)[512:]
    args = tiny_args(tmp_path, "--epochs", "4", "--lr", "3e-3", "--prior", "gaussian")
    torch.manual_seed(0)
    model = vae.build_model("dense", 64, latent_dim=8, **TINY)
    before = vae.validate(model, val_x, CPU, 1.0)[0]
    history = vae.train(model, train_x, val_x, args, CPU, tmp_path / "ck.pt", log=lambda s: None)
    # the best model that ignores the image predicts every pixel with the mean proportion p;
    # its loss is the Bernoulli entropy of p per pixel. A VAE that learned anything beats it.
    p = train_x.float().mean().item()
    constant = -(p * math.log(p) + (1 - p) * math.log(1 - p)) * train_x[0].numel()
    assert history["val_loss"][-1] < 0.9 * constant < before
    assert history["val_loss"][-1] < history["val_loss"][0]


def test_bf16_autocast_runs_the_convolutions_in_bf16_and_keeps_the_loss():
    torch.manual_seed(0)
    model = vae.build_model("fullyconv", 64, "flow", **TINY)
    seen = {}
    model.decoder[0][0].register_forward_hook(lambda m, i, o: seen.update(conv=o.dtype))
    model.prior.steps[0].net.register_forward_hook(lambda m, i, o: seen.update(flow=o.dtype))
    x = images(16).float()
    torch.manual_seed(1)
    fp32 = vae.neg_elbo(model, x)
    assert seen == {"conv": torch.float32, "flow": torch.float32}
    torch.manual_seed(1)
    bf16 = vae.neg_elbo(model, x, bf16=True)
    assert seen == {"conv": torch.bfloat16, "flow": torch.float32}   # the flow and KL stay fp32
    # bf16 rounds each activation to 8 mantissa bits (0.4%); the sums are fp32, so the loss,
    # its reconstruction and its KL each stay within 1% of fp32's, and come back as fp32
    for a, b in zip(fp32, bf16):
        assert b.dtype == torch.float32 and abs(a - b) < 0.01 * abs(a), (a, b)
    assert fp32[1] != bf16[1]


def test_bf16_switches_itself_off_where_the_cpu_would_emulate_it():
    # capped to AVX2, no CPU has native bf16 (AVX-512 BF16 or AMX), whatever this one has
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code = ("import torch, vae; cpu = torch.device('cpu'); "
            "print(vae.bf16_native(cpu), vae.precision(vae.parse_args(['--arch', 'dense']), cpu))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=HERE, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["False", "fp32"]
    assert vae.precision(vae.parse_args(["--arch", "dense", "--fp32"]), CPU) == "fp32"


def test_slerp_keeps_the_norm_where_a_straight_line_shrinks_it():
    g = torch.Generator().manual_seed(0)
    u0, u1 = torch.randn(3, 8, 4, 4, generator=g), torch.randn(3, 8, 4, 4, generator=g)
    path = vae.slerp(u0, u1, 9)                                             # (9, 3, 8, 4, 4)
    assert path.shape == (9, 3, 8, 4, 4)
    torch.testing.assert_close(path[0], u0)
    torch.testing.assert_close(path[-1], u1)
    norms = path.flatten(2).norm(dim=2)                                     # (9, 3)
    lo = torch.minimum(u0.flatten(1).norm(dim=1), u1.flatten(1).norm(dim=1))
    hi = torch.maximum(u0.flatten(1).norm(dim=1), u1.flatten(1).norm(dim=1))
    assert (norms >= lo - 1e-4).all() and (norms <= hi + 1e-4).all()
    # the straight midpoint of two near-orthogonal draws is ~1/sqrt(2) as long
    assert (((u0 + u1) / 2).flatten(1).norm(dim=1) < 0.85 * lo).all()
    # equal-norm ends: every point of the path is at that norm, at equal angles apart
    v1 = u1 / u1.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * u0.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    arc = vae.slerp(u0, v1, 5).flatten(2)
    torch.testing.assert_close(arc.norm(dim=2), u0.flatten(1).norm(dim=1).expand(5, 3))
    cos = (arc[1:] * arc[:-1]).sum(2) / arc[1:].norm(dim=2) / arc[:-1].norm(dim=2)
    torch.testing.assert_close(cos, cos[:1].expand(4, 3))


# ============================================================================ Part 2: the flow prior

def perturbed_flow(arch, scale=0.02, **kwargs):
    """A VAE with a flow prior whose weights are moved off the identity (an untrained flow
    is a rotation of N(0, I), which would make the tests below trivial)."""
    torch.manual_seed(0)
    model = vae.build_model(arch, 64, prior="flow", **TINY, **kwargs).eval()
    with torch.no_grad():
        for p in model.prior.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


@pytest.mark.parametrize("arch", ["dense", "fullyconv"])
def test_flow_inverse_is_exact(arch):
    model = perturbed_flow(arch)
    z = torch.randn(16, *model.latent_shape)
    with torch.no_grad():
        u, _ = model.prior.to_u(z)
        assert (u - z).abs().max() > 0.05                 # the flow really moves points
        torch.testing.assert_close(model.prior.to_z(u), z, rtol=0, atol=1e-5)     # f(f^-1(z)) = z
        u2 = torch.randn(16, *model.latent_shape)
        torch.testing.assert_close(model.prior.to_u(model.prior.to_z(u2))[0], u2, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch, kwargs", [("dense", dict(latent_dim=4)), ("fullyconv", dict(latent_channels=2))])
def test_flow_log_determinant_matches_autograd_jacobian(arch, kwargs):
    # a tiny flow in float64: log|det du/dz| from the code against slogdet of the full
    # Jacobian that autograd computes by brute force
    model = perturbed_flow(arch, scale=0.1, **kwargs).double()
    if arch == "fullyconv":
        model.prior.steps = model.prior.steps[:3]
    for seed in range(3):
        z = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        _, logdet = model.prior.to_u(z)
        jac = torch.autograd.functional.jacobian(lambda v: model.prior.to_u(v.view_as(z))[0].flatten(), z.flatten())
        sign, want = torch.linalg.slogdet(jac)
        assert sign != 0 and logdet.item() == pytest.approx(want.item(), abs=1e-8)
    # an untrained flow is a rotation (orthogonal mixes, zero couplings), so its density is
    # exactly N(0, I); the mixes are orthogonal to float32 precision, hence atol 1e-5
    plain = vae.build_model(arch, 64, prior="flow", **TINY, **kwargs).double()
    z = torch.randn(5, *plain.latent_shape, dtype=torch.float64)
    want = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(plain.prior.log_prob(z), want, rtol=0, atol=1e-5)


def test_flow_density_integrates_to_one():
    # a density must integrate to 1: exp(log p(z)) of a 2-d flow, nonlinear couplings
    # included, summed over a fine grid (a flipped log-determinant gives far from 1)
    model = perturbed_flow("dense", scale=0.05, latent_dim=2).double()
    axis = torch.linspace(-10, 10, 201, dtype=torch.float64)
    z = torch.cartesian_prod(axis, axis)                                   # (201^2, 2)
    with torch.no_grad():
        mass = model.prior.log_prob(z).exp().sum() * (axis[1] - axis[0]) ** 2
    assert mass.item() == pytest.approx(1.0, abs=0.01)


def affine_flow_model():
    """A dense VAE (latent 4) whose flow is affine: couplings zero (as initialised), actnorm
    and mixes perturbed. Then u = f^-1(z) = M z + c and p(z) is the Gaussian
    N(-M^-1 c, (M^T M)^-1), known in closed form (M by autograd, c = f^-1(0))."""
    torch.manual_seed(0)
    model = vae.build_model("dense", 16, latent_dim=4, prior="flow", widths=(4, 4)).eval().double()
    with torch.no_grad():
        for step in model.prior.steps:
            step.log_scale.add_(0.3 * torch.randn(4, dtype=torch.float64))
            step.shift.add_(0.5 * torch.randn(4, dtype=torch.float64))
            step.mix.add_(0.3 * torch.randn(4, 4, dtype=torch.float64))
    zero = torch.zeros(1, 4, dtype=torch.float64)
    M = torch.autograd.functional.jacobian(lambda v: model.prior.to_u(v.view(1, 4))[0].flatten(), zero.flatten())
    c = model.prior.to_u(zero)[0].flatten().detach()
    p = torch.distributions.MultivariateNormal(-torch.linalg.solve(M, c), precision_matrix=M.T @ M)
    return model, p


def test_affine_flow_is_the_gaussian_it_claims_and_samples_it():
    model, p = affine_flow_model()
    z = torch.randn(50, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.prior.log_prob(z), p.log_prob(z))
    # sampling runs z = f(u): the samples follow p (f^-1(u) would give another Gaussian)
    z = vae.sample_latents(model, 40000, torch.Generator().manual_seed(1))
    assert torch.allclose(z.mean(0), p.mean, atol=0.05 * p.stddev.max())
    assert torch.allclose(torch.cov(z.T), p.covariance_matrix, atol=0.05 * p.variance.max())


def test_monte_carlo_kl_of_a_flow_prior_matches_the_closed_form():
    # neg_elbo's KL against an affine flow (a Gaussian p, above) must average to the closed
    # form KL(q || p) from torch.distributions; logvar far from 0 so that every term counts
    model, p = affine_flow_model()
    n = 20000
    mu = torch.tensor([0.5, -1.0, 0.2, 1.5], dtype=torch.float64).expand(n, 4)
    logvar = torch.tensor([-2.0, -1.0, -3.0, 0.5], dtype=torch.float64).expand(n, 4)
    model.encode = lambda x: (mu, logvar)
    q = torch.distributions.MultivariateNormal(mu[0], torch.diag(logvar[0].exp()))
    want = torch.distributions.kl_divergence(q, p).item()
    torch.manual_seed(2)
    with torch.no_grad():
        kl = vae.neg_elbo(model, torch.zeros(n, 1, 16, 16, dtype=torch.float64))[2].item()
    # one estimate has sd ~ sqrt(d / 2) + the spread of log p: a few nats; / sqrt(20000)
    assert kl == pytest.approx(want, abs=0.1)


def test_fitted_flow_learns_and_samples_a_banana():
    # 2-d codes on a thin curved banana, z2 = z1^2 / 2 - 1 + noise (sd 0.1): N(0, I) fits
    # them badly. Fitted by maximum likelihood, the flow's held-out -log p(z) must fall
    # between the banana's analytic entropy (no density beats it) and N(0, I)'s
    # cross-entropy, and its samples z = f(u) must lie on the curve.
    g = torch.Generator().manual_seed(0)

    def banana(n):
        t = torch.randn(n, generator=g)
        return torch.stack([t, 0.5 * t ** 2 - 1 + 0.1 * torch.randn(n, generator=g)], 1)
    torch.manual_seed(0)
    model = vae.build_model("dense", 64, latent_dim=2, **TINY)
    model.prior = vae.FlowPrior((2,), hidden=64)
    opt = torch.optim.Adam(model.prior.parameters(), lr=5e-3)
    for step in range(600):
        for group in opt.param_groups:
            group["lr"] = vae.lr_at(step, 600, 5e-3)
        loss = -model.prior.log_prob(banana(200)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        nll = -model.prior.log_prob(banana(4000)).mean().item()
    entropy = 0.5 * math.log(2 * math.pi * math.e) + 0.5 * math.log(2 * math.pi * math.e * 0.01)
    gauss = 0.5 * 1 + 0.5 * (0.5 + 0.25 + 0.01) + math.log(2 * math.pi)     # E[-log N(z; 0, I)]
    assert entropy - 0.1 < nll < entropy + 0.4 < gauss - 1.5, (entropy, nll, gauss)
    z = vae.sample_latents(model, 4000, torch.Generator().manual_seed(1))
    residual = z[:, 1] - (0.5 * z[:, 0] ** 2 - 1)
    assert residual.std() < 0.3                   # on the curve (sd 0.1); f^-1(u) is far off
    assert 0.8 < z[:, 0].std() < 1.2              # and along it as the banana is: z1 ~ N(0, 1)


def test_fullyconv_flow_has_no_linear_and_runs_on_two_grids():
    model = perturbed_flow("fullyconv")
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    for grid in ((4, 4), (8, 8), (3, 5)):
        z = vae.sample_latents(model, 2, grid=grid)
        assert z.shape == (2, model.latent_shape[0], *grid)
        u, logdet = model.prior.to_u(z)
        torch.testing.assert_close(model.prior.to_z(u), z, rtol=0, atol=1e-5)
        assert model.decode(z).shape == (2, 1, 16 * grid[0], 16 * grid[1])
    assert any(isinstance(m, nn.Linear) for m in perturbed_flow("dense").prior.modules())


@pytest.mark.parametrize("arch", ["dense", "fullyconv"])
def test_flow_model_reloads_with_the_same_samples(tmp_path, arch):
    model = perturbed_flow(arch)
    vae.save_model(model, tmp_path / "m.pt")
    again = vae.load_model(tmp_path / "m.pt")
    assert vae.model_config(again)["prior"] == "flow"
    a = vae.sample_latents(model, 8, torch.Generator().manual_seed(3))
    b = vae.sample_latents(again, 8, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)          # same seed, same samples
    assert not torch.allclose(a, vae.sample_latents(again, 8, torch.Generator().manual_seed(4)))


def test_sample_latents_falls_back_to_standard_normal():
    model = vae.build_model("dense", 64, **TINY)
    assert isinstance(model.prior, vae.StandardNormal)
    z = vae.sample_latents(model, 4000, torch.Generator().manual_seed(0))
    want = torch.randn(4000, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, want)                       # exactly u: no flow in between
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01


@pytest.mark.parametrize("arch", ["dense", "fullyconv"])
def test_both_priors_share_one_interface(arch):
    # N(0, I) and the flow answer the same calls, and each obeys the change of variables
    # log p(z) = log N(u; 0, I) + log|det du/dz| at u = to_u(z), with torch.distributions'
    # Normal as the reference; N(0, I)'s kl is the closed form, whatever z and eps are
    for model in (vae.build_model(arch, 64, **TINY), perturbed_flow(arch)):
        u = torch.randn(6, *model.latent_shape)
        with torch.no_grad():
            z = model.prior.to_z(u)
            back, logdet = model.prior.to_u(z)
            torch.testing.assert_close(back, u, rtol=0, atol=1e-5)
            want = torch.distributions.Normal(0.0, 1.0).log_prob(back).flatten(1).sum(1) + logdet
            torch.testing.assert_close(model.prior.log_prob(z), want)
    prior = vae.build_model(arch, 64, **TINY).prior
    mu, logvar = torch.randn(6, 4), torch.randn(6, 4)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    want = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(prior.kl(mu, logvar, None, None), want)


def test_soft_statistics_and_w1_on_hand_made_images():
    img = torch.zeros(2, 1, 8, 8)
    img[0, 0, :, 2:4] = 1                      # a stripe from top to bottom, 2 of 8 columns
    img[1, 0, :4, 5] = 0.8                     # half a stripe, probability 0.8
    proportion, coverage = vae.soft_statistics(img)
    torch.testing.assert_close(proportion, torch.tensor([0.25, 4 * 0.8 / 64]))
    torch.testing.assert_close(coverage, torch.tensor([1.0, 0.4]))
    # W1 of equal-size samples against the CDF-area implementation of the metrics section
    a, b = torch.rand(50, dtype=torch.float64), torch.rand(50, dtype=torch.float64) ** 2
    assert vae.wasserstein1_equal(a, b).item() == pytest.approx(vae.wasserstein1(a.numpy(), b.numpy()))


def test_shaping_moves_the_samples_proportion_and_only_the_flow(monkeypatch):
    # data with less than half the channel of what the untrained model draws: the shaping
    # phase must pull the decoded prior samples' proportion towards the data's, and touch
    # only the flow
    torch.manual_seed(0)
    model = vae.build_model("dense", 64, latent_dim=4, prior="flow", **TINY)
    x = images(64)

    def sample_proportion():
        with torch.no_grad():
            z = vae.sample_latents(model.eval(), 256, torch.Generator().manual_seed(5))
            return vae.decode_probs(model, z, CPU).mean().item()
    with torch.no_grad():                      # make the decoder's output depend on z
        model.expand[0].weight.mul_(20)
    vae_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("prior")}
    before, target = sample_proportion(), x.float().mean().item()
    monkeypatch.setattr(vae, "SHAPE_LR", 1e-2)              # a few steps must suffice here
    vae.shape_prior(model, x, CPU, steps=120, batch_size=32, log=lambda s: None)
    after = sample_proportion()
    # an untrained decoder cannot reach the data's proportion from any z; it must move there
    assert abs(after - target) < 0.85 * abs(before - target), (before, after, target)
    for k, v in model.state_dict().items():
        if k.startswith("prior"):
            continue
        assert torch.equal(v, vae_before[k]), k              # the VAE is frozen
    assert all(p.requires_grad for p in model.parameters())   # and trainable again after


# ============================================================================ Part 2: ES-MDA

def test_inflation_factors_inverses_sum_to_one():
    for n in (1, 2, 4, 7):
        alphas = vae.inflation_factors(n)
        assert len(alphas) == n and sum(1 / a for a in alphas) == pytest.approx(1, abs=1e-12)


def test_esmda_recovers_the_analytic_linear_gaussian_posterior():
    # m ~ N(m0, C_M), d = G m + e, e ~ N(0, sd^2 I): the posterior is Gaussian with
    #   mean m0 + K (d_obs - G m0),  cov C_M - K G C_M,  K = C_M G^T (G C_M G^T + C_D)^-1
    # and ES-MDA with sum 1/alpha = 1 samples it exactly as the ensemble grows.
    torch.manual_seed(0)
    m0 = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
    a = torch.tensor([[1.0, 0.3, 0.0], [0.0, 0.8, 0.2], [0.1, 0.0, 0.6]], dtype=torch.float64)
    c_m = a @ a.T
    G = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]], dtype=torch.float64)
    sd, d_obs = 0.3, torch.tensor([1.2, -0.4], dtype=torch.float64)
    gain = c_m @ G.T @ torch.linalg.inv(G @ c_m @ G.T + sd ** 2 * torch.eye(2, dtype=torch.float64))
    want_mean, want_cov = m0 + gain @ (d_obs - G @ m0), c_m - gain @ G @ c_m
    g = torch.Generator().manual_seed(1)
    n = 20_000
    prior = m0 + torch.randn(n, 3, generator=g, dtype=torch.float64) @ a.T
    post = vae.esmda(lambda m: m @ G.T, prior, d_obs, sd, n_assimilations=4, generator=g)
    # tolerance: the ensemble mean's sampling error is sd_post / sqrt(n) < 0.01
    torch.testing.assert_close(post.mean(0), want_mean, rtol=0, atol=0.02)
    torch.testing.assert_close(torch.cov(post.T), want_cov, rtol=0, atol=0.02)
    assert (post.mean(0) - prior.mean(0)).abs().max() > 0.3          # the update did move it


def test_esmda_matches_binary_data_through_a_nonlinear_forward_model():
    # like the decoder at the wells: g(m) = sigmoid(3 G m), data 0/1 from a true m. A random
    # member matches about half of the data; the posterior must match nearly all of it and
    # keep a spread (ES-MDA is not an optimizer that collapses the ensemble to one point).
    g = torch.Generator().manual_seed(0)
    P, K, N = 8, 6, 500
    G = torch.randn(K, P, generator=g, dtype=torch.float64)

    def forward(m):
        return torch.sigmoid(3 * m @ G.T)
    for _ in range(3):
        d_obs = (forward(torch.randn(P, generator=g, dtype=torch.float64)) > 0.5).double()
        prior = torch.randn(N, P, generator=g, dtype=torch.float64)
        post = vae.esmda(forward, prior, d_obs, vae.OBS_SD, vae.ASSIMILATIONS, generator=g)

        def matched(m):
            return ((forward(m) > 0.5).double() == d_obs).double().mean().item()
        assert matched(prior) < 0.7 and matched(post) > 0.95
        assert post.std(0).mean() > 0.3 * prior.std(0).mean()


# ============================================================================ Part 3: the stand-in

def test_synthetic_layout_and_determinism():
    a = vae.make_synthetic_channels(40, seed=3)
    assert a.dtype == np.uint8 and a.shape == (40, 128, 128, 1)
    assert set(np.unique(a)) == {0, 1}
    assert np.array_equal(a, vae.make_synthetic_channels(40, seed=3))
    assert not np.array_equal(a, vae.make_synthetic_channels(40, seed=4))
    assert vae.make_synthetic_channels(5, size=64).shape == (5, 64, 64, 1)
    # chunking is invisible: the same images whatever the chunk size
    assert np.array_equal(np.concatenate(list(vae.synthetic_chunks(40, seed=3, chunk=7))), a)


def centreline_wiggle(imgs):
    """For images holding one channel that spans top to bottom: the sd (px) of its per-row
    centre around a fitted straight line. A sine of half-amplitude A gives about A / sqrt(2)."""
    out = []
    for im in imgs:
        pieces, spanning = vae.pieces_and_spanning(torch.from_numpy(im).bool()[None])
        if pieces[0] == 1 and spanning[0] == 1:
            rows = np.arange(len(im))
            centre = np.array([np.nonzero(r)[0].mean() for r in im])
            out.append((centre - np.polyval(np.polyfit(rows, centre, 1), rows)).std())
    return np.array(out)


def test_synthetic_statistics_match_the_real_images():
    real = real_images()
    synth = vae.make_synthetic_channels(1000, seed=1)[..., 0]
    rs, ss = vae.image_statistics(torch.from_numpy(real)), vae.image_statistics(torch.from_numpy(synth))
    for key in rs:                   # proportion, widths, runs per row, pieces, spanning, lean
        assert np.nanmin(rs[key]) <= np.nanmean(ss[key]) <= np.nanmax(rs[key]), key
    # measured on re-digitized real images (13 of them in results/real_reference.npz):
    # proportion 0.21 +- 0.06; channels lean 2-20 degrees (median 7); sine-like centrelines
    # of half-amplitude 10-35 px (median 21), so straight bars of the right width and
    # proportion would fail here
    assert 0.17 < ss["proportion"].mean() < 0.25 and 0.04 < ss["proportion"].std() < 0.09
    assert 2 < np.nanmean(ss["lean"]) < 20
    wiggle = centreline_wiggle(synth)
    assert len(wiggle) > 50 and 6 < wiggle.mean() < 20
    bars = np.zeros((3, 128, 128), np.uint8)
    for y in range(128):
        bars[:, y, 40 + y // 8:52 + y // 8] = 1           # straight, leaning 7 degrees
    assert centreline_wiggle(bars).max() < 1


# ============================================================================ Part 3: metrics

def test_variogram_of_stripes():
    # vertical stripes of period 2: along x, gamma = 1/2 at odd lags and 0 at even lags;
    # along y nothing changes, so gamma = 0
    m = torch.zeros(1, 8, 8, dtype=torch.bool)
    m[..., ::2] = True
    assert torch.allclose(vae.variogram(m, "x"), torch.tensor([0.5, 0, 0.5, 0]))
    assert torch.allclose(vae.variogram(m, "y"), torch.zeros(4))


def test_connected_components_and_connectivity():
    m = torch.zeros(1, 8, 8, dtype=torch.bool)
    m[0, 1, 0:8] = True                      # two horizontal bars, not touching
    m[0, 5, 0:8] = True
    lab = vae.connected_components(m)
    assert len(torch.unique(lab[m])) == 2
    # along x every channel pair is inside one bar -> 1; along y pairs at lag 4 are in different bars -> 0
    assert torch.allclose(vae.connectivity(m, "x"), torch.ones(4))
    assert vae.connectivity(m, "y")[3] == 0
    # a serpentine winds four times: labels must travel along it over several rounds
    s = torch.zeros(1, 9, 9, dtype=torch.bool)
    s[0, ::2, :] = True
    for r in range(1, 9, 2):
        s[0, r, 8 if r % 4 == 1 else 0] = True
    assert len(torch.unique(vae.connected_components(s)[s])) == 1
    d = torch.tensor([[[1, 0], [0, 1]]], dtype=torch.bool)        # diagonal: two pieces
    assert len(torch.unique(vae.connected_components(d)[d])) == 2
    assert not vae.connected_components(torch.zeros(2, 4, 4, dtype=torch.bool)).any()


def test_pieces_spanning_and_widths():
    m = torch.zeros(2, 10, 10, dtype=torch.bool)
    m[0, :, 2:5] = True           # spans top to bottom, 3 px wide
    m[0, 3:6, 7:9] = True         # an island, 2 px wide
    m[1, 2:8, 0:4] = True         # touches the left edge: its runs are cut by the frame
    m[1, 2:8, 6:10] = True        # and the right edge
    m[1, 0:2, 5] = True           # touches the top edge only: a piece, but it does not span
    pieces, spanning = vae.pieces_and_spanning(m)
    assert pieces.tolist() == [2, 3] and spanning.tolist() == [1, 0]
    widths, image = vae.run_widths(m)
    assert sorted(widths.tolist()) == [1] * 2 + [2] * 3 + [3] * 10
    assert image.tolist().count(1) == 2          # image 1: only the two 1-px runs count


def test_jensen_shannon_and_wasserstein():
    p = vae.pattern_histogram(torch.rand(4, 16, 16) > 0.5)
    assert vae.jensen_shannon(p, p) == pytest.approx(0, abs=1e-12)
    a, b = torch.zeros(512, dtype=torch.float64), torch.zeros(512, dtype=torch.float64)
    a[0], b[1] = 1, 1
    assert vae.jensen_shannon(a, b) == pytest.approx(1.0)          # disjoint: 1 bit
    # by hand: p = (1, 0), q = (1/2, 1/2), m = (3/4, 1/4):
    # 1/2 log2(4/3) + 1/2 (1/2 log2(2/3) + 1/2 log2(2)) = 0.3113 bits
    assert vae.jensen_shannon(torch.tensor([1.0, 0]), torch.tensor([0.5, 0.5])) == pytest.approx(0.3113, abs=1e-4)
    assert vae.wasserstein1([0, 0, 1], [0, 0, 1]) == 0
    assert vae.wasserstein1([0, 1], [2, 3]) == pytest.approx(2.0)   # a shift by 2
    assert vae.wasserstein1([0], [0, 1]) == pytest.approx(0.5)


def test_pattern_codes_one_hot():
    # a 3x3 image has one 3x3 window; with only pixel (r, c) on, its code is 2^(3r + c)
    for r in range(3):
        for c in range(3):
            m = torch.zeros(1, 3, 3, dtype=torch.bool)
            m[0, r, c] = True
            hist = vae.pattern_histogram(m)
            assert hist[2 ** (3 * r + c)] == 1, (r, c)
    assert vae.pattern_histogram(torch.ones(1, 5, 5, dtype=torch.bool))[511] == 1


def test_hamming_matches_counting():
    a, b = torch.rand(3, 1, 6, 6) > 0.5, torch.rand(4, 1, 6, 6) > 0.5
    want = torch.tensor([[(x != y).sum().item() for y in b] for x in a], dtype=torch.float32)
    assert torch.equal(vae.hamming(a, b), want)


def test_latent_health_on_hand_made_codes():
    # four codes +-e1, +-e2: Cov(mu) = diag(2/3) (unbiased), so with sigma^2 = 1/3 the
    # aggregate posterior covariance is exactly I and its mean 0
    mu = torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]])
    health = vae.latent_health(mu, torch.full_like(mu, math.log(1 / 3)))
    assert health["active_units"] == 2 and health["latent_dim"] == 2
    assert health["agg_posterior_cov_err"] == pytest.approx(0, abs=1e-6)    # float32 sigma^2
    assert health["agg_posterior_mean_err"] == pytest.approx(0, abs=1e-9)
    # as samples (no sigma^2 term) the covariance is diag(2/3): error ||diag(1/3)|| / sqrt(2)
    assert vae.latent_health(mu)["agg_posterior_cov_err"] == pytest.approx(1 / 3, abs=1e-6)
    # codes that ignore the image, with sigma^2 = 4: covariance 4I, error ||3I|| / sqrt(d) = 3
    still = vae.latent_health(torch.ones(5, 3), torch.full((5, 3), math.log(4)))
    assert still["active_units"] == 0
    assert still["agg_posterior_cov_err"] == pytest.approx(3)
    assert still["agg_posterior_mean_err"] == pytest.approx(1)       # ||(1, 1, 1)|| / sqrt(3)


def test_blur_diversity_memorisation_and_interpolation_steps():
    assert vae.blur(torch.tensor([0.0, 1.0, 0.5, 0.25])) == pytest.approx(0.1875)
    x = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert vae.mean_pairwise_hamming(x) == pytest.approx((2 + 4 + 2) / 3)
    pool = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    dist, index = vae.nearest(x, pool)
    assert dist.tolist() == [0, 1, 1] and index.tolist() == [0, 1, 1]
    # across chunks of the pool: the nearest image is in the second chunk
    dist, index = vae.nearest(x[2:], torch.cat([pool, x[2:]]), chunk=2)
    assert dist.tolist() == [0] and index.tolist() == [2]
    # 3 frames on 2 paths: path 0 flips every pixel once, path 1 never changes
    frames = torch.zeros(3, 2, 4, dtype=torch.bool)
    frames[2, 0] = True
    assert vae.step_changes(frames) == pytest.approx((0.25, 1.0))


def test_realism_scores_of_identical_and_of_hand_made_sets():
    x = images(20)
    for key, value in vae.realism_scores(x, x).items():
        if not key.endswith("_mean"):
            assert value == pytest.approx(0, abs=1e-9), key
    # a: one straight bar 4 px wide; b: the same bar and a second one 6 px wide. Both run
    # top to bottom, so everything along y agrees and everything else is known by hand.
    a = torch.zeros(4, 1, 64, 64, dtype=torch.uint8)
    a[..., 10:14] = 1
    b = a.clone()
    b[..., 40:46] = 1
    s = vae.realism_scores(a, b)
    assert s["proportion_gap"] == pytest.approx(6 / 64) and s["proportion_w1"] == pytest.approx(6 / 64)
    assert s["pieces_w1"] == pytest.approx(1) and s["spanning_gap"] == pytest.approx(1)
    assert s["pieces_mean"] == 1 and s["spanning_mean"] == 1
    assert s["width_w1"] == pytest.approx(1.0)           # widths {4} against {4, 6} half and half
    assert s["variogram_y"] == pytest.approx(0) and s["connectivity_y"] == pytest.approx(0)
    for key in ("variogram_x", "connectivity_x", "patterns_jsd", "patterns_jsd_half"):
        assert s[key] > 0.01, key


def test_iwae_bound_against_quadrature_of_log_px():
    # A 1-d latent: log p(x) = log integral p(x|z) N(z; 0, 1) dz by quadrature on a fine grid.
    # With q(z|x) moved off the posterior (2 sd away, 1.5x as wide), the ELBO (K = 1) sits
    # well below log p(x), and the IWAE bound with K = 200 must come within 0.1 nats of it.
    torch.manual_seed(0)
    model = vae.build_model("dense", 8, latent_dim=1, widths=(4, 4)).eval()
    with torch.no_grad():
        model.expand[0].weight.mul_(30)                # a decoder that depends strongly on z
    x = (torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.7).float()
    grid = torch.linspace(-8, 8, 16001).view(-1, 1)
    with torch.no_grad():
        logits = model.decode(grid)
        log_joint = torch.stack([-vae.bernoulli_nll(logits, xi.expand(len(grid), 1, 8, 8)) for xi in x])
        log_joint += torch.distributions.Normal(0.0, 1.0).log_prob(grid.view(-1))    # (4, G)
    log_px = torch.logsumexp(log_joint, 1) + math.log(16 / 16000)
    w = torch.softmax(log_joint, 1)
    post_mean = (w * grid.view(-1)).sum(1)
    post_sd = ((w * grid.view(-1) ** 2).sum(1) - post_mean ** 2).sqrt()
    repeats = 50
    mu = (post_mean + 2 * post_sd).view(-1, 1).repeat(repeats, 1)
    logvar = (2 * torch.log(1.5 * post_sd)).view(-1, 1).repeat(repeats, 1)
    model.encode = lambda x: (mu, logvar)
    xs = x.repeat(repeats, 1, 1, 1)
    torch.manual_seed(2)
    k1 = vae.iwae_bound(model, xs, 1).view(repeats, 4).mean(0)
    k200 = vae.iwae_bound(model, xs, 200).view(repeats, 4).mean(0)
    assert (k1 < log_px - 1.0).all()                 # the ELBO: KL(q || posterior) below
    torch.testing.assert_close(k200, log_px, rtol=0, atol=0.1)


# ============================================================================ files, resume, Ctrl-C

def tiny_args(tmp_path, *extra):
    return vae.parse_args(["--arch", "dense", "--epochs", "2", "--batch-size", "16",
                           "--widths", "8,16,16,16", "--latent-dim", "8", "--warmup", "0.5",
                           "--lr", "2e-3", "--out", str(tmp_path / "out"), *extra])


def test_model_round_trip_decodes_identically(tmp_path):
    # load_model puts the model in channels_last, and the two memory formats run different
    # oneDNN kernels, whose sums differ in the last bits (about 1e-7 relative, more or less
    # by CPU kind). So this compares with float32 tolerances (assert_close's defaults:
    # rtol 1.3e-6, atol 1e-5), far below any change that a wrong weight would make.
    for arch in ("dense", "fullyconv"):
        model = vae.build_model(arch, 64, **TINY).eval()
        vae.save_model(model, tmp_path / "m.pt")
        again = vae.load_model(tmp_path / "m.pt")
        z = torch.randn(3, *model.latent_shape)
        with torch.no_grad():
            torch.testing.assert_close(model.decode(z), again.decode(z))
        # the weights themselves come back bit for bit
        for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
            assert torch.equal(a, b), name


def test_same_seed_same_model_other_seed_other_model(tmp_path):
    x = images(80)
    args = tiny_args(tmp_path, "--epochs", "1")
    weights = []
    for seed in (0, 0, 1):
        args.seed = seed
        torch.manual_seed(seed)                   # as run() does before building the model
        model = vae.build_model("dense", 64, latent_dim=8, prior="flow", **TINY)
        vae.train(model, x[:64], x[64:], args, CPU, tmp_path / "ck.pt", log=lambda s: None)
        weights.append(model.mu.weight.detach().clone())
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_resume_equals_uninterrupted(tmp_path):
    train_x, val_x = images(160)[:128], images(160)[128:]
    # with the default joint flow prior, whose weights and optimizer state must come back too
    args = tiny_args(tmp_path)

    def model():
        return vae.build_model("dense", 64, latent_dim=8, prior="flow", **TINY)
    torch.manual_seed(0)
    whole = vae.train(model(), train_x, val_x, args, CPU, tmp_path / "a.pt", log=lambda s: None)

    def interrupt_after_first_epoch(message):
        if message.startswith("epoch 1 done"):
            signal.raise_signal(signal.SIGINT)         # as if the user pressed Ctrl-C
    torch.manual_seed(0)
    with pytest.raises(vae.Interrupted):
        vae.train(model(), train_x, val_x, args, CPU, tmp_path / "b.pt", log=interrupt_after_first_epoch)
    ckpt = vae.load_checkpoint(tmp_path / "b.pt", args)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 1)      # stopped one step into epoch 2
    torch.manual_seed(123)                               # the checkpoint's RNG state must win
    resumed = vae.train(model(), train_x, val_x, args, CPU, tmp_path / "b.pt", resume=ckpt, log=lambda s: None)
    for key in ("train_rec", "train_kl", "val_rec", "val_kl"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-6), key


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    x = images(96)
    args = tiny_args(tmp_path, "--epochs", "1")
    model = vae.build_model("dense", 64, latent_dim=8, **TINY)
    with torch.no_grad():
        model.mu.weight.fill_(float("nan"))
    with pytest.raises(vae.TrainingDiverged, match="lower --lr"):
        vae.train(model, x[:64], x[64:], args, CPU, tmp_path / "ck.pt", log=lambda s: None)


def default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(script, cwd):
    """Run a Python script in a child process. A shell starts background jobs with SIGINT
    ignored, and a child inherits that; Python then installs no KeyboardInterrupt handler,
    and the SIGINT sent below would do nothing. So the child starts with the default
    disposition, as it would from a terminal."""
    return subprocess.Popen([sys.executable, "-c", script], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)


def main_script(argv, slow_generation=False):
    """A script that runs vae.main(argv) on the CPU; with slow_generation, each chunk of
    synthetic images takes at least 0.2 s, so that a Ctrl-C surely lands while it is written,
    however fast the machine."""
    return (f"import sys, time\nsys.path.insert(0, {str(HERE)!r})\nimport vae\n"
            + ("chunks = vae.synthetic_chunks\n"
               "def slow(*a, **k):\n    for c in chunks(*a, **k):\n        time.sleep(0.2)\n        yield c\n"
               "vae.synthetic_chunks = slow\n" if slow_generation else "")
            + f"vae.main({[str(a) for a in argv] + ['--device', 'cpu']!r})\n")


def interrupt_after(proc, marker, delay):
    """Send SIGINT `delay` s after a stdout line containing marker -> (code, stdout, stderr)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            break
    assert seen and marker in seen[-1], "".join(seen)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, "".join(seen) + stdout, stderr


def assert_one_line_130(code, stderr):
    assert code == 130, stderr
    assert "Traceback" not in stderr
    assert len([l for l in stderr.splitlines() if l.strip()]) == 1, stderr


def test_ctrl_c_saves_checkpoint_and_exits_130(tmp_path):
    data = tiny_h5(tmp_path / "d.h5", n=400)
    out = tmp_path / "o"
    proc = start(main_script(["--arch", "dense", "--data", data, "--out", out, "--epochs", "500",
                              "--batch-size", "8", "--widths", "8,16,16,16"]), tmp_path)
    # the line train() prints once its Ctrl-C handler is in place
    code, stdout, stderr = interrupt_after(proc, "Ctrl-C saves a checkpoint", 1.0)
    assert_one_line_130(code, stderr)
    assert "--resume" in stderr
    assert (out / "checkpoint.pt").is_file() and (out / "samples.png").is_file()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] * 1000 + ckpt["step"] > 0
    assert not list(out.glob("*.tmp"))


LOST_CTRL_C = """
import signal, sys, time
sys.path.insert(0, {here!r})
import vae
# Python's own Ctrl-C handler, as in a terminal: a suite started as a background job (cmd &)
# inherits SIGINT ignored, and then interrupt_main() would do nothing.
signal.signal(signal.SIGINT, signal.default_int_handler)
if {hook}:
    sys.unraisablehook = vae.reraise_lost_ctrl_c
class Finalized:
    def __del__(self):
        raise KeyboardInterrupt     # as if Ctrl-C landed in a finalizer: Python cannot raise it here
try:
    Finalized()                     # dropped at once, so __del__ runs now
    t = time.time()
    while time.time() - t < 5:      # time enough for the hook's timer thread, even under load
        pass
    print("lost")
except KeyboardInterrupt:
    print("raised again")
"""


def test_ctrl_c_lost_in_a_finalizer_is_raised_again():
    # Seen in a scripted SIGINT during data generation: the KeyboardInterrupt landed in an
    # h5py weakref callback, Python printed "Exception ignored" and the run went on training.
    for hook, want in ((False, "lost"), (True, "raised again")):
        script = LOST_CTRL_C.format(here=str(HERE), hook=hook)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert done.stdout.strip() == want, done.stderr
        assert ("Exception ignored" in done.stderr) == (not hook)


def test_ctrl_c_during_data_generation_leaves_no_partial_file(tmp_path):
    # no data/ here, so vae.py starts writing the 50,000-image synthetic cache
    proc = start(main_script(["--arch", "dense", "--out", tmp_path / "o"], slow_generation=True), tmp_path)
    code, stdout, stderr = interrupt_after(proc, "generating", 0.5)
    assert_one_line_130(code, stderr)
    assert "half-written" in stderr
    assert list((tmp_path / "data").iterdir()) == []        # neither the .h5 nor its .tmp


# ============================================================================ bad input

def test_missing_data_path_is_an_error_not_a_fallback(tmp_path, capsys):
    code, out, err = run_main(["--arch", "dense", "--data", tmp_path / "nope.h5", "--out", tmp_path / "o"], capsys)
    assert_clean_error(code, err, "nope.h5", "file not found", "train_images.h5")
    assert "synthetic" not in out + err


def test_not_hdf5_and_truncated(tmp_path, capsys):
    (tmp_path / "text.h5").write_text("hello")
    good = tiny_h5(tmp_path / "good.h5")
    (tmp_path / "cut.h5").write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    for name in ("text.h5", "cut.h5"):
        code, _, err = run_main(["--arch", "dense", "--data", tmp_path / name, "--out", tmp_path / "o"], capsys)
        assert_clean_error(code, err, name, "not a readable HDF5 file")


def test_a_folder_where_a_file_belongs(tmp_path, capsys):
    (tmp_path / "folder.h5").mkdir()
    code, _, err = run_main(["--arch", "dense", "--data", tmp_path / "folder.h5", "--out", tmp_path / "o"], capsys)
    assert_clean_error(code, err, "folder.h5", "is a folder, not a file")
    (tmp_path / "o" / "model.pt").mkdir(parents=True)
    code, _, err = run_main(["--arch", "dense", "--out", tmp_path / "o", "--evaluate"], capsys)
    assert_clean_error(code, err, "model.pt", "is a folder, not a model file")


def test_missing_key_lists_keys(tmp_path, capsys):
    with h5py.File(tmp_path / "k.h5", "w") as f:
        f.create_dataset("images", data=np.zeros((4, 128, 128), np.uint8))
    code, _, err = run_main(["--arch", "dense", "--data", tmp_path / "k.h5", "--out", tmp_path / "o"], capsys)
    assert_clean_error(code, err, "no dataset 'train_images'", "['images']")


@pytest.mark.parametrize("shape, size", [((4, 32, 32), 64), ((4, 64, 64), 128), ((4, 64, 48), 64),
                                         ((4, 3, 128, 128), 64), ((4, 128, 128, 3), 64)])
def test_wrong_shape(tmp_path, capsys, shape, size):
    # the real file is (N, 128, 128, 1); a file of images at the training size is read as it
    # is (samples.h5 from --sample), but nothing else: no upsampling, no colour channels
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f.create_dataset("train_images", data=np.zeros(shape, np.uint8))
    code, _, err = run_main(["--arch", "dense", "--data", tmp_path / "s.h5", "--out", tmp_path / "o",
                             "--size", size], capsys)
    assert_clean_error(code, err, str(shape), "expected (N, S, S, 1) or (N, S, S)")


def test_mask_0_255_is_read_as_0_1_with_a_warning(tmp_path, capsys):
    img = vae.make_synthetic_channels(4, seed=2)
    with h5py.File(tmp_path / "m.h5", "w") as f:
        f.create_dataset("train_images", data=img * 255)
    loaded = vae.load_images(tmp_path / "m.h5", size=128)
    assert torch.equal(loaded, torch.from_numpy(img).permute(0, 3, 1, 2))
    assert "0/255" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["grey", "nan", "three_levels"])
def test_non_binary_values_are_refused(tmp_path, capsys, bad):
    img = vae.make_synthetic_channels(4, seed=2).astype(np.float32)
    if bad == "grey":
        img[0, 0, 0, 0] = 0.5
    elif bad == "nan":
        img[1, 5, 5, 0] = np.nan
    else:
        img[2, 0, 0, 0] = 255
    with h5py.File(tmp_path / "g.h5", "w") as f:
        f.create_dataset("train_images", data=img)
    code, _, err = run_main(["--arch", "dense", "--data", tmp_path / "g.h5", "--out", tmp_path / "o"], capsys)
    assert_clean_error(code, err, "must be binary")
    assert {"grey": "0.5", "nan": "nan", "three_levels": "255"}[bad] in err


def test_zero_images_and_less_than_a_batch(tmp_path, capsys):
    with h5py.File(tmp_path / "z.h5", "w") as f:
        f.create_dataset("train_images", data=np.zeros((0, 128, 128, 1), np.uint8))
    code, _, err = run_main(["--arch", "dense", "--data", tmp_path / "z.h5", "--out", tmp_path / "o"], capsys)
    assert_clean_error(code, err, "zero images")
    tiny_h5(tmp_path / "few.h5", n=20)
    code, _, err = run_main(["--arch", "dense", "--data", tmp_path / "few.h5", "--out", tmp_path / "o",
                             "--batch-size", "64"], capsys)
    assert_clean_error(code, err, "fewer than one batch of 64")


@pytest.mark.parametrize("argv, fragment", [
    (["--size", "96"], "argument --size"),
    (["--epochs", "-1"], "argument --epochs"),
    (["--epochs", "0"], "argument --epochs"),
    (["--beta", "-0.5"], "argument --beta"),
    (["--beta", "nan"], "argument --beta"),
    (["--latent-dim", "0"], "argument --latent-dim"),
    (["--lr", "0"], "argument --lr"),
    (["--batch-size", "0"], "argument --batch-size"),
    (["--widths", "8,x"], "argument --widths"),
    (["--arch", "mlp"], "argument --arch"),
    (["--latent-dim", "1"], "a flow prior couples half"),
    (["--arch", "fullyconv", "--latent-channels", "1"], "a flow prior couples half"),
    (["--widths", "8,8,8,8,8,8,8"], "divisible by 2^7"),
    (["--prior", "normal"], "argument --prior"),
    (["--prior", "posthoc"], "argument --prior"),
    (["--wells", "0"], "argument --wells"),
    (["--sample", "0"], "argument --sample"),
    (["--sample", "-5"], "argument --sample"),
    (["--arch", "fullyconv", "--sample", "10", "--grid", "0"], "argument --grid"),
    (["--arch", "fullyconv", "--sample", "10", "--grid", "-2"], "argument --grid"),
    (["--sample", "10", "--grid", "8"], "argument --grid"),                  # dense has no grid
    (["--arch", "fullyconv", "--grid", "8"], "argument --grid"),             # without --sample
    (["--sample", "10", "--condition"], "not allowed with"),
])
def test_bad_flags_are_argparse_errors(capsys, argv, fragment):
    if "--arch" not in argv:
        argv = ["--arch", "dense"] + argv
    code, _, err = run_main(argv, capsys)
    assert_clean_error(code, err, fragment)


def test_resume_with_bad_checkpoints(tmp_path, capsys):
    data = tiny_h5(tmp_path / "d.h5")
    base = ["--data", data, "--out", tmp_path / "o", "--widths", "8,16,16,16", "--epochs", "1"]
    code, _, err = run_main(["--arch", "dense", *base, "--resume", tmp_path / "missing.pt"], capsys)
    assert_clean_error(code, err, "missing.pt", "checkpoint not found")
    (tmp_path / "junk.pt").write_bytes(b"\x00not a checkpoint")
    code, _, err = run_main(["--arch", "dense", *base, "--resume", tmp_path / "junk.pt"], capsys)
    assert_clean_error(code, err, "junk.pt", "not a readable checkpoint")
    # a real checkpoint of the other arch
    args = tiny_args(tmp_path, "--arch", "fullyconv")
    model = vae.build_model("fullyconv", 64, prior="flow", **TINY)
    state = {"epoch": 1, "step": 0, "sums": [0.0, 0.0], "seconds": 1.0, "history": {}}
    vae.save_checkpoint(tmp_path / "fc.pt", model, torch.optim.Adam(model.parameters()), args, state, CPU)
    code, _, err = run_main(["--arch", "dense", *base, "--resume", tmp_path / "fc.pt"], capsys)
    assert_clean_error(code, err, "holds a model with arch fullyconv", "asks for dense")


class Payload:                       # a pickled object: loading it could run code
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_checkpoint_with_pickled_object_is_refused(tmp_path, capsys):
    torch.save({"model": {}, "optimizer": {}, "config": {}, "epoch": 0, "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(vae.DataError, match="pickled Python objects"):
        vae.load_model(tmp_path / "evil.pt")
    code, out, err = run_main(["--arch", "dense", "--data", tmp_path / "x.h5", "--out", tmp_path / "o",
                               "--resume", tmp_path / "evil.pt"], capsys)
    assert_clean_error(code, err, "evil.pt", "pickled Python objects")
    assert "this ran while loading" not in out + err


def test_corrupt_model_file_and_plain_pickle_with_code(tmp_path, capsys):
    # random bytes are a corrupt file, not "pickled objects"; a plain pickle that would run
    # code on loading is refused as such, and nothing in it runs
    out = tmp_path / "o"
    out.mkdir()
    (out / "model.pt").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())
    code, _, err = run_main(["--arch", "dense", "--out", out, "--evaluate"], capsys)
    assert_clean_error(code, err, "model.pt", "corrupt or not a PyTorch file")
    assert "pickled" not in err
    with open(out / "model.pt", "wb") as f:
        pickle.dump({"config": {}, "evil": Payload()}, f)
    code, stdout, err = run_main(["--arch", "dense", "--out", out, "--evaluate"], capsys)
    assert_clean_error(code, err, "model.pt", "pickled Python objects")
    assert "this ran while loading" not in stdout + err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_line(tmp_path, capsys):
    code, _, err = run_main(["--arch", "dense", "--device", "cuda", "--out", tmp_path], capsys)
    want = "CPU-only build" if torch.version.cuda is None else "finds no usable GPU"
    assert_clean_error(code, err, "--device cuda", want, "--device cpu")
    code, _, err = run_main(["--arch", "dense", "--device", "tpu9", "--out", tmp_path], capsys)
    assert_clean_error(code, err, "--device tpu9", "not a device name")


def test_help_prints_each_default_once(capsys):
    with pytest.raises(SystemExit):
        vae.parse_args(["--help"])
    entries = {}                                # "--flag" -> its help text, lines joined
    for line in capsys.readouterr().out.split("options:")[1].splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        elif entries:
            entries[flag] += " " + line.strip()
    assert "(default: None)" not in " ".join(entries.values())
    for flag, default in (("--batch-size", "128"), ("--seed", "0"), ("--shape-steps", "1000"),
                          ("--lr", "0.002"), ("--widths", "16,32,64,128"), ("--prior", "flow")):
        assert entries[flag].count("default") == 1 and f"(default: {default})" in entries[flag], entries[flag]
    for flag in ("--size", "--data", "--out", "--resume", "--grid", "--epochs"):   # in words, once
        assert entries[flag].count("default") == 1, entries[flag]
    assert "Required, except with --compare-data" in entries["--arch"]
    assert "(default: 24 dense, 20 fullyconv)" in entries["--epochs"]
    assert [vae.parse_args(["--arch", a]).epochs for a in vae.ARCHS] == [24, 20]


def test_unwritable_out_fails_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    data = tiny_h5(tmp_path / "d.h5")
    code, out, err = run_main(["--arch", "dense", "--data", data, "--out", tmp_path / "file" / "sub"], capsys)
    assert_clean_error(code, err, "cannot write results")
    assert "epoch" not in out


# ============================================================================ end to end

@pytest.mark.parametrize("arch", ["dense", "fullyconv"])
def test_main_end_to_end_evaluate_sample_and_condition(tmp_path, capsys, arch):
    data = tiny_h5(tmp_path / "d.h5", n=200)
    out = tmp_path / "res" / arch
    argv = ["--arch", arch, "--data", data, "--out", out, "--epochs", "1", "--batch-size", "16",
            "--widths", "8,16,16,16", "--eval-n", "10", "--shape-steps", "3"]
    code, stdout, err = run_main(argv, capsys)
    assert code == 0, err
    assert "shaping the prior: step 3/3" in stdout
    assert json.loads((out / "config.json").read_text())["shape_minutes"] > 0
    for name in ("samples.png", "interpolation.png", "reconstructions.png", "losses.png", "nearest.png",
                 "history.csv", "config.json", "model.pt", "metrics.json"):
        assert (out / name).is_file(), name
    assert (out / "large_field.png").is_file() == (arch == "fullyconv")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prior"] == "flow" and set(metrics["samples"]) == {"flow", "posterior"}
    assert metrics["neg_iwae"] <= metrics["neg_elbo"] + 1.0
    assert 0 <= metrics["real_recon_accuracy"] <= 1         # the 13 real images were found
    assert ("large_field" in metrics) == (arch == "fullyconv")
    assert vae.load_model(out / "model.pt").prior.name == "flow"
    assert "flow prior" in (tmp_path / "res" / "comparison.md").read_text()
    assert (tmp_path / "res" / "samples_side_by_side.png").is_file()
    (out / "samples.png").unlink()
    code, stdout, err = run_main(argv + ["--evaluate"], capsys)
    assert code == 0, err
    assert (out / "samples.png").is_file() and "epoch 1/" not in stdout
    # --sample: thresholded prior samples in the real file's layout, which load_images reads
    code, stdout, err = run_main(argv + ["--sample", "37"], capsys)
    assert code == 0, err
    with h5py.File(out / "samples.h5") as f:
        assert f["train_images"].shape == (37, 64, 64, 1) and f["train_images"].dtype == np.uint8
    back = vae.load_images(out / "samples.h5", size=64)
    assert back.shape == (37, 1, 64, 64) and set(back.unique().tolist()) <= {0, 1}
    model = vae.load_model(out / "model.pt")           # the same draws, decoded here
    z = vae.sample_latents(model, 37, torch.Generator().manual_seed(0))
    want = vae.decode_probs(model, z, CPU) >= 0.5
    assert (back.bool() == want).float().mean() > 0.999
    if arch == "fullyconv":                            # an (8, 8) latent grid: 128x128 fields
        code, _, err = run_main(argv + ["--sample", "5", "--grid", "8"], capsys)
        assert code == 0, err
        assert vae.load_images(out / "samples.h5", size=128).shape == (5, 1, 128, 128)
    code, _, err = run_main(argv + ["--evaluate", "--size", "128"], capsys)
    assert_clean_error(code, err, "holds a model with size 64", "asks for 128")
    code, stdout, err = run_main(argv + ["--condition", "--wells", "8", "--assimilations", "3"], capsys)
    assert code == 0, err
    cond = json.loads((out / "conditioning.json").read_text())
    assert cond["prior"] == "flow" and (out / "conditioning.png").is_file()
    n_truths = min(vae.TRUTHS, 10)                     # 10 of the 200 images are held out
    assert vae.TRUTHS == 20 and len(cond["cases"]) == cond["truths"] == n_truths and cond["wells"] == 8 and cond["inflation"] == [3.0, 3.0, 3.0]
    truths = [c["truth_proportion"] for c in cond["cases"]]
    assert cond["posterior_proportion_over_truth"] == pytest.approx(cond["posterior_proportion"]["mean"] / np.mean(truths))
    assert cond["obs_sd"] == vae.OBS_SD == 0.02 and vae.ASSIMILATIONS == 16
    members = vae.load_images(out / "conditioning_members.h5", size=64)
    assert members.shape == (n_truths * 200, 1, 64, 64) and set(members.unique().tolist()) <= {0, 1}
    code, _, err = run_main(argv + ["--condition", "--wells", "5000"], capsys)
    assert_clean_error(code, err, "--wells 5000", "only 4096 pixels")
    code, _, err = run_main(argv[:2] + ["--out", tmp_path / "empty", "--condition"], capsys)
    assert_clean_error(code, err, "model.pt", "not found")
    code, _, err = run_main(argv[:2] + ["--out", tmp_path / "empty", "--sample", "5"], capsys)
    assert_clean_error(code, err, "model.pt", "not found")


def test_gaussian_prior_lands_in_its_own_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                         # the default --out is relative: results/...
    data = tiny_h5(tmp_path / "d.h5", n=160)
    code, stdout, err = run_main(["--arch", "dense", "--data", data, "--epochs", "1", "--batch-size", "32",
                                  "--widths", "8,16,16,16", "--eval-n", "8", "--prior", "gaussian"], capsys)
    assert code == 0, err
    out = Path("results") / "dense-gaussian"
    assert (out / "model.pt").is_file() and not Path("results/dense").exists()
    assert vae.load_model(out / "model.pt").prior.name == "gaussian"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["samples"]) == {"gaussian", "posterior"}


def test_benchmark_flag_writes_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(vae, "BENCH_SECONDS", 0.2)
    code, out, err = run_main(["--arch", "fullyconv", "--benchmark", "--batch-size", "8",
                               "--widths", "8,16,16,16", "--out", tmp_path], capsys)
    assert code == 0, err
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    # the key names the machine, so another CPU, or this one capped to AVX2, gets its own entry
    capability = torch.backends.cpu.get_cpu_capability()
    key = f"fullyconv, batch 8, {vae.device_name(CPU)}, {capability}, {torch.get_num_threads()} threads"
    assert list(saved) == [key]
    saved = saved[key]
    for key in ("train_img_per_s", "sample_img_per_s", "forward_flops_per_image",
                "train_gflops_per_s_fp32", "matmul_peak_gflops_per_s", "fraction_of_peak_fp32",
                "device", "torch", "train_img_per_s_fp32", "peer_img_per_s_fp32", "code_version"):
        assert key in saved, key
    assert saved["train_img_per_s"] > 0 and 0 < saved["fraction_of_peak_fp32"]
    # the default path is the one training takes; bf16 is timed only where it is native
    p = "bf16" if vae.bf16_native(CPU) else "fp32"
    assert saved["precision"] == p and ("train_img_per_s_bf16" in saved) == (p == "bf16")
    assert saved["train_img_per_s"] == saved[f"train_img_per_s_{p}"]
    assert saved["times_peer_fp32"] == saved["train_img_per_s"] / saved["peer_img_per_s_fp32"]
    assert saved["times_peer_same_precision"] == saved["train_img_per_s"] / saved[f"peer_img_per_s_{p}"]
    assert "the peer shape" in out


def test_vae_py_copied_alone_into_an_empty_folder(tmp_path):
    # a single script gets copied on its own: without results/real_reference.npz beside it,
    # training and --evaluate still finish, and say in one line what they skipped
    shutil.copy(HERE / "vae.py", tmp_path / "vae.py")
    tiny_h5(tmp_path / "d.h5", n=120)
    argv = [sys.executable, "vae.py", "--arch", "dense", "--data", "d.h5", "--epochs", "1",
            "--batch-size", "16", "--widths", "8,16,16,16", "--eval-n", "8", "--device", "cpu",
            "--shape-steps", "3"]
    for extra in ([], ["--evaluate"]):
        done = subprocess.run(argv + extra, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        skipped = [l for l in done.stdout.splitlines() if "real_reference.npz not found" in l]
        assert len(skipped) == 1, done.stdout
        metrics = json.loads((tmp_path / "results" / "dense" / "metrics.json").read_text())
        assert metrics["real_recon_accuracy"] is None and 0 <= metrics["recon_accuracy"] <= 1
        assert (tmp_path / "results" / "dense" / "reconstructions.png").is_file()


# ============================================================================ the file itself

def test_docstring_names_the_parts_in_order():
    # the module docstring tells the reader the file comes in three parts; they must be
    # there, in that order, each under its banner, with "You can stop here" after Part 1
    text = (HERE / "vae.py").read_text()
    banners = [text.index(f"\n# Part {k}: ") for k in (1, 2, 3)]
    assert banners == sorted(banners)
    assert banners[0] < text.index("You can stop here") < banners[1]
    assert all(f"Part {k}," in vae.__doc__ for k in (1, 2, 3))
    assert max(len(line) for line in text.splitlines()) <= 100
