"""Tests for vae.py. Each checks the code against something independent of it: a
hand-made image, torch.distributions, an analytic answer. Run: python -m pytest -q"""
import json
import math
import os
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
REAL = np.load(HERE / "results" / "real_reference.npz")["images"]


def tiny_h5(path, n=160, seed=0):
    vae.write_h5(path, [vae.make_synthetic_channels(n, seed=seed)])
    return path


def run_main(argv, capsys):
    """main(argv) -> (exit code, stdout, stderr)"""
    code = 0
    try:
        vae.main([str(a) for a in argv])
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


# ----------------------------------------------------------------------------- the file itself

def test_reading_map_matches_the_section_rules():
    # the docstring's map lists each section's first and last line; the sections are the
    # "# ----- name" rules. Every rule must be in the map with its true span, in order.
    lines = (HERE / "vae.py").read_text().splitlines()
    rules = [(i + 1, l.split(" ", 2)[2]) for i, l in enumerate(lines) if l.startswith("# " + "-" * 20)]
    want = [(a, (rules[k + 1][0] - 1) if k + 1 < len(rules) else len(lines), name)
            for k, (a, name) in enumerate(rules)]
    doc = vae.__doc__.split("Reading map")[1]
    got = []
    for line in doc.splitlines()[2:]:
        if line.strip():
            span, rest = line.split(None, 1)
            a, b = map(int, span.split("-"))
            got.append((a, b, rest.split("  ")[0].strip()))
    assert got == want


# ----------------------------------------------------------------------------- data

def test_synthetic_layout_and_determinism():
    a = vae.make_synthetic_channels(40, seed=3)
    assert a.dtype == np.uint8 and a.shape == (40, 128, 128, 1)
    assert set(np.unique(a)) == {0, 1}
    assert np.array_equal(a, vae.make_synthetic_channels(40, seed=3))
    assert not np.array_equal(a, vae.make_synthetic_channels(40, seed=4))
    assert vae.make_synthetic_channels(5, size=64).shape == (5, 64, 64, 1)
    # chunking is invisible: the same images whatever the chunk size
    assert np.array_equal(np.concatenate(list(vae.synthetic_chunks(40, seed=3, chunk=7))), a)


def test_synthetic_statistics_inside_real_range():
    real = vae.image_statistics(torch.from_numpy(REAL[..., 0]))
    synth = vae.image_statistics(torch.from_numpy(vae.make_synthetic_channels(2000, seed=1)[..., 0]))
    for key in ("proportion", "width_p50"):
        lo, hi = np.nanmin(real[key]), np.nanmax(real[key])
        assert lo <= np.nanmean(synth[key]) <= hi, key
    # the real file's mean proportion is 0.21 +- 0.06 (measured on 23 re-digitized real images)
    assert 0.17 < synth["proportion"].mean() < 0.25


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


# ----------------------------------------------------------------------------- models and loss

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


def test_fullyconv_has_no_dense_layer():
    for size in (64, 128):
        model = vae.build_model("fullyconv", size)
        assert not any(isinstance(m, nn.Linear) for m in model.modules())
        # nor a convolution whose kernel spans its whole input (a dense layer in disguise):
        # the smallest map is size/16 wide and every kernel there is 3x3 with padding
        assert model.latent_shape[1] > 1
        bigger = model.decode(torch.randn(1, model.latent_shape[0], 6, 6))   # any grid works
        assert bigger.shape == (1, 1, 96, 96)
    assert any(isinstance(m, nn.Linear) for m in vae.build_model("dense").modules())


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


def test_monte_carlo_kl_of_an_untrained_flow_matches_the_closed_form():
    # an untrained flow prior is exactly N(0, I), so the Monte Carlo KL that neg_elbo uses
    # with a flow must average to the closed-form Gaussian KL (and be unbiased for it)
    torch.manual_seed(0)
    model = vae.build_model("dense", 64, latent_dim=6, prior="flow", **TINY).eval()
    x = torch.from_numpy(vae.make_synthetic_channels(3, size=64)).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        mu, logvar = model.encode(x)
        want = vae.gaussian_kl(mu, logvar).mean().item()
        got = sum(vae.neg_elbo(model, x)[2].item() for _ in range(400)) / 400
        flat = vae.build_model("dense", 64, latent_dim=6, **TINY).eval()
        flat.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("prior.")})
        assert vae.neg_elbo(flat, x)[2].item() == pytest.approx(want, rel=1e-6)
    assert got == pytest.approx(want, abs=0.1)   # sd of one estimate ~ sqrt(d/2) = 1.7 nats / sqrt(1200)


