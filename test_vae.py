"""Tests for vae.py against independent truths (hand-made images, torch.distributions, autograd,
analytic answers): Part 1's and Part 2's lessons in the file's order, then the metrics, Ctrl-C,
one end-to-end run per command, and bad input. Run: python -m pytest -q test_vae.py"""
import contextlib
import io
import math
import os
import pickle
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
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

import vae

HERE = Path(__file__).resolve().parent
TINY = dict(widths=(8, 16, 16, 16))         # a small trunk keeps the tests fast
CPU = torch.device("cpu")


def images(n, size=64, seed=0):                     # as the model sees them: (n, 1, size, size)
    return torch.from_numpy(vae.make_synthetic_channels(n, size, seed)).permute(0, 3, 1, 2).contiguous()


def tiny_h5(path, n=160):
    vae.write_h5(path, [vae.make_synthetic_channels(n)])
    return path


def learned_model(arch, **kwargs):
    """A small VAE with an (untrained) learned prior of Part 2."""
    torch.manual_seed(0)
    model = vae.build_model(arch, 64, **{**TINY, **kwargs}).eval()
    model.prior = vae.LearnedPrior(model.latent_shape, hidden=16, depth=2, steps=4, guidance=1.5)
    return model


def run_main(argv, capsys):
    """main(argv) on the CPU -> (exit code, stdout, stderr)"""
    code = 0
    try:
        vae.main([str(a) for a in argv] + ([] if "--device" in argv else ["--device", "cpu"]))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


class EmulatedCuda(TorchFunctionMode):
    """A GPU's rules on a machine without one, with real numbers. Inside, device "cuda" exists:
    its tensors are CPU tensors listed in on_gpu, and every torch call passes through
    __torch_function__, which does what CUDA does: factories with device="cuda", .to("cuda")
    and .cuda() make them (a move copies); .cpu() and .to("cpu") copy back; an op that mixes
    one with a CPU tensor (other than a 0-d scalar, or a CPU index into it) raises, and so
    do .numpy() and a CPU generator drawing onto the GPU. moved_in: the bytes of each move to it."""

    def __init__(self):
        super().__init__()
        self.on_gpu, self.moved_in = WeakIdKeyDictionary(), []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs, name, gpu = kwargs or {}, getattr(func, "__name__", ""), self.on_gpu
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func == torch.Tensor.device.__get__:
            return torch.device("cuda", 0) if args[0] in gpu else torch.device("cpu")
        if name in ("numpy", "__array__") and args[0] in gpu:
            raise TypeError("can't convert cuda:0 device type tensor to numpy")
        asked = name if name in ("cuda", "cpu") else None            # None: the inputs' device
        for d in [kwargs.get("device")] + (list(args[1:]) if name == "to" else []):
            if isinstance(d, (str, torch.device)):
                asked = torch.device(d).type
            elif isinstance(d, torch.Tensor):                         # .to(other)
                asked = "cuda" if d in gpu else "cpu"
        if asked == "cuda":
            if any(isinstance(g, torch.Generator) for g in tree_leaves((args, kwargs))):
                raise RuntimeError("Expected a 'cuda' device type for generator")
            kwargs = {**kwargs, **({"device": "cpu"} if "device" in kwargs else {})}
            args = [a if name == "cuda" or not isinstance(a, (str, torch.device)) else "cpu"
                    for a in args]
        on = [t for t in tensors if t in gpu]
        index = tree_leaves(args[1:2]) if name in ("__getitem__", "__setitem__") else []
        if asked is None and on and name not in ("copy_", "__set__", "_has_compatible_shallow_copy_type"):
            for t in tensors:
                if t not in gpu and t.dim() > 0 and not (args[0] in gpu and any(t is i for i in index)):
                    raise RuntimeError(f"Expected all tensors to be on the same device, but found at "
                                       f"least two devices, cuda:0 and cpu! ({name})")
        out = func(*args, **kwargs)
        if name in ("to", "cuda", "cpu") and out is args[0] and (out in gpu) != (asked == "cuda"):
            out = out.clone()                              # a move between devices copies
            self.moved_in += [out.nbytes] if asked == "cuda" else []
        if func == torch.Tensor.data.__set__ and args[1] in gpu:   # Module.to("cuda")
            gpu[args[0]] = True
        elif asked == "cuda" or (asked is None and on):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    gpu[t] = True
        return out


def assert_clean_error(code, err, *fragments, lines=1):
    """Exit 2, no traceback; our own errors are one line (argparse's add its usage)."""
    assert code == 2 and "Traceback" not in err, err
    if lines:
        assert len(err.strip().splitlines()) == lines, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# ============================================================================ Part 1: the VAE

def test_loss_terms_and_the_reparameterization_match_torch_distributions():
    for shape in ((5, 7), (2, 3, 4, 4)):               # a vector latent and a spatial one
        mu, logvar = torch.randn(shape), torch.randn(shape)
        q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
        want = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0))
        torch.testing.assert_close(vae.gaussian_kl(mu, logvar), want.flatten(1).sum(1))
    logits, x = torch.randn(4, 1, 8, 8), (torch.rand(4, 1, 8, 8) > 0.5).float()
    want = -torch.distributions.Bernoulli(logits=logits).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(vae.bernoulli_nll(logits, x), want)
    # the reparameterization samples q(z|x) = N(mu, sigma^2), with gradients to mu
    mu = torch.tensor([1.0, -2.0], requires_grad=True)
    logvar = torch.tensor([0.0, math.log(0.25)], requires_grad=True)
    z = vae.reparameterize(mu.expand(20000, 2), logvar.expand(20000, 2), torch.Generator().manual_seed(0))
    eps = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, mu + eps * torch.tensor([1.0, 0.5]))
    assert torch.allclose(z.mean(0), torch.tensor([1.0, -2.0]), atol=0.03)   # sd / sqrt(n) < 0.01
    assert torch.allclose(z.std(0), torch.tensor([1.0, 0.5]), atol=0.03)
    z.sum().backward()
    assert torch.allclose(mu.grad, torch.full((2,), 20000.0))                 # dz/dmu = 1