def test_bernoulli_nll_matches_torch_distributions():
    logits, x = torch.randn(4, 1, 8, 8), (torch.rand(4, 1, 8, 8) > 0.5).float()
    want = -torch.distributions.Bernoulli(logits=logits).log_prob(x).sum((1, 2, 3))
    assert torch.allclose(vae.bernoulli_nll(logits, x), want, atol=1e-4)


def test_iwae_bound():
    torch.manual_seed(0)
    model = vae.build_model("dense", 64, latent_dim=4, **TINY).eval()
    x = torch.from_numpy(vae.make_synthetic_channels(4, size=64)).permute(0, 3, 1, 2).float()
    # K = 1 is the ELBO in expectation: average many single-sample estimates
    torch.manual_seed(1)
    k1 = torch.stack([vae.iwae_bound(model, x, 1) for _ in range(200)]).mean(0)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        elbos = torch.stack([-vae.bernoulli_nll(model.decode(vae.reparameterize(mu, logvar)), x)
                             - vae.gaussian_kl(mu, logvar) for _ in range(200)]).mean(0)
    assert torch.allclose(k1, elbos, rtol=2e-3)
    # more importance samples never loosen the bound (Burda et al., theorem 1)
    k50 = torch.stack([vae.iwae_bound(model, x, 50) for _ in range(10)]).mean(0)
    assert (k50 >= k1 - 1e-3 * k1.abs()).all()


# ----------------------------------------------------------------------------- learned prior

def perturbed_flow(arch, scale=0.02, **kwargs):
    """A VAE with a flow prior whose weights are moved off the identity (an untrained flow
    is the identity map on N(0, I), which would make the tests below trivial)."""
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
        u, _ = model.prior.inverse(z)
        assert (u - z).abs().max() > 0.05                 # the flow really moves points
        torch.testing.assert_close(model.prior(u), z, rtol=0, atol=1e-5)     # f(f^-1(z)) = z
        u2 = torch.randn(16, *model.latent_shape)
        torch.testing.assert_close(model.prior.inverse(model.prior(u2))[0], u2, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch, kwargs", [("dense", dict(latent_dim=4)), ("fullyconv", dict(latent_channels=2))])
def test_flow_log_determinant_matches_autograd_jacobian(arch, kwargs):
    # a tiny flow in float64: log|det du/dz| from the code against slogdet of the full
    # Jacobian that autograd computes by brute force
    model = perturbed_flow(arch, scale=0.1, **kwargs).double()
    if arch == "fullyconv":
        model.prior.steps = model.prior.steps[:3]
    for seed in range(3):
        z = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        _, logdet = model.prior.inverse(z)
        jac = torch.autograd.functional.jacobian(lambda v: model.prior.inverse(v.view_as(z))[0].flatten(), z.flatten())
        sign, want = torch.linalg.slogdet(jac)
        assert sign != 0 and logdet.item() == pytest.approx(want.item(), abs=1e-8)
    # an untrained flow is a rotation (orthogonal mixes, zero couplings), so its density is
    # exactly N(0, I); the mixes are orthogonal to float32 precision, hence atol 1e-5
    plain = vae.build_model(arch, 64, prior="flow", **TINY, **kwargs).double()
    z = torch.randn(5, *plain.latent_shape, dtype=torch.float64)
    want = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(plain.prior.log_prob(z), want, rtol=0, atol=1e-5)


def test_fullyconv_flow_has_no_linear_and_runs_on_two_grids():
    model = perturbed_flow("fullyconv")
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    for grid in ((4, 4), (8, 8), (3, 5)):
        z = vae.sample_latents(model, 2, grid=grid)
        assert z.shape == (2, model.latent_shape[0], *grid)
        u, logdet = model.prior.inverse(z)
        torch.testing.assert_close(model.prior(u), z, rtol=0, atol=1e-5)
        assert model.decode(z).shape == (2, 1, 16 * grid[0], 16 * grid[1])
    assert any(isinstance(m, nn.Linear) for m in perturbed_flow("dense").prior.modules())


@pytest.mark.parametrize("arch", ["dense", "fullyconv"])
def test_flow_model_reloads_with_the_same_samples(tmp_path, arch):
    model = perturbed_flow(arch)
    vae.save_model(model, tmp_path / "m.pt")
    again = vae.load_model(tmp_path / "m.pt")
    assert again.prior is not None and vae.model_config(again)["prior"] == "flow"
    a = vae.sample_latents(model, 8, torch.Generator().manual_seed(3))
    b = vae.sample_latents(again, 8, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)          # same seed, same samples
    assert not torch.allclose(a, vae.sample_latents(again, 8, torch.Generator().manual_seed(4)))


def test_sample_latents_falls_back_to_standard_normal():
    model = vae.build_model("dense", 64, **TINY)
    assert model.prior is None
    z = vae.sample_latents(model, 4000, torch.Generator().manual_seed(0))
    want = torch.randn(4000, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, want)                       # exactly u: no flow in between
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01


def test_fitted_flow_approaches_the_entropy_of_a_banana():
    # 2-d codes on a thin curved banana, z2 = z1^2 / 2 - 1 + noise: N(0, I) fits them badly.
    # No density can beat the true one on average, so the held-out -log p(z) of the fitted
    # flow must fall between the banana's analytic entropy and N(0, I)'s cross-entropy.
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4000, generator=g)
    mu = torch.stack([t, 0.5 * t ** 2 - 1 + 0.1 * torch.randn(4000, generator=g)], 1)
    logvar = torch.full_like(mu, math.log(1e-4))          # posterior sd 0.01 on top
    torch.manual_seed(0)
    prior = vae.FlowPrior((2,), hidden=64)              # the dense flow, narrower
    history = vae.fit_prior(prior, (mu[:3600], logvar[:3600]), (mu[3600:], logvar[3600:]),
                            torch.device("cpu"), epochs=15, batch_size=200, lr=5e-3, log=lambda s: None)
    # entropy: N(0, 1 + 1e-4) for z1, then N(., 0.01 + 1e-4) for z2 given z1
    entropy = 0.5 * math.log(2 * math.pi * math.e * (1 + 1e-4)) + 0.5 * math.log(2 * math.pi * math.e * 0.0101)
    gauss = 0.5 * (1 + 1e-4) + 0.5 * (0.5 + 0.25 + 0.0101) + math.log(2 * math.pi)   # E[-log N(z)]
    best = min(h["val_nll"] for h in history)
    assert entropy - 0.1 < best < entropy + 0.4 < gauss - 1.5, (entropy, best, gauss)


# ----------------------------------------------------------------------------- metrics

def test_variogram_of_stripes():
    # vertical stripes of period 2: along x, gamma = 1/2 at odd lags and 0 at even lags;
    # along y nothing changes, so gamma = 0
    m = torch.zeros(1, 8, 8, dtype=torch.bool)
    m[..., ::2] = True
    assert torch.allclose(vae.variogram(m, "x"), torch.tensor([0.5, 0, 0.5, 0]))
    assert torch.allclose(vae.variogram(m, "y"), torch.zeros(4))


def test_connected_components_and_connectivity_of_two_bars():
    m = torch.zeros(1, 8, 8, dtype=torch.bool)
    m[0, 1, 0:8] = True                      # two horizontal bars, not touching
    m[0, 5, 0:8] = True
    lab = vae.connected_components(m)
    assert len(torch.unique(lab[m])) == 2
    # along x every channel pair is inside one bar -> 1; along y pairs at lag 4 are in different bars -> 0
    assert torch.allclose(vae.connectivity(m, "x"), torch.ones(4))
    assert vae.connectivity(m, "y")[3] == 0
    # a U shape is one piece; a diagonal pair of pixels is two (4-connectivity)
    u = torch.zeros(1, 5, 5, dtype=torch.bool)
    u[0, :, 0] = u[0, :, 4] = u[0, 4, :] = True
    assert len(torch.unique(vae.connected_components(u)[u])) == 1
    d = torch.tensor([[[1, 0], [0, 1]]], dtype=torch.bool)
    assert len(torch.unique(vae.connected_components(d)[d])) == 2
    assert not vae.connected_components(torch.zeros(2, 4, 4, dtype=torch.bool)).any()   # all background