@pytest.mark.parametrize("layout", ["nhwc", "nhw"])
def test_majority_downsampling_and_the_loader(tmp_path, layout):
    # blocks with 3, 1, 2 (top-left on) and 2 (top-left off) channel pixels
    img = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0], [1, 0, 0, 1], [0, 1, 0, 1]], dtype=torch.uint8)
    assert vae.downsample_majority(img.view(1, 1, 4, 4)).view(2, 2).tolist() == [[1, 0], [1, 0]]
    img = np.zeros((2, 128, 128), np.uint8)
    img[0, :, 10:14] = 1            # a 4-px vertical band -> columns 5 and 6 at 64x64
    img[1, 40:42, :] = 1            # a 2-px horizontal band -> row 20 at 64x64
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("train_images", data=img[..., None] if layout == "nhwc" else img)
    assert torch.equal(vae.load_images(tmp_path / "x.h5", size=128)[:, 0], torch.from_numpy(img))
    want = np.zeros((2, 64, 64), np.uint8)
    want[0, :, 5:7] = 1
    want[1, 20, :] = 1
    assert torch.equal(vae.load_images(tmp_path / "x.h5", size=64)[:, 0], torch.from_numpy(want))


def test_shapes_and_no_dense_layer_in_fullyconv_not_even_in_disguise():
    for arch, size in ((a, s) for a in vae.ARCHS for s in (64, 128)):
        model = vae.build_model(arch, size)
        mu, logvar = model.encode(torch.zeros(3, 1, size, size))
        assert mu.shape == logvar.shape == (3, *model.latent_shape)
        assert model.decode(torch.randn(3, *model.latent_shape)).shape == (3, 1, size, size)
        assert model.latent_shape == ((32,) if arch == "dense" else (8, size // 16, size // 16))
    model = learned_model("fullyconv")                  # the learned prior included
    assert [any(isinstance(m, nn.Linear) for m in learned_model(a).modules()) for a in vae.ARCHS] == [True, False]
    assert model.decode(torch.randn(1, 8, 6, 6)).shape == (1, 1, 96, 96)    # any grid works
    # latent cell (0, 0) of a 128x128 image neither sees nor draws the far half
    model = vae.build_model("fullyconv", 128).eval()
    x = torch.zeros(1, 1, 128, 128, requires_grad=True)
    model.encode(x)[0][:, :, 0, 0].sum().backward()
    z = torch.randn(1, *model.latent_shape)
    moved = z.clone()
    moved[:, :, 0, 0] += 1
    for touched in (x.grad[0, 0] != 0, (model.decode(z) != model.decode(moved))[0, 0]):
        assert touched[:32, :32].any() and not touched[64:].any() and not touched[:, 64:].any()


def test_training_lowers_the_loss_below_the_best_constant_image():
    train_x, val_x = images(576)[:512], images(576)[512:]
    torch.manual_seed(0)
    model = vae.build_model("dense", 64, latent_dim=8, **TINY)
    before = vae.validate(model, val_x, CPU, 1.0)[0]
    history = vae.train(model, train_x, val_x, CPU, 4, 16, 3e-3, warmup=0.5, log=lambda s: None)
    # a model that ignores the image at best predicts every pixel with the mean proportion p:
    # a loss of the Bernoulli entropy of p per pixel. A VAE that learned anything beats it.
    p = train_x.float().mean().item()
    constant = -(p * math.log(p) + (1 - p) * math.log(1 - p)) * train_x[0].numel()
    assert history["val_loss"][-1] < 0.9 * constant < before
    assert len(history["epoch"]) == 4 and history["val_loss"][-1] < history["val_loss"][0]
    kl = []                      # with the KL warm-up (beta from 0), the first epoch's KL grows
    for warmup in (0, 2):
        torch.manual_seed(0)
        model = vae.build_model("dense", 64, latent_dim=8, **TINY)
        kl += vae.train(model, train_x, val_x, CPU, 1, 16, 3e-3, warmup=warmup, log=lambda s: None)["train_kl"]
    assert kl[1] > 1.5 * kl[0], kl
    torch.nn.init.constant_(model.mu.weight, float("nan"))   # a diverged model stops, clearly
    with pytest.raises(FloatingPointError, match="the loss became nan at epoch 1"):
        vae.train(model, train_x, val_x, CPU, 1, 16, log=lambda s: None)


def test_bf16_runs_the_layers_in_bf16_and_keeps_the_loss_within_1_percent():
    model = vae.build_model("fullyconv", 64, **TINY)
    seen = {}
    model.decoder[0][0].register_forward_hook(lambda m, i, o: seen.update(conv=o.dtype))
    model.mu.register_forward_hook(lambda m, i, o: seen.update(head=o.dtype))
    losses = []
    for bf16 in (False, True):                 # a training step at learning rate 0: the loss only
        torch.manual_seed(1)
        losses.append(vae.train_step(model, torch.optim.Adam(model.parameters()), images(16).float(), 1.0, 0.0, bf16))
        assert seen == {k: torch.bfloat16 if bf16 else torch.float32 for k in ("conv", "head")}
    # bf16 keeps 8 mantissa bits (0.4%): each term stays within 1%; the summed cross-entropy,
    # and so the loss, stay fp32
    for a, b in zip(*losses):
        assert a != b and abs(a - b) < 0.01 * abs(a), (a, b)
    assert losses[1][0].dtype == losses[1][1].dtype == torch.float32
    # capped to AVX2 (no AVX-512 BF16, no AMX), bf16 would be emulated: it switches itself off
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code = "import torch, vae; print(vae.bf16_native(torch.device('cpu')))"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=HERE, capture_output=True, text=True)
    assert done.stdout.split() == ["False"], done.stderr


def test_slerp_keeps_the_norm_where_a_straight_line_shrinks_it():
    g = torch.Generator().manual_seed(0)
    u0, u1 = torch.randn(3, 8, 4, 4, generator=g), torch.randn(3, 8, 4, 4, generator=g)
    n0, n1 = u0.flatten(1).norm(dim=1), u1.flatten(1).norm(dim=1)
    path = vae.slerp(u0, u1, 9)                                             # (9, 3, 8, 4, 4)
    torch.testing.assert_close(torch.stack([path[0], path[-1]]), torch.stack([u0, u1]))
    norms = path.flatten(2).norm(dim=2)
    assert (norms >= torch.minimum(n0, n1) - 1e-4).all() and (norms <= torch.maximum(n0, n1) + 1e-4).all()
    assert (((u0 + u1) / 2).flatten(1).norm(dim=1) < 0.85 * torch.minimum(n0, n1)).all()
    arc = vae.slerp(u0, u1 * (n0 / n1).view(-1, 1, 1, 1), 5).flatten(2)   # ends of equal norm:
    torch.testing.assert_close(arc.norm(dim=2), n0.expand(5, 3))            # all points at it,
    cos = (arc[1:] * arc[:-1]).sum(2) / arc[1:].norm(dim=2) / arc[:-1].norm(dim=2)
    torch.testing.assert_close(cos, cos[:1].expand(4, 3))                   # at equal angles
    torch.testing.assert_close(vae.slerp(u0, u0, 3), u0.expand(3, *u0.shape))  # and no 0/0


# ============================================================================ Part 2
class GaussianVelocity(nn.Module):
    """The exact flow-matching velocity for codes N(m, sd^2) per number: z_t is Gaussian with
    mean t m and variance (1 - t)^2 + t^2 sd^2, and E[z1 - z0 | z_t = z] is linear in z."""
    def __init__(self, m, sd):
        super().__init__()
        self.m, self.sd = m, sd

    def forward(self, z, t):
        t = t.view(-1, *[1] * (z.dim() - 1))
        var = (1 - t) ** 2 + t ** 2 * self.sd ** 2
        return self.m + (t * self.sd ** 2 - (1 - t)) / var * (z - t * self.m)


def test_the_prior_ode_carries_noise_to_the_codes_and_back_and_flow_matching_learns_it():
    # for Gaussian codes N(m, sd^2) the exact field carries u to m + sd u; guided by w against
    # the exact field of N(m_r, sd^2), to m_r + w (m - m_r) + sd u (the fields are affine in
    # the mean). The Heun solver must get there within 3% of sd with ODE_STEPS steps, and
    # back; it is second order, so twice the steps cut the error about fourfold
    m, sd, m_r, w = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0]), torch.tensor([0.0, 1.0]), 2.0
    prior = vae.LearnedPrior((2,), hidden=8, depth=1, guidance=w)
    prior.velocity, prior.rough = GaussianVelocity(m, sd), GaussianVelocity(m_r, sd)
    u = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))
    z_true, errors = m_r + w * (m - m_r) + sd * u, []
    for prior.steps in (vae.ODE_STEPS, 2 * vae.ODE_STEPS):
        errors.append(max(((prior.to_z(u) - z_true) / sd).abs().max(),
                          (prior.to_u(z_true) - u).abs().max()))
    assert errors[0] < 0.03 and errors[1] < errors[0] / 3, errors
    # flow matching on codes q(z|x) = N(m, sd^2) (every image the same) learns that map (w = 1:
    # v alone); the logit-normal t trains the ends of the path least, so the spread may be off
    # by ~10%
    torch.manual_seed(0)
    prior = vae.fit_prior(vae.LearnedPrior((2,), hidden=64, depth=2), m.expand(1000, 2),
                          (2 * sd.log()).expand(1000, 2), steps=1000, batch_size=256, lr=1e-2,
                          log=lambda s: None)
    with torch.no_grad():
        z = prior.to_z(u)
    assert ((z - (m + sd * u)).abs().mean(0) < 0.1 * sd).all(), (z - (m + sd * u)).abs().mean(0)
    torch.testing.assert_close(z.std(0), sd, rtol=0.15, atol=0)
    # the fullyconv prior has no dense layer: trained on one grid, it draws on any other
    conv = vae.LearnedPrior((3, 4, 4), hidden=8, depth=1)
    assert conv.to_z(torch.randn(2, 3, 7, 5)).shape == (2, 3, 7, 5)