def test_pieces_spanning_and_widths():
    m = torch.zeros(1, 10, 10, dtype=torch.bool)
    m[0, :, 2:5] = True           # spans top to bottom, 3 px wide
    m[0, 3:6, 7:9] = True         # an island, 2 px wide
    lab, owner, top, bottom, _ = vae.piece_table(m)
    assert len(owner) == 2 and int((top & bottom).sum()) == 1
    widths, _ = vae.run_widths(m)
    assert sorted(widths.tolist()) == [2] * 3 + [3] * 10


def test_jensen_shannon_and_wasserstein():
    p = vae.pattern_histogram(torch.rand(4, 16, 16) > 0.5)
    assert vae.jensen_shannon(p, p) == pytest.approx(0, abs=1e-12)
    a, b = torch.zeros(512, dtype=torch.float64), torch.zeros(512, dtype=torch.float64)
    a[0], b[1] = 1, 1
    assert vae.jensen_shannon(a, b) == pytest.approx(1.0)          # disjoint: 1 bit
    assert vae.wasserstein1([0, 0, 1], [0, 0, 1]) == 0
    assert vae.wasserstein1([0, 1], [2, 3]) == pytest.approx(2.0)   # a shift by 2
    assert vae.wasserstein1([0], [0, 1]) == pytest.approx(0.5)


def test_pattern_histogram_of_a_constant_image():
    p = vae.pattern_histogram(torch.ones(1, 5, 5, dtype=torch.bool))
    assert p[511] == 1 and p.sum() == pytest.approx(1)


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


def test_realism_scores_are_zero_for_identical_sets():
    x = torch.from_numpy(vae.make_synthetic_channels(20, size=64)).permute(0, 3, 1, 2)
    scores = vae.realism_scores(x, x)
    for key, value in scores.items():
        if not key.endswith("_mean"):
            assert value == pytest.approx(0, abs=1e-9), key


# ----------------------------------------------------------------------------- conditioning (ES-MDA)

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


# ----------------------------------------------------------------------------- training

def tiny_args(tmp_path, *extra):
    return vae.parse_args(["--arch", "dense", "--epochs", "2", "--batch-size", "16",
                           "--widths", "8,16,16,16", "--latent-dim", "8", "--warmup", "0.5",
                           "--lr", "2e-3", "--out", str(tmp_path / "out"), *extra])


def test_training_lowers_validation_loss(tmp_path):
    x = torch.from_numpy(vae.make_synthetic_channels(640, size=64)).permute(0, 3, 1, 2).contiguous()
    train_x, val_x = vae.split(x, 0.2, 0)
    args = tiny_args(tmp_path, "--epochs", "4", "--lr", "3e-3", "--mmd", "0")
    vae.set_seed(0)
    model = vae.build_model("dense", 64, latent_dim=8, **TINY)
    before = vae.validate(model, val_x, torch.device("cpu"), 1.0)[0]
    history = vae.train(model, train_x, val_x, args, torch.device("cpu"), tmp_path / "ck.pt", log=lambda s: None)
    # the best model that ignores the image predicts every pixel with the mean proportion p;
    # its loss is the Bernoulli entropy of p per pixel. A VAE that learned anything beats it.
    p = train_x.float().mean().item()
    constant = -(p * math.log(p) + (1 - p) * math.log(1 - p)) * train_x[0].numel()
    assert history["val_loss"][-1] < 0.9 * constant < before
    assert history["val_loss"][-1] < history["val_loss"][0]


def test_rotate180_keeps_the_lean_and_turns_only_where_asked():
    # a hand-made channel leaning from top-right to bottom-left, plus a blob in one corner
    img = np.zeros((32, 32), np.uint8)
    for y in range(32):
        img[y, 20 - y // 3: 24 - y // 3] = 1
    img[0:3, 0:3] = 1
    x = torch.from_numpy(np.stack([img, img]))[:, None].float()            # (2, 1, 32, 32)
    out = vae.rotate180(x, torch.tensor([True, False]))
    assert np.array_equal(out[0, 0].numpy(), np.rot90(img, 2))              # numpy's half-turn
    assert torch.equal(out[1], x[1])                                        # untouched
    lean = vae.image_statistics(out[:, 0].bool())["lean"]
    # a half-turn keeps the lean (a mirror flip would negate it); the blob is too short to count
    assert lean[0] == pytest.approx(lean[1]) and lean[1] > 10


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


def test_resume_equals_uninterrupted(tmp_path):
    x = torch.from_numpy(vae.make_synthetic_channels(160, size=64)).permute(0, 3, 1, 2).contiguous()
    train_x, val_x = vae.split(x, 0.2, 0)
    # with augmentation on, so the random half-turns must repeat exactly too, and with the
    # default joint flow prior, whose weights and optimizer state must come back as well
    args, cpu = tiny_args(tmp_path, "--augment", "rot180"), torch.device("cpu")

    vae.set_seed(0)
    whole = vae.train(vae.build_model("dense", 64, latent_dim=8, prior="flow", **TINY), train_x, val_x, args, cpu,
                      tmp_path / "a.pt", log=lambda s: None)

    def interrupt_after_first_epoch(message):
        if message.startswith("epoch 1 done"):
            os.kill(os.getpid(), signal.SIGINT)       # as if the user pressed Ctrl-C
    vae.set_seed(0)
    with pytest.raises(vae.Interrupted):
        vae.train(vae.build_model("dense", 64, latent_dim=8, prior="flow", **TINY), train_x, val_x, args, cpu,
                  tmp_path / "b.pt", log=interrupt_after_first_epoch)
    ckpt = vae.load_checkpoint(tmp_path / "b.pt", args)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 1)      # stopped one step into epoch 2
    vae.set_seed(123)                                    # the checkpoint's RNG state must win
    resumed = vae.train(vae.build_model("dense", 64, latent_dim=8, prior="flow", **TINY), train_x, val_x, args, cpu,
                        tmp_path / "b.pt", resume=ckpt, log=lambda s: None)
    for key in ("train_rec", "train_kl", "val_rec", "val_kl"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-6), key


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    x = torch.from_numpy(vae.make_synthetic_channels(96, size=64)).permute(0, 3, 1, 2).contiguous()
    args = tiny_args(tmp_path, "--epochs", "1")
    model = vae.build_model("dense", 64, latent_dim=8, **TINY)
    with torch.no_grad():
        model.mu.weight.fill_(float("nan"))
    with pytest.raises(vae.TrainingDiverged, match="lower --lr"):
        vae.train(model, x[:64], x[64:], args, torch.device("cpu"), tmp_path / "ck.pt", log=lambda s: None)


# ----------------------------------------------------------------------------- bad input (issue: robustness)

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


def test_missing_key_lists_keys(tmp_path, capsys):
    with h5py.File(tmp_path / "k.h5", "w") as f:
        f.create_dataset("images", data=np.zeros((4, 128, 128), np.uint8))
    code, _, err = run_main(["--arch", "dense", "--data", tmp_path / "k.h5", "--out", tmp_path / "o"], capsys)
    assert_clean_error(code, err, "no dataset 'train_images'", "['images']")


@pytest.mark.parametrize("shape", [(4, 64, 64), (4, 3, 128, 128), (4, 128, 128, 3)])
def test_wrong_shape(tmp_path, capsys, shape):
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f.create_dataset("train_images", data=np.zeros(shape, np.uint8))
    code, _, err = run_main(["--arch", "dense", "--data", tmp_path / "s.h5", "--out", tmp_path / "o"], capsys)
    assert_clean_error(code, err, str(shape), "expected (N, 128, 128, 1) or (N, 128, 128)")


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
    (["--val-fraction", "1.5"], "argument --val-fraction"),
    (["--arch", "mlp"], "argument --arch"),
    (["--latent-dim", "1"], "argument --prior flow"),
    (["--arch", "fullyconv", "--latent-channels", "1", "--prior", "posthoc"], "argument --prior posthoc"),
    (["--prior", "normal"], "argument --prior"),
    (["--wells", "0"], "argument --wells"),
])
def test_bad_flags_are_argparse_errors(capsys, argv, fragment):
    if "--arch" not in argv:
        argv = ["--arch", "dense"] + argv
    code, _, err = run_main(argv, capsys)
    assert code == 2 and fragment in err and "Traceback" not in err