def test_the_learned_prior_is_what_samples_come_from():
    for arch in vae.ARCHS:
        model = learned_model(arch)
        g = lambda: torch.Generator().manual_seed(3)
        plain = vae.build_model(arch, 64, **TINY).eval()
        with torch.no_grad():
            u = torch.randn(4, *model.latent_shape, generator=g())
            assert (model.prior.to_z(u) - u).abs().max() > 1e-3
            for m, z in ((model, model.prior.to_z(u)), (plain, u)):       # N(0, I): exactly u
                torch.testing.assert_close(vae.draw(m, 4, g()), torch.sigmoid(m.decode(z)))
    # a saved model keeps how it draws (width, depth, ODE steps, w), whatever the defaults become;
    # the committed models load, and say how they draw
    prior = vae.build_from_config(vae.model_config(learned_model("fullyconv"))).prior
    assert (prior.hidden, prior.depth, prior.steps, prior.guidance) == (16, 2, 4, 1.5)
    for arch in vae.ARCHS:
        prior = vae.load_model(HERE / "results" / arch / "model.pt").prior
        assert (prior.hidden, prior.depth, prior.steps, prior.guidance) == \
            (vae.PRIOR_HIDDEN[arch], vae.PRIOR_DEPTH[arch], vae.ODE_STEPS, vae.GUIDANCE)