def test_resume_with_bad_checkpoints(tmp_path, capsys):
    data = tiny_h5(tmp_path / "d.h5")
    base = ["--data", data, "--out", tmp_path / "o", "--widths", "8,16,16,16", "--epochs", "1"]
    code, _, err = run_main(["--arch", "dense", *base, "--resume", tmp_path / "missing.pt"], capsys)
    assert_clean_error(code, err, "missing.pt", "checkpoint not found")
    (tmp_path / "junk.pt").write_bytes(b"\x00not a checkpoint")
    code, _, err = run_main(["--arch", "dense", *base, "--resume", tmp_path / "junk.pt"], capsys)
    assert_clean_error(code, err, "junk.pt", "not a readable checkpoint")
    # a real checkpoint of the other arch
    code, _, _ = run_main(["--arch", "fullyconv", *base, "--batch-size", "32", "--eval-n", "8", "--iwae-k", "2"], capsys)
    assert code == 0 and (tmp_path / "o" / "checkpoint.pt").is_file()
    code, _, err = run_main(["--arch", "dense", *base, "--resume"], capsys)
    assert_clean_error(code, err, "checkpoint has arch fullyconv", "asks for dense")


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


def test_unwritable_out_fails_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    data = tiny_h5(tmp_path / "d.h5")
    code, out, err = run_main(["--arch", "dense", "--data", data, "--out", tmp_path / "file" / "sub"], capsys)
    assert_clean_error(code, err, "cannot write results")
    assert "epoch" not in out


def default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(argv, cwd):
    # A shell starts background jobs with SIGINT ignored, and a child inherits that; Python
    # then installs no KeyboardInterrupt handler, and the SIGINT below would do nothing. So
    # the child starts with the default disposition, as it would from a terminal.
    return subprocess.Popen([sys.executable, str(HERE / "vae.py"), *map(str, argv)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)


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
    proc = start(["--arch", "dense", "--data", data, "--out", out, "--epochs", "500",
                  "--batch-size", "8", "--widths", "8,16,16,16"], tmp_path)
    # the line train() prints once its Ctrl-C handler is in place
    code, stdout, stderr = interrupt_after(proc, "Ctrl-C saves a checkpoint", 1.0)
    assert_one_line_130(code, stderr)
    assert "--resume" in stderr
    assert (out / "checkpoint.pt").is_file() and (out / "samples.png").is_file()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] * 1000 + ckpt["step"] > 0
    assert not list(out.glob("*.tmp"))


LOST_CTRL_C = """
import sys, time
sys.path.insert(0, {here!r})
import vae
if {hooks}:
    vae.install_interrupt_hooks()
class Finalized:
    def __del__(self):
        raise KeyboardInterrupt     # as if Ctrl-C landed in a finalizer: Python cannot raise it here
try:
    Finalized()                     # dropped at once, so __del__ runs now
    t = time.time()
    while time.time() - t < 3:
        pass
    print("lost")
except KeyboardInterrupt:
    print("raised again")
"""


def test_ctrl_c_lost_in_a_finalizer_is_raised_again():
    # Seen in a scripted SIGINT during data generation: the KeyboardInterrupt landed in an
    # h5py weakref callback, Python printed "Exception ignored" and the run went on training.
    for hooks, want in ((False, "lost"), (True, "raised again")):
        script = LOST_CTRL_C.format(here=str(HERE), hooks=hooks)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert done.stdout.strip() == want, done.stderr
        assert ("Exception ignored" in done.stderr) == (not hooks)


def test_ctrl_c_during_data_generation_leaves_no_partial_file(tmp_path):
    # no data/ here, so vae.py starts writing the 50,000-image synthetic cache (about 20 s)
    proc = start(["--arch", "dense", "--out", tmp_path / "o"], tmp_path)
    code, stdout, stderr = interrupt_after(proc, "generating", 1.0)
    assert_one_line_130(code, stderr)
    assert "half-written" in stderr
    assert list((tmp_path / "data").iterdir()) == []        # neither the .h5 nor its .tmp


# ----------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("arch", ["dense", "fullyconv"])
def test_main_end_to_end_evaluate_and_condition(tmp_path, capsys, arch):
    data = tiny_h5(tmp_path / "d.h5", n=200)
    out = tmp_path / "res" / arch
    argv = ["--arch", arch, "--data", data, "--out", out, "--epochs", "1", "--batch-size", "16",
            "--widths", "8,16,16,16", "--eval-n", "10", "--iwae-k", "3", "--prior-epochs", "2"]
    code, stdout, err = run_main(argv, capsys)
    assert code == 0, err
    for name in ("samples.png", "interpolation.png", "reconstructions.png", "losses.png",
                 "history.csv", "config.json", "model.pt", "metrics.json"):
        assert (out / name).is_file(), name
    assert (out / "large_field.png").is_file() == (arch == "fullyconv")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prior"] == "flow" and set(metrics["samples"]) == {"flow", "posterior"}
    assert metrics["neg_iwae"] <= metrics["neg_elbo"] + 1.0
    assert all(0 <= s["blur"] <= 0.5 for s in metrics["samples"].values())
    assert ("large_field" in metrics) == (arch == "fullyconv")
    assert vae.load_model(out / "model.pt").prior is not None
    assert "flow prior" in (tmp_path / "res" / "comparison.md").read_text()
    (out / "samples.png").unlink()
    code, stdout, err = run_main(argv + ["--evaluate"], capsys)
    assert code == 0, err
    assert (out / "samples.png").is_file() and "epoch 1/" not in stdout
    code, stdout, err = run_main(argv + ["--condition", "--wells", "8", "--assimilations", "3"], capsys)
    assert code == 0, err
    cond = json.loads((out / "conditioning.json").read_text())
    assert cond["prior"] == "flow" and (out / "conditioning.png").is_file()
    assert len(cond["cases"]) == 5 and cond["wells"] == 8 and cond["inflation"] == [3.0, 3.0, 3.0]
    assert 0 <= cond["posterior_wells_honoured"]["worst"] <= cond["posterior_wells_honoured"]["mean"] <= 1
    code, _, err = run_main(argv + ["--condition", "--wells", "5000"], capsys)
    assert_clean_error(code, err, "--wells 5000", "only 4096 pixels")
    code, _, err = run_main(argv[:4] + ["--out", tmp_path / "empty", "--condition"], capsys)
    assert_clean_error(code, err, "model.pt", "file not found")


@pytest.mark.parametrize("prior", ["gaussian", "posthoc"])
def test_other_priors_train_and_land_in_their_own_folder(tmp_path, capsys, monkeypatch, prior):
    monkeypatch.chdir(tmp_path)                         # the default --out is relative: results/...
    data = tiny_h5(tmp_path / "d.h5", n=160)
    code, stdout, err = run_main(["--arch", "dense", "--data", data, "--epochs", "1", "--batch-size", "32",
                                  "--widths", "8,16,16,16", "--eval-n", "8", "--iwae-k", "2",
                                  "--prior", prior, "--prior-epochs", "2"], capsys)
    assert code == 0, err
    out = Path("results") / f"dense-{prior}"
    assert (out / "model.pt").is_file() and not Path("results/dense").exists()
    assert ("fitting the flow" in stdout) == (prior == "posthoc")
    model = vae.load_model(out / "model.pt")
    assert (model.prior is not None) == (prior == "posthoc")
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["samples"]) == {"flow" if prior == "posthoc" else "gaussian", "posterior"}
    if prior == "posthoc":
        history = json.loads((out / "config.json").read_text())["prior_history"]
        assert [h["epoch"] for h in history] == [1, 2]


def test_same_seed_same_model_other_seed_other_model(tmp_path, capsys):
    data = tiny_h5(tmp_path / "d.h5", n=160)
    weights = []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        code, _, err = run_main(["--arch", "dense", "--data", data, "--out", tmp_path / run, "--epochs", "1",
                                 "--batch-size", "32", "--widths", "8,16,16,16", "--seed", seed,
                                 "--eval-n", "4", "--iwae-k", "2"], capsys)
        assert code == 0, err
        weights.append(torch.load(tmp_path / run / "model.pt", weights_only=True)["state_dict"]["mu.weight"])
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_benchmark_flag_writes_json(tmp_path, capsys):
    code, out, err = run_main(["--arch", "fullyconv", "--benchmark", "--batch-size", "8", "--widths", "8,16,16,16",
                               "--bench-seconds", "0.2", "--out", tmp_path], capsys)
    assert code == 0, err
    capability = torch.backends.cpu.get_cpu_capability().lower()
    saved = json.loads((tmp_path / "benchmark.json").read_text())[f"fullyconv_cpu_{capability}"]
    for key in ("train_img_per_s", "sample_img_per_s", "forward_flops_per_image", "train_gflops_per_s",
                "matmul_peak_gflops_per_s", "fraction_of_peak", "device", "torch"):
        assert key in saved, key
    assert saved["train_img_per_s"] > 0 and 0 < saved["fraction_of_peak"]