def test_esmda_recovers_the_analytic_linear_gaussian_posterior():
    # m ~ N(m0, C_M), d = G m + e, e ~ N(0, sd^2 I): the posterior is Gaussian with
    #   mean m0 + K (d_obs - G m0),  cov C_M - K G C_M,  K = C_M G^T (G C_M G^T + C_D)^-1
    m0 = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
    a = torch.tensor([[1.0, 0.3, 0.0], [0.0, 0.8, 0.2], [0.1, 0.0, 0.6]], dtype=torch.float64)
    c_m = a @ a.T                                  # the prior covariance
    G = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]], dtype=torch.float64)
    sd, d_obs = 0.3, torch.tensor([1.2, -0.4], dtype=torch.float64)
    gain = c_m @ G.T @ torch.linalg.inv(G @ c_m @ G.T + sd ** 2 * torch.eye(2, dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    prior = m0 + torch.randn(20_000, 3, generator=g, dtype=torch.float64) @ a.T
    post = vae.esmda(lambda m: m @ G.T, prior, d_obs, sd, n_assimilations=4, generator=g)
    # the ensemble mean's sampling error is sd_post / sqrt(n) < 0.01
    torch.testing.assert_close(post.mean(0), m0 + gain @ (d_obs - G @ m0), rtol=0, atol=0.02)
    torch.testing.assert_close(torch.cov(post.T), c_m - gain @ G @ c_m, rtol=0, atol=0.02)


# ============================================================================ Part 3, resume, Ctrl-C, end to end, bad input

def test_synthetic_data_like_the_real_images_and_body_statistics_by_hand():
    a = vae.make_synthetic_channels(300, seed=1)
    assert a.dtype == np.uint8 and a.shape == (300, 128, 128, 1) and set(np.unique(a)) == {0, 1}
    assert np.array_equal(np.concatenate(list(vae.synthetic_chunks(300, seed=1, chunk=7))), a)
    assert not np.array_equal(a[:5], vae.make_synthetic_channels(5, seed=2))
    real = torch.from_numpy(np.load(HERE / "results" / "real_reference.npz")["images"]).permute(0, 3, 1, 2)
    rs, ss = vae.image_statistics(real), vae.image_statistics(torch.from_numpy(a).permute(0, 3, 1, 2))
    for key in rs:
        assert np.nanmin(rs[key]) <= np.nanmean(ss[key]) <= np.nanmax(rs[key]), key
    s = torch.zeros(1, 9, 9, dtype=torch.bool)     # a serpentine that winds four times: 1 piece
    s[0, ::2, :] = True
    for r in range(1, 9, 2):
        s[0, r, 8 if r % 4 == 1 else 0] = True
    d = torch.tensor([[[1, 0], [0, 1]]], dtype=torch.bool)        # diagonal: two pieces
    assert [len(torch.unique(vae.connected_components(m)[m])) for m in (s, d)] == [1, 2]
    m = torch.zeros(2, 10, 10, dtype=torch.bool)
    m[0, :, 2:5] = True           # spans top to bottom, 3 px wide
    m[0, 3:6, 7:9] = True         # an island, 2 px wide
    m[1, 2:8, 0:4] = True         # touches the left edge: its runs are cut by the frame
    m[1, 2:8, 6:10] = True        # and the right edge
    m[1, 0:2, 5] = True           # touches the top edge only: a piece that does not span
    assert [v.tolist() for v in vae.pieces_and_spanning(m)] == [[2, 3], [1, 0]]
    widths, image = vae.run_widths(m)
    assert sorted(widths.tolist()) == [1] * 2 + [2] * 3 + [3] * 10 and image.tolist().count(1) == 2


def test_realism_scores_against_truths_by_hand_and_by_construction():
    a, b = torch.rand(3, 1, 6, 6) > 0.5, torch.rand(4, 1, 6, 6) > 0.5
    assert torch.equal(vae.hamming(a, b), torch.tensor([[(x != y).sum().item() for y in b] for x in a]).float())
    dist, index = vae.nearest(a[2:], torch.cat([b, a[2:]]), chunk=2)        # found in a later chunk
    assert dist.tolist() == [0] and index.tolist() == [4]
    # memorisation: copies of training images score 0, images twice as far from them as
    # held-out images are score 2
    train = (torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.5).to(torch.uint8)

    def flipped(k):                                     # each training image, k pixels flipped
        x = train.clone().flatten(1)
        x[:, :k] ^= 1
        return x.view_as(train)
    held_px = vae.nearest(flipped(4), train)[0].median().item()
    assert held_px == 4 and vae.memorisation(train, train, held_px) == (0, 0)
    assert vae.memorisation(flipped(8), train, held_px) == (2, 8)
    x = torch.zeros(2, 1, 64, 64, dtype=torch.uint8)
    x[0, ..., 10:14] = 1          # two bars from top to bottom, 4 and 6 px wide; then an empty image
    x[0, ..., 40:46] = 1
    assert vae.counts(x) == pytest.approx({"proportion": 10 / 64 / 2, "pieces": 1, "top-to-bottom channels": 1,
                                           "channel width (median)": 5, "near-empty": 0.5})


def cut_channels(x, rows=3, seed=0):
    """Each image with one channel cut across by a gap of `rows` rows, as a prior's broken
    channel: the run of channel pixels through a random channel pixel, cleared in those rows."""
    x, g = x.clone(), torch.Generator().manual_seed(seed)
    for img in x[:, 0]:
        on = torch.nonzero(img[4:-4 - rows])                     # away from the top and bottom
        r, c = (on[torch.randint(len(on), (1,), generator=g)][0] + torch.tensor([4, 0])).tolist()
        run = vae.horizontal_runs(img[None].bool())[0]
        img[r:r + rows, run[r] == run[r, c]] = 0
    return x


def test_the_two_sample_test_sees_a_3_pixel_gap_and_nothing_in_data_against_data():
    # 1,000 images of one distribution against 1,000 more, each its own layout: 0.5 within
    # the interval; the second thousand with one channel cut by a 3-row gap (about 20 pixels
    # of 4,096 changed): told apart at least 0.9 of the time (the C2ST of earlier versions, a
    # linear head over positions, scored 0.60 on such a gap at 2,000 images)
    a, b = (vae.as_images(vae.make_synthetic_channels(1000, seed=s, distinct=True), 64) for s in (21, 22))
    cut = cut_channels(b)
    assert 15 < (cut != b).sum((1, 2, 3)).float().mean() < 30
    with torch.no_grad():                                    # as evaluate() calls it
        (same, half), (gap, _) = vae.c2st(a, b, CPU), vae.c2st(a, cut, CPU)
    assert abs(same - 0.5) < half + 0.01 and 0.015 < half < 0.025 and gap > 0.9, (same, half, gap)


def test_the_comparison_leaves_out_runs_of_older_versions(tmp_path):
    # results/ may hold a run scored by an older vae.py: its metrics lack the C2ST's interval,
    # or a column (memorisation), or its model.pt does not load (the figure leaves it out: a
    # run that has just saved its own results must not end in an error)
    score = {"c2st": 0.6, "c2st_95": [0.55, 0.65], **dict.fromkeys(vae.SCORES[2:-2], 1.0)}
    new = {"n": 10, "data": "the data", "reference": "held-out images", "code_version": {"git_commit": "abc"},
           "scores": {"learned": score, "data": score}}
    (tmp_path / "dense").mkdir(), (tmp_path / "fullyconv").mkdir()
    vae.write_json(tmp_path / "dense" / "metrics.json", new)
    vae.write_json(tmp_path / "fullyconv" / "metrics.json", {"scores": {"data": {"c2st": 0.5, "pieces": 2.0}}})
    torch.save({"config": {"arch": "dense"}, "state_dict": {}}, tmp_path / "dense" / "model.pt")
    vae.write_comparison(tmp_path, images(10), CPU)
    table = (tmp_path / "comparison.md").read_text()
    assert "| dense: learned | 0.6 | 0.550-0.650 |" in table and "fullyconv" not in table
    assert (tmp_path / "samples_side_by_side.png").is_file()


def test_resume_equals_uninterrupted():
    x, saved, quiet, model = images(160), io.BytesIO(), lambda s: None, lambda: vae.build_model("dense", 64, latent_dim=8, **TINY)
    torch.manual_seed(0)
    whole = vae.train(model(), x[:128], x[128:], CPU, 2, 16, log=quiet)

    def save_then_stop(state):                         # as if Ctrl-C came after epoch 1's save
        torch.save(state, saved)
        raise KeyboardInterrupt
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        vae.train(model(), x[:128], x[128:], CPU, 2, 16, on_epoch=save_then_stop, log=quiet)
    saved.seek(0)
    torch.manual_seed(123)                             # the checkpoint's random state must win
    resumed = vae.train(model(), x[:128], x[128:], CPU, 2, 16, resume=torch.load(saved), log=quiet)
    for key in ("train_rec", "train_kl", "val_rec", "val_kl"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-6), key


def start(argv, cwd, slow_generation=False):
    """vae.main(argv) in a child process with Python's Ctrl-C handler (a shell's background job
    inherits SIGINT ignored); slow_generation: 0.2 s per chunk of synthetic images."""
    script = (f"import sys, time\nsys.path.insert(0, {str(HERE)!r})\nimport vae\n"
              + ("chunks = vae.synthetic_chunks\n"
                 "def slow(*a, **k):\n    for c in chunks(*a, **k):\n        time.sleep(0.2)\n        yield c\n"
                 "vae.synthetic_chunks = slow\n" if slow_generation else "")
              + f"vae.main({[str(a) for a in argv] + ['--device', 'cpu']!r})\n")
    return subprocess.Popen([sys.executable, "-c", script], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def interrupt_after(proc, marker, delay):
    """SIGINT `delay` s after a stdout line with marker -> (exit code, stderr)"""
    for line in proc.stdout:
        if marker in line:
            break
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    return proc.wait(timeout=120), proc.communicate(timeout=120)[1]


def test_ctrl_c_keeps_the_last_checkpoint_leaves_no_half_file_exits_130_and_is_never_lost(tmp_path):
    # in training, after the first epoch's checkpoint and before it (200 steps of 2 images);
    # and while the synthetic file is written
    train = ["--arch", "dense", "--data", tiny_h5(tmp_path / "d.h5", n=400), "--epochs", "500", "--widths", 8, 16, 16, 16]
    runs = ((train + ["--out", tmp_path / "early", "--batch-size", "2"], "parameters", 0.1, False),
            (["--arch", "dense", "--out", tmp_path / "g"], "generating", 0.5, True),
            (train + ["--out", tmp_path / "o", "--batch-size", "8"], "epoch 1 done", 0.5, False))
    procs = [start(argv, tmp_path, slow) for argv, _, _, slow in runs]           # all at once
    errs = [interrupt_after(proc, marker, delay) for proc, (_, marker, delay, _) in zip(procs, runs)]
    for code, err in errs:
        assert code == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "no checkpoint was written" in errs[0][1] and "half-written" in errs[1][1] and "--resume" in errs[2][1]
    assert len(vae.load_file(tmp_path / "o" / "checkpoint.pt", "checkpoint")["history"]["epoch"]) >= 1
    assert not (tmp_path / "early" / "checkpoint.pt").exists()
    assert not list((tmp_path / "o").glob("*.tmp")) and list((tmp_path / "data").iterdir()) == []
    # Python cannot raise a KeyboardInterrupt from a finalizer (h5py runs some): the hook must
    script = ("import signal, sys, time\nsys.path.insert(0, {here!r})\nimport vae\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
              "if {hook}:\n    sys.unraisablehook = vae.reraise_lost_ctrl_c\n"
              "class Finalized:\n    def __del__(self):\n        raise KeyboardInterrupt\n"
              "try:\n    Finalized()\n    t = time.time()\n    while time.time() - t < 2:\n        pass\n"
              "    print('lost')\nexcept KeyboardInterrupt:\n    print('raised again')\n")
    procs = {want: subprocess.Popen([sys.executable, "-c", script.format(here=str(HERE), hook=hook)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for hook, want in ((False, "lost"), (True, "raised again"))}
    for want, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert out.strip() == want, err


def device_for(arch, monkeypatch):
    """dense's commands run on the emulated GPU, fullyconv's on the CPU -> (flags, context).
    torch.cuda's own queries answer as for a GPU without bf16: the same fp32 as the CPU's."""
    if arch == "fullyconv":
        return ["--device", "cpu"], contextlib.nullcontext()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "an emulated GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 5))
    return ["--device", "cuda"], EmulatedCuda()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    # both default commands on 200 tiny images: 1 epoch, a small trunk, 3 steps fitting the
    # prior; dense on a user's own file and the emulated GPU, fullyconv on the stand-in (made
    # small) and the CPU
    root = tmp_path_factory.mktemp("e2e")
    files = {"dense": tiny_h5(root / "d.h5", n=200), "fullyconv": root / "data" / "synthetic_train_images.h5"}
    argv = {arch: [str(a) for a in ["--arch", arch, "--data", files[arch], "--out",
                                    root / "res" / arch, "--epochs", "1", "--batch-size", "16", "--widths",
                                    8, 16, 16, 16, "--eval-n", "10", "--prior-steps", "3", "--seed", "3"]]
            for arch in vae.ARCHS}
    with pytest.MonkeyPatch.context() as m:                # a small prior too (config.json keeps its width)
        m.setattr(vae, "PRIOR_HIDDEN", {"dense": 16, "fullyconv": 8})
        m.setattr(vae, "PRIOR_DEPTH", {"dense": 2, "fullyconv": 2})
        m.setattr(vae, "SYNTHETIC_DATA", files["fullyconv"])
        m.setattr(vae, "SYNTHETIC_N", 200)
        for arch, args in argv.items():
            device, context = device_for(arch, m)
            with context:
                vae.main(args + device)
            if arch == "dense":     # the training images (180) cross to the GPU once, for all uses
                assert sum(n >= 180 * 64 * 64 for n in context.moved_in) == 1, context.moved_in
    return root, argv


@pytest.mark.parametrize("arch", ["dense", "fullyconv"])
def test_main_trains_evaluates_samples_and_conditions(trained, capsys, monkeypatch, arch):
    root, argv = trained
    out = root / "res" / arch
    device, context = device_for(arch, monkeypatch)

    def command(*args):                                # on the arch's device -> (code, stdout, stderr)
        with context:
            return run_main([*args, *device], capsys)
    names = {p.name for p in out.iterdir()}
    assert names == {"samples.png", "interpolation.png", "reconstructions.png", "losses.png", "nearest.png",
                     "history.json", "config.json", "model.pt", "metrics.json", "checkpoint.pt",
                     *(["large_field.png"] if arch == "fullyconv" else [])}, names
    config, metrics = vae.read_json(out / "config.json"), vae.read_json(out / "metrics.json")
    assert config["prior_minutes"] > 0 and metrics["train_img_per_s"] == config["train_img_per_s"] > 0
    assert metrics["train_minutes"] == config["train_minutes"] > 0
    assert config["code_version"]["vae_py_sha256"] == metrics["code_version"]["vae_py_sha256"]
    assert metrics["prior"] == "learned" and set(metrics["scores"]) == {"learned", "gaussian", "codes", "data"}
    # the stand-in can make images of layouts never trained on: they are the C2ST's reference
    assert metrics["reference"] == {"dense": "held-out images", "fullyconv": "stand-in images of a new seed, a layout each"}[arch]
    # the exercise's 13 real images are reconstructed for its data file, not for a user's own
    assert (metrics["real_recon_accuracy"] is None) == (arch == "dense") and metrics["active_units"] <= metrics["latent_dim"]
    assert f"{arch}: learned" in (root / "res" / "comparison.md").read_text()
    # the prior is fitted after training and leaves the VAE as the last checkpoint holds it
    vae_weights = vae.load_file(out / "checkpoint.pt", "checkpoint")["model"]
    assert all(torch.equal(v, vae.load_model(out / "model.pt").state_dict()[k]) for k, v in vae_weights.items())
    # --evaluate takes the seed (3) and the data file from the model's config.json: its
    # held-out images are the ones training held out, and it scores them as --seed 3 does
    (out / "samples.png").unlink()

    def held_out_elbo(*extra):                         # --evaluate -> its held-out -ELBO
        code, stdout, err = command("--arch", arch, "--out", out, "--evaluate", *extra)
        assert code == 0 and "epoch 1/" not in stdout, err
        return vae.read_json(out / "metrics.json")["neg_elbo"]
    scores = [held_out_elbo()]
    assert (out / "samples.png").is_file()
    with monkeypatch.context() as m:                   # the figures once: they take most of the time
        m.setattr(vae, "sample_figures", lambda *a, **k: {})
        m.setattr(vae, "more_figures", lambda *a, **k: None)
        scores += [held_out_elbo("--seed", "3", "--data", argv[arch][3])]
        scores += [held_out_elbo("--seed", "0")]
    assert scores[0] == scores[1] != scores[2], scores
    # --sample: thresholded prior samples in the real file's layout, which load_images reads
    assert command(*argv[arch], "--sample", "37")[0] == 0
    model = vae.load_model(out / "model.pt")
    probs = vae.draw(model, 37, torch.Generator().manual_seed(0))
    assert (vae.load_images(out / "samples.h5", size=64).bool() == (probs >= 0.5)).float().mean() > 0.999
    if arch == "fullyconv":                            # an (8, 8) latent grid: 128x128 fields
        assert command(*argv[arch], "--sample", "5", "--grid", "8")[0] == 0
        assert vae.load_images(out / "samples.h5", size=128).shape == (5, 1, 128, 128)
    assert_clean_error(*command(*argv[arch], "--evaluate", "--size", "128")[::2], "was trained with --size 64, but this run asks for 128")
    for name, value in (("TRUTHS", 5), ("MEMBERS", 20), ("ASSIMILATIONS", 4)):  # a smaller study
        monkeypatch.setattr(vae, name, value)
    assert command(*argv[arch], "--condition", "--wells", "8")[0] == 0
    cond = vae.read_json(out / "conditioning.json")
    assert cond["prior"] == "learned" and cond["truths"] == len(cond["cases"]) == 5 and cond["wells"] == 8
    assert cond["posterior_proportion_over_truth"] == pytest.approx(
        cond["posterior_proportion"] / np.mean([c["truth_proportion"] for c in cond["cases"]]))
    assert cond["members"] == 20 and cond["assimilations"] == 4
    assert vae.load_images(out / "conditioning_members.h5", size=64).shape == (5 * 20, 1, 64, 64)
    assert_clean_error(*command(*argv[arch], "--condition", "--wells", "5000")[::2], "only 4096 pixels")


def test_resume_takes_the_checkpoints_settings_and_refuses_others(trained, capsys, tmp_path):
    root, argv = trained
    out = root / "res" / "dense"
    # trained with --seed 3, a data file, batch size 16 and small widths: a resume that names
    # none of them takes each from the checkpoint (the same split, batches and model)
    code, stdout, err = run_main(["--arch", "dense", "--out", out, "--epochs", "3", "--resume", "--eval-n", "10"], capsys)
    assert code == 0 and "resuming after epoch 1" in stdout and "epoch 3 done" in stdout, err
    config, history = vae.read_json(out / "config.json"), vae.read_json(out / "history.json")
    assert [config[k] for k in ("seed", "data", "batch_size", "widths", "prior_steps")] == [3, argv["dense"][3], 16, [8, 16, 16, 16], 3]
    # the schedule of the 1-epoch run goes on at its final rate: the rate never rises again
    assert history["epoch"] == [1, 2, 3] and history["lr"] == sorted(history["lr"], reverse=True), history["lr"]
    (tmp_path / "junk.pt").write_bytes(b"\x00not a checkpoint")
    resume = ["--arch", "dense", "--out", out, "--resume"]
    for extra, fragment in (([tmp_path / "missing.pt"], "checkpoint not found"),
                            ([tmp_path / "junk.pt"], "corrupt or not a PyTorch file"),
                            ([root / "res" / "fullyconv" / "checkpoint.pt"], "was trained with --arch fullyconv"),
                            (["--latent-dim", "8"], "was trained with --latent-dim 32, but this run asks for 8"),
                            (["--seed", "0"], "was trained with --seed 3, but this run asks for 0"),
                            (["--batch-size", "8"], "was trained with --batch-size 16, but this run asks for 8"),
                            (["--data", tmp_path / "other.h5"], f"was trained with --data {argv['dense'][3]}, but")):
        assert_clean_error(*run_main(resume + extra, capsys)[::2], fragment)
    assert_clean_error(*run_main(argv["fullyconv"] + ["--evaluate", "--latent-channels", "4"], capsys)[::2],
                       "was trained with --latent-channels 8, but this run asks for 4")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_commands_run_end_to_end_on_a_gpu(tmp_path, capsys):
    for arch in vae.ARCHS:
        argv = ["--arch", arch, "--out", tmp_path / arch, "--device", "cuda"]
        code, _, err = run_main(argv + ["--data", tiny_h5(tmp_path / "d.h5", n=200), "--epochs", "2", "--batch-size",
                                        "16", "--eval-n", "10", "--prior-steps", "3"], capsys)
        assert code == 0, err
        for extra in (["--evaluate"], ["--sample", "7"], ["--condition", "--wells", "4"]):
            assert run_main(argv + extra, capsys)[0] == 0


def test_vae_py_copied_alone_trains_the_plain_vae_into_its_own_folder(tmp_path):
    # without results/real_reference.npz beside it, training still finishes and says what it
    # skipped; --prior gaussian lands in results/dense-gaussian, the default --out
    shutil.copy(HERE / "vae.py", tmp_path / "vae.py")
    tiny_h5(tmp_path / "train_images.h5", n=120)        # named as the exercise's file: the 13 real images are wanted
    done = subprocess.run([sys.executable, "vae.py", "--arch", "dense", "--data", "train_images.h5", "--epochs", "1",
                           "--batch-size", "16", "--widths", "8", "16", "16", "16", "--eval-n", "8", "--device", "cpu",
                           "--prior", "gaussian"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "real_reference.npz not found" in done.stdout, done.stderr
    out = tmp_path / "results" / "dense-gaussian"
    assert not (tmp_path / "results" / "dense").exists() and vae.load_model(out / "model.pt").prior.name == "gaussian"
    metrics = vae.read_json(out / "metrics.json")
    assert metrics["real_recon_accuracy"] is None and set(metrics["scores"]) == {"gaussian", "codes", "data"}


def test_bad_files_devices_and_folders_end_in_one_line(tmp_path, capsys):
    def write_dataset(path, data, key="train_images"):
        with h5py.File(path, "w") as f:
            f.create_dataset(key, data=data)
        return path
    good = tiny_h5(tmp_path / "good.h5", n=20)
    (tmp_path / "text.h5").write_text("hello")
    (tmp_path / "cut.h5").write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    (tmp_path / "folder.h5").mkdir()
    img = vae.make_synthetic_channels(4, seed=2).astype(np.float32)
    grey, nan, mask = img.copy(), img.copy(), img * 255
    grey[0, 0, 0, 0], nan[1, 5, 5, 0] = 0.5, np.nan
    cases = [(tmp_path / "nope.h5", ["file not found", "train_images.h5"]),
             (tmp_path / "text.h5", ["not a readable HDF5 file"]),
             (tmp_path / "cut.h5", ["not a readable HDF5 file"]),
             (tmp_path / "folder.h5", ["is a folder, not a file"]),
             (write_dataset(tmp_path / "k.h5", np.zeros((4, 128, 128), np.uint8), "images"),
              ["no dataset 'train_images'", "['images']"]),
             (write_dataset(tmp_path / "z.h5", np.zeros((0, 128, 128, 1), np.uint8)), ["zero images"]),
             (write_dataset(tmp_path / "g.h5", grey), ["must be binary", "0.5"]),
             (write_dataset(tmp_path / "n.h5", nan), ["must be binary", "nan"]),
             (write_dataset(tmp_path / "m.h5", mask), ["must be binary", "255"]),
             (good, ["fewer than one batch of 128"])]
    for shape in ((4, 32, 32), (4, 64, 48), (4, 3, 128, 128), (4, 128, 128, 3)):
        cases.append((write_dataset(tmp_path / f"s{len(cases)}.h5", np.zeros(shape, np.uint8)),
                      [str(shape), "expected (N, S, S, 1) or (N, S, S)"]))
    argvs = [(["--data", path, "--out", tmp_path / "o"], [path.name, *fragments]) for path, fragments in cases]
    (tmp_path / "file").write_text("a file, not a folder")
    argvs += [(["--data", good, "--out", tmp_path / "file" / "sub"], ["file/sub"]),
              (["--device", "tpu9", "--out", tmp_path / "o"], ["--device tpu9", "use --device cpu"])]
    if not torch.cuda.is_available():
        argvs.append((["--device", "cuda", "--out", tmp_path / "o"], ["--device cuda", "use --device cpu"]))
    for argv, fragments in argvs:
        code, out, err = run_main(["--arch", "dense", *argv], capsys)
        assert_clean_error(code, err, *fragments)
        assert "synthetic" not in out + err and "epoch" not in out


@pytest.mark.parametrize("argv, fragment", [(a, "") for a in (
    "--size 96", "--epochs -1", "--epochs 0", "--beta -0.5", "--beta nan", "--lr nan", "--lr 0",
    "--warmup inf", "--latent-dim 0", "--batch-size 0", "--widths 8 x", "--widths 8 -2", "--arch mlp",
    "--prior normal", "--wells 0", "--sample 0", "--sample -5")] + [
    ("--arch fullyconv --sample 10 --grid 0", "argument --grid"), ("", "argument --arch"),
    ("--sample 10 --grid 8", "argument --grid"),                  # dense has no grid
    ("--arch fullyconv --grid 8", "argument --grid"),             # without --sample
    ("--sample 10 --condition", "not allowed with"),
    ("--widths 8 8 8 8 8 8 8", "divisible by 2^7")])
def test_bad_flags_are_argparse_errors(capsys, argv, fragment):
    argv = argv.split()
    code, _, err = run_main((["--arch", "dense"] if argv and "--arch" not in argv else []) + argv, capsys)
    assert_clean_error(code, err, fragment or f"argument {argv[0]}", lines=0)
    lines = err.strip().splitlines()            # argparse's usage, then its one-line error
    assert lines[0].startswith("usage: ") and ": error: " in lines[-1]


def test_bad_model_files_end_in_one_line_and_never_run_code(tmp_path, capsys, recwarn):
    class Payload:                       # a pickled object: loading it would run code
        def __reduce__(self):
            return (print, ("this ran while loading",))
    out = tmp_path / "o"
    evaluate = ["--arch", "dense", "--out", out, "--evaluate"]
    assert_clean_error(*run_main(evaluate, capsys)[::2], "model file not found")
    (out / "model.pt").mkdir()
    assert_clean_error(*run_main(evaluate, capsys)[::2], "is a folder, not a model file")
    (out / "model.pt").rmdir()
    torch.save({"config": {}, "evil": Payload()}, out / "model.pt")
    with open(out / "plain.pkl", "wb") as f:              # a plain pickle with code in it
        pickle.dump({"config": {}, "evil": Payload()}, f)
    (out / "random.pt").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())
    torch.save({"config": {"arch": "dense", "size": 64}, "state_dict": {}}, out / "foreign.pt")
    for name, fragment in (("model.pt", "pickled Python objects"), ("plain.pkl", "not a readable model file"),
                           ("random.pt", "corrupt or not a PyTorch file"),
                           ("foreign.pt", "not a model file of this script")):
        os.replace(out / name, out / "model.pt")
        code, stdout, err = run_main(evaluate, capsys)
        assert_clean_error(code, err, fragment)
        assert "this ran while loading" not in stdout + err
    assert not recwarn.list, [str(w.message) for w in recwarn]    # nothing printed beside it


def test_help_states_the_defaults_and_the_file_reads_as_a_tutorial(capsys):
    with pytest.raises(SystemExit):
        vae.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(d in text for d in ("(default: 128)", "(default: 0.002)", "(default: learned)",
                                   "(default: 8000 dense, 3000 fullyconv)",
                                   "(default: 24 dense, 20 fullyconv)", "(default: 16 32 64 128)"))
    assert "(default: None)" not in text
    assert [vae.with_defaults(vae.parse_args(["--arch", a])).epochs for a in vae.ARCHS] == [24, 20]
    source = (HERE / "vae.py").read_text()
    banners = [source.index(f"\n# Part {k}: ") for k in (1, 2, 3)]
    assert banners == sorted(banners) and banners[0] < source.index("You can stop here") < banners[1]
    assert max(len(line) for line in source.splitlines()) <= 100
