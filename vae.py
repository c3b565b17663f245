"""Variational autoencoders that draw new images of meandering channels from random latents.
    python vae.py --arch dense        # conv encoder/decoder joined by dense layers: z is a vector
    python vae.py --arch fullyconv    # no dense layer anywhere: z is a small image
The data: 128x128 binary images of channel facies (1 = channel sand, 0 = background mud),
halved to 64x64; without data/train_images.h5, a synthetic stand-in made once.
Part 1, the plain VAE: data, the two models, the ELBO, training, samples and interpolation;
        each training command trains exactly this model (`--prior gaussian` stops there).
Part 2, beyond it: a prior learned from the codes after training, which makes random draws
        decode to whole channels, and conditioning channel models on wells, which is what
        the latent space is for.
Part 3, measuring and plumbing: the stand-in, realism scores, reports, files, the command line.
"""
import argparse
import copy
import json
import math
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import h5py
import matplotlib
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

matplotlib.use("Agg")           # figures go to files: no screen needed
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

DATA_URL = ("https://grrjnyzvhu1t.objectstorage.sa-saopaulo-1.oci.customer-oci.com/p/"
            "jflQ-fCMHmA5jLi-DdqElenJTzARdTp61YIzIDpRBI531v05mmWObjM2F1CBTIVL/n/grrjnyzvhu1t/"
            "b/General_ltrace_files/o/deep_esmda/train_images.h5")
KEY = "train_images"            # the one dataset in the real file: uint8 (N, 128, 128, 1)


class DataError(Exception):
    """Bad input: main() prints it as one line and exits with status 2."""


# =============================================================================================
# Part 1: the plain VAE
# =============================================================================================
# ----------------------------------------------------------------------------- data
def downsample_majority(x):
    """(N, 1, S, S) uint8 0/1 -> (N, 1, S/2, S/2): the majority of each 2x2 block, so that
    pixels stay binary, as the Bernoulli likelihood needs; a 2-2 tie goes to the top-left."""
    n, c, s, _ = x.shape
    block = x.view(n, c, s // 2, 2, s // 2, 2)
    votes = block.sum((3, 5))                                  # (N, 1, S/2, S/2), 0..4
    return ((votes >= 3) | ((votes == 2) & (block[:, :, :, 0, :, 0] == 1))).to(torch.uint8)


def as_images(a, size):
    """0/1 numpy images (N, S, S, 1) or (N, S, S) -> uint8 (N, 1, size, size); S = 2 * size
    is halved by the vote above, S = size kept as it is."""
    x = torch.from_numpy(a.astype(np.uint8).reshape(len(a), 1, *a.shape[1:3]))
    return downsample_majority(x) if x.shape[-1] > size else x


def load_images(path, size=64, chunk=2000):
    """HDF5 'train_images' (N, S, S, 1) or (N, S, S) of 0/1, S = size or 2 * size -> uint8
    (N, 1, size, size), read in chunks."""
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (the real data: {DATA_URL})") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a file") from None
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        d = f.get(KEY)
        if not isinstance(d, h5py.Dataset):
            raise DataError(f"{path}: no dataset '{KEY}'; the file holds {sorted(f.keys())}")
        s = d.shape[1] if d.ndim > 1 else 0
        if d.shape[1:] not in ((s, s, 1), (s, s)) or s not in (size, 2 * size):
            raise DataError(f"{path}: '{KEY}' has shape {d.shape}; expected (N, S, S, 1) or "
                            f"(N, S, S) with S = {2 * size} or {size}")
        if len(d) == 0:
            raise DataError(f"{path}: '{KEY}' holds zero images")
        out = torch.empty((len(d), 1, size, size), dtype=torch.uint8)
        for i in range(0, len(d), chunk):
            try:
                a = d[i:i + chunk]
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: not a readable HDF5 file from image {i} ({e})") from None
            if not ((a == 0) | (a == 1)).all():
                found = np.unique(a[(a != 0) & (a != 1)])[:5].tolist()
                raise DataError(f"{path}: the data must be binary (0/1); found {found}")
            out[i:i + len(a)] = as_images(a, size)
    return out


# ----------------------------------------------------------------------------- models
# Both models share a convolutional trunk: stride-2 convolutions halve the image four times,
# to (widths[-1], S/16, S/16); stride-2 transposed convolutions mirror them (a 4x4 kernel at
# stride 2 covers every output pixel off the border equally often: no checkerboard).
WIDTHS = (16, 32, 64, 128)              # channels after each stride-2 stage


def encoder_trunk(widths):
    """(B, 1, S, S) -> (B, widths[-1], S / 2^len(widths), same)"""
    chans = [1, *widths]
    return nn.Sequential(*[nn.Sequential(nn.Conv2d(a, b, 4, 2, 1, bias=False),
                                         nn.BatchNorm2d(b), nn.LeakyReLU(0.2, inplace=True))
                           for a, b in zip(chans[:-1], chans[1:])])


def decoder_trunk(widths):
    """(B, widths[-1], s, s) -> (B, 1, s * 2^len(widths), same) logits"""
    chans = list(reversed(widths))
    blocks = [nn.Sequential(nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False),
                            nn.BatchNorm2d(b), nn.ReLU(inplace=True))
              for a, b in zip(chans[:-1], chans[1:])]
    return nn.Sequential(*blocks, nn.ConvTranspose2d(chans[-1], 1, 4, 2, 1))


class DenseVAE(nn.Module):
    """Conv encoder -> flatten -> linear heads (mu, logvar of z, a vector (D,)); z -> linear ->
    conv decoder: every pixel depends on all of z. Shapes: 64x64 images, WIDTHS, D = 32."""
    arch = "dense"

    def __init__(self, size=64, latent_dim=32, widths=WIDTHS):
        super().__init__()
        self.size, self.widths = size, widths
        self.grid = size // 2 ** len(widths)                # 4
        feat = widths[-1] * self.grid ** 2                  # 128 * 4 * 4 = 2048
        self.latent_shape = (latent_dim,)
        self.encoder = encoder_trunk(widths)                # (B, 128, 4, 4)
        self.mu = nn.Linear(feat, latent_dim)               # (B, D)
        self.logvar = nn.Linear(feat, latent_dim)           # (B, D)
        self.expand = nn.Sequential(nn.Linear(latent_dim, feat), nn.ReLU())   # (B, 2048)
        self.decoder = decoder_trunk(widths)                # (B, 1, 64, 64)

    def encode(self, x):
        h = self.encoder(x).flatten(1)                      # (B, 2048)
        return self.mu(h), self.logvar(h)                   # (B, D) each

    def decode(self, z):
        h = self.expand(z).view(-1, self.widths[-1], self.grid, self.grid)   # (B, 128, 4, 4)
        return self.decoder(h)                              # (B, 1, 64, 64) logits


class FullyConvVAE(nn.Module):
    """Conv encoder -> 3x3 conv heads (mu, logvar of z, a small image (C, S/16, S/16)); z -> conv
    decoder. No nn.Linear, and no kernel covers the whole map (a dense layer in disguise would),
    so a larger latent grid decodes to a larger image. Shapes: 64x64 images, WIDTHS, C = 8."""
    arch = "fullyconv"

    def __init__(self, size=64, latent_channels=8, widths=WIDTHS):
        super().__init__()
        self.size, self.widths = size, widths
        grid = size // 2 ** len(widths)                     # 4
        self.latent_shape = (latent_channels, grid, grid)
        self.encoder = encoder_trunk(widths)                # (B, 128, 4, 4)
        self.mu = nn.Conv2d(widths[-1], latent_channels, 3, 1, 1)       # (B, C, 4, 4)
        self.logvar = nn.Conv2d(widths[-1], latent_channels, 3, 1, 1)   # (B, C, 4, 4)
        self.expand = nn.Sequential(nn.Conv2d(latent_channels, widths[-1], 3, 1, 1),
                                    nn.BatchNorm2d(widths[-1]), nn.ReLU())  # (B, 128, 4, 4)
        self.decoder = decoder_trunk(widths)                # (B, 1, 64, 64)

    def encode(self, x):
        h = self.encoder(x)                                 # (B, 128, 4, 4)
        return self.mu(h), self.logvar(h)                   # (B, C, 4, 4) each

    def decode(self, z):
        return self.decoder(self.expand(z))                 # (B, 1, 64, 64) logits


ARCHS = {"dense": DenseVAE, "fullyconv": FullyConvVAE}


# ----------------------------------------------------------------------------- the loss
# Training maximizes the ELBO, a lower bound on log p(x) that can be computed. Its negative:
#   -ELBO(x) = E_q(z|x)[-log p(x|z)] + KL(q(z|x) || p(z))     (reconstruction + regularization)
# The encoder gives q(z|x) = N(mu, diag sigma^2), the approximate posterior; the prior is
# p(z) = N(0, I). The KL pulls every q(z|x) towards it, so that random draws from the prior
# land where the codes of real images are. The expectation is estimated with one sample z per
# image. p(x|z) is a Bernoulli per pixel, so -log p(x|z) is the binary cross-entropy of the
# decoder's logits summed over pixels; the KL of two Gaussians has a closed form (Kingma &
# Welling 2014, appendix B). Summed, both are in nats per image; beta weights the KL.

def reparameterize(mu, logvar, generator=None):
    """z = mu + sigma * eps, eps ~ N(0, I): a sample of q(z|x), shaped like mu. A draw has no
    gradient; with the noise moved into eps, gradients flow through z to mu and logvar."""
    eps = torch.randn_like(mu) if generator is None else \
        torch.randn(mu.shape, generator=generator).to(mu)
    return mu + eps * torch.exp(0.5 * logvar)


def bernoulli_nll(logits, x):
    """-log p(x|z) for binary x, summed over pixels: (B, 1, S, S) -> (B,)"""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def gaussian_kl(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over the latent: (B, ...) -> (B,)
    Per number: -1/2 (1 + log sigma^2 - mu^2 - sigma^2)."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).flatten(1).sum(1)


def neg_elbo(model, x, beta=1.0):
    """x (B, 1, S, S) in {0, 1} -> (loss, rec, kl), each the batch mean in nats per image."""
    mu, logvar = model.encode(x)                      # (B, *latent_shape) each
    z = reparameterize(mu, logvar)                    # (B, *latent_shape)
    logits = model.decode(z)                          # (B, 1, S, S)
    rec, kl = bernoulli_nll(logits, x).mean(), gaussian_kl(mu, logvar).mean()
    return rec + beta * kl, rec, kl


class StandardNormal(nn.Module):
    """p(z) = N(0, I), the prior that draws new images. A draw starts as Gaussian noise u, and
    to_z(u) is its latent; to_u(z) gives back the noise of a latent (as interpolation needs).
    Here both are the identity, z = u; Part 2 learns a prior whose map is not."""
    name = "gaussian"
    title = "N(0, I)"

    def to_z(self, u):
        return u

    def to_u(self, z):
        return z


def build_model(arch, size=64, **kwargs):
    """The VAE with the N(0, I) prior; kwargs: widths, latent_dim or latent_channels."""
    widths = kwargs.get("widths", WIDTHS)
    if size % 2 ** len(widths):
        raise ValueError(f"size {size} must be divisible by 2^{len(widths)}, a halving per width")
    model = ARCHS[arch](size=size, **kwargs)
    model.prior = StandardNormal()
    return model


# ----------------------------------------------------------------------------- training
def split(images, seed, val_fraction=0.1):
    """A random train/held-out split -> (train, held-out). The real images include shifted
    near-copies of one another, so held-out scores are somewhat optimistic."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(val_fraction * len(images)))
    return images[order[n_val:]], images[order[:n_val]]


def to_float(batch, device):
    """uint8 (B, 1, S, S) -> float32 on the device, laid out as fast convolutions want it."""
    return batch.to(device).float().contiguous(memory_format=torch.channels_last)


def adam_step(opt, loss, lr):
    """One step of the optimizer on loss at learning rate lr (every fit in this file)."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def train_step(model, opt, x, beta, lr, bf16=False):
    """One Adam step on the -ELBO of a batch x (B, 1, S, S) -> (loss, rec, kl) before it.
    bf16: autocast runs the convolutions and linear layers in bfloat16, up to twice as fast
    where the hardware has it. The cross-entropy stays fp32 (autocast's own rule); on the CPU
    the KL of 32-128 numbers is summed in bf16 (0.4% precision; CUDA's autocast sums in
    fp32); bf16 needs no loss scaling (it has fp32's range)."""
    with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
        loss, rec, kl = neg_elbo(model, x, beta)
    adam_step(opt, loss, lr)
    return loss, rec, kl


def every(seconds):
    """A clock for progress lines: the function it returns is True once per `seconds`."""
    last = [time.perf_counter()]

    def due():
        if time.perf_counter() - last[0] < seconds:
            return False
        last[0] = time.perf_counter()
        return True
    return due


BATCH_SIZE = 128
LR = 2e-3
KL_WARMUP = 1.0                 # epochs over which beta rises from 0
HISTORY = ("epoch", "train_rec", "train_kl", "val_rec", "val_kl", "val_loss", "beta", "lr",
           "seconds")


def lr_at(step, total, lr):
    """A linear ramp over min(200 steps, 10% of the run), so that Adam's averages settle before
    full steps, then a cosine decay to 5% of lr: small steps that settle the decoder at the end."""
    ramp = min(200, total // 10)
    if step < ramp:
        return lr * (step + 1) / ramp
    t = (step - ramp) / max(1, total - ramp)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def beta_at(step, warmup_steps, beta):
    """KL warm-up: beta rises from 0, so the decoder learns to use z before the KL pulls."""
    return beta * min(1.0, step / warmup_steps) if warmup_steps > 0 else beta


@torch.no_grad()
def validate(model, images, device, beta, batch_size=500):
    """Mean (loss, rec, kl) in nats/image of uint8 images (N, 1, S, S); at beta 1, the -ELBO.
    Leaves the model in eval mode."""
    model.eval()
    total = torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(images), batch_size):
        x = to_float(images[i:i + batch_size], device)
        total += torch.tensor([t.item() for t in neg_elbo(model, x, beta)]) * len(x)
    return (total / len(images)).tolist()


def read_means(sums, n, epoch):
    """The summed (rec, kl) of n steps -> their means as floats; a NaN or inf stops training."""
    rec, kl = (sums / n).tolist()
    if not math.isfinite(rec + kl):
        raise FloatingPointError(f"the loss became {rec + kl} at epoch {epoch + 1}")
    return rec, kl


def train(model, train_x, val_x, device, epochs, batch_size=BATCH_SIZE, lr=LR, beta=1.0,
          warmup=KL_WARMUP, seed=0, bf16=False, resume=None, on_epoch=None, log=print):
    """Adam on the -ELBO; train_x, val_x uint8 (N, 1, S, S) -> history, a list per HISTORY key.
    After each epoch on_epoch(state) gets what a resumed run needs; resume=state goes on, with
    the learning-rate schedule of the epochs it began with (extra epochs run at its last rate)."""
    steps = len(train_x) // batch_size                          # per epoch
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)   # one kernel for all weights
    history, total = {k: [] for k in HISTORY}, steps * epochs
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["rng"])
        torch.cuda.set_rng_state_all(resume["rng_cuda"])
        history, total = resume["history"], resume["schedule_steps"]
    progress = every(30)
    for epoch in range(len(history["epoch"]), epochs):
        model.train()
        # the data order depends on (seed, epoch) only, so a resumed run sees the same batches
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(train_x), generator=g).to(train_x.device)
        # the loss terms add up on the device: reading them (.item()) would make a GPU wait
        # for every step, so they are read, and checked for NaN, at each log and epoch end
        sums = torch.zeros(2, device=device)
        t0 = time.perf_counter()
        for s in range(steps):
            i = epoch * steps + s
            b, r = beta_at(i, round(warmup * steps), beta), lr_at(i, total, lr)
            x = to_float(train_x[order[s * batch_size:(s + 1) * batch_size]], device)
            sums += torch.stack(train_step(model, opt, x, b, r, bf16)[1:]).detach()
            if progress():
                rec, kl = read_means(sums, s + 1, epoch)
                rate = (s + 1) * batch_size / (time.perf_counter() - t0)     # img/s this epoch
                left = (steps * epochs - i - 1) * batch_size / rate / 60
                log(f"epoch {epoch + 1}/{epochs} step {s + 1}/{steps}  rec {rec:6.1f}  kl "
                    f"{kl:5.1f}  {rate:4.0f} img/s  ETA {left:.1f} min")
        seconds = time.perf_counter() - t0
        rec, kl = read_means(sums, steps, epoch)
        val_loss, val_rec, val_kl = validate(model, val_x, device, beta)
        row = (epoch + 1, rec, kl, val_rec, val_kl, val_loss, b, r, seconds)
        for key, value in zip(HISTORY, row):
            history[key].append(value)
        log(f"epoch {epoch + 1} done: held-out loss {val_loss:.1f} = rec {val_rec:.1f} + kl "
            f"{val_kl:.1f} nats/img ({seconds:.0f} s)")
        if on_epoch:                # Part 3 saves this as the checkpoint
            on_epoch({"model": model.state_dict(), "optimizer": opt.state_dict(), "history":
                      history, "schedule_steps": total, "rng": torch.get_rng_state(),
                      "rng_cuda": torch.cuda.get_rng_state_all()})
    return history


# ----------------------------------------------------------------------------- samples
# The product: new images from random latents. A draw is Gaussian noise u, its latent
# z = prior.to_z(u), and the decoder's probability of channel at each pixel; its facies image
# takes each pixel's more likely facies (channel where the probability is at least 0.5).

@torch.no_grad()
def decode_probs(model, z, batch_size=500):
    """Decoder probabilities for latents z (N, *latent) -> (N, 1, S, S) on the model's device."""
    device = next(model.parameters()).device
    return torch.cat([torch.sigmoid(model.decode(z[i:i + batch_size].to(device)))
                      for i in range(0, len(z), batch_size)])


@torch.no_grad()
def draw(model, n, generator=None, grid=None, prior=None):
    """n new images -> decoder probabilities (n, 1, S, S) on the model's device. prior: one
    other than the model's own, through the same decoder; grid (fullyconv only): another
    latent grid, e.g. (8, 8) for fields twice as wide and tall."""
    shape = model.latent_shape if grid is None else (model.latent_shape[0], *grid)
    u = torch.randn(n, *shape, generator=generator).to(next(model.parameters()).device)
    return decode_probs(model, (prior or model.prior).to_z(u))


def facies(probs):
    """Decoder probabilities -> uint8 images of 0 and 1, each pixel its more likely facies."""
    return (probs >= 0.5).to(torch.uint8)


def slerp(u0, u1, steps):
    """Spherical paths (slerp) from u0 to u1 (P, ...) each -> (steps, P, ...). Gaussian draws
    in d dimensions have norms near sqrt(d) +- 0.7 and are nearly orthogonal: a straight line
    between two passes norm sqrt(d/2) (d = 32: 4), where the prior seldom draws; slerp does not."""
    a, b = u0.flatten(1), u1.flatten(1)                                     # (P, d)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1, 1)).view(1, -1, 1)                   # (1, P, 1)
    t = torch.linspace(0, 1, steps, device=a.device).view(-1, 1, 1)         # (steps, 1, 1)
    sin = torch.sin(omega).clamp_min(1e-12)
    straight = omega < 1e-6                       # parallel ends: the straight line is the arc
    w0 = torch.where(straight, 1 - t, torch.sin((1 - t) * omega) / sin)    # (steps, P, 1)
    w1 = torch.where(straight, t, torch.sin(t * omega) / sin)
    return (w0 * a + w1 * b).view(steps, *u0.shape)


@torch.no_grad()
def interpolate(model, u0, u1, steps):
    """Decoded great-circle paths between the prior's noises u0 and u1 (P, *latent) each ->
    probabilities (steps, P, 1, S, S)."""
    z = model.prior.to_z(slerp(u0, u1, steps).flatten(0, 1))      # (steps * P, *latent)
    return decode_probs(model, z).view(steps, len(u0), 1, model.size, model.size)


def panel_pitch(s, titled):
    """Rows and columns of show_grid's one image from one panel (S pixels) to the next."""
    return s + (s // 5 if titled else 2), s + 2                  # room for the titles


def show_grid(rows, title, row_labels=None, panel=1.3, panel_titles=None):
    """rows: a list of (N, 1, S, S) tensors in [0, 1], one per figure row -> a figure of one
    image, the panels a few pixels apart (one image draws far faster than an axes a panel).
    panel_titles: per row, None or a title for each panel."""
    s, ncol = rows[0].shape[-1], max(len(r) for r in rows)
    step, col = panel_pitch(s, panel_titles)
    mosaic = np.full((len(rows) * step, ncol * col), np.nan)       # NaN: no panel, white
    fig, ax = plt.subplots(figsize=(panel * ncol, panel * len(rows) + 0.5))
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            mosaic[i * step:i * step + s, j * col:j * col + s] = image[0].float().cpu()
            if panel_titles and panel_titles[i]:
                ax.text(j * col + s / 2, i * step - 1, panel_titles[i][j], fontsize=7,
                        ha="center", va="bottom")
        ax.text(-2, i * step + s / 2, row_labels[i] if row_labels else "", rotation=90,
                ha="right", va="center", fontsize=8)
    ax.imshow(mosaic, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=10, pad=12 if panel_titles else 4)
    fig.tight_layout()
    return fig


@torch.no_grad()
def sample_figures(model, val_x, device, note, seed=0):
    """-> {"samples.png": 48 prior draws, "interpolation.png": paths between latents}"""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    probs = draw(model, 48, g)                                               # (48, 1, S, S)
    title = f"{note}: decoder probabilities of 48 draws from {model.prior.title}"
    samples = show_grid(list(probs.view(6, 8, *probs.shape[1:])), title)

    # held-out image r -> held-out image k + r (ends shown), then two pairs of prior draws;
    # a held-out image's noise is that of its posterior mean, to_u(mu)
    k = min(4, len(val_x) // 2)
    u_held = model.prior.to_u(model.encode(to_float(val_x[:2 * k], device))[0])  # (2k, *latent)
    u_new = torch.randn(4, *model.latent_shape, generator=g).to(device)
    starts, ends = torch.cat([u_held[:k], u_new[:2]]), torch.cat([u_held[k:], u_new[2:]])
    frames = interpolate(model, starts, ends, 10).cpu()                    # (10, k + 2, 1, S, S)
    rows = [frames[:, r] for r in range(k + 2)]
    for r in range(k):
        rows[r] = torch.cat([val_x[r:r + 1].float(), rows[r], val_x[k + r:k + r + 1].float()])
    paths = show_grid(rows, f"{note}: great-circle paths (held-out image -> held-out image, "
                      f"ends shown;\nthen prior draw -> prior draw)",
                      row_labels=["held-out"] * k + ["prior"] * 2)
    return {"samples.png": samples, "interpolation.png": paths}


# `python vae.py --arch dense --prior gaussian` runs load_images -> split -> build_model ->
# train -> sample_figures, with run() in Part 3. You can stop here: that is the whole VAE.
# Its random draws come out faded and broken (too little channel); Part 2 says why, and
# fits a better prior to this very model.


# =============================================================================================
# Part 2: beyond the plain VAE
# =============================================================================================
# ----------------------------------------------------------------------------- the learned prior
# Why N(0, I) draws break: the KL pulls each image's q(z|x) towards N(0, I), but the codes of
# all training images together, the aggregate posterior q(z) = mean over x of q(z|x), fill
# only part of that ball, unevenly. Random z ~ N(0, I) also land where no image has its code,
# and the decoder, which never saw such z, blends layouts there into frayed, faded or broken
# channels: the "prior hole". The decoder is fine; the prior is wrong. So once the VAE has
# trained, a second model learns q(z) itself, with Gaussian noise u beneath it, and the VAE
# stays as it is:
#   u ~ N(0, I)  --  solve dz/dt = v(z, t) from t = 0 to t = 1  -->  z ~ q(z)
# Flow matching (Lipman et al. 2023; Liu et al. 2023) learns the velocity v by regression.
# Take the code z1 ~ q(z|x) of a training image, noise z0 ~ N(0, I) and a time t in (0, 1):
# along the straight line z_t = (1 - t) z0 + t z1 a point moves with velocity z1 - z0, so
#   loss = || v(z_t, t) - (z1 - z0) ||^2        summed over the latent, averaged over a batch
# Why that learns the prior, in two steps. A squared error is least at the conditional mean,
# so the best v(z, t) is E[z1 - z0 | z_t = z], the mean velocity of all lines through z at t.
# The density p_t of z_t moves as its lines carry it: the probability flowing through z is
# p_t(z) times the mean velocity of the lines there, so dp_t/dt = -div(p_t v) with that same v
# (the continuity equation), which is also how an ODE dz/dt = v moves a density; so the ODE
# carries p_0 = N(0, I) through every p_t to p_1 = q(z) (Lipman et al., theorem 1).
# The loss never reaches 0: lines from many (z0, z1) cross each point. t is drawn logit-normal
# (the sigmoid of a N(0, 1) number), which trains the middle of the path most, where a draw's
# layout is decided (Esser et al. 2024); here it drew fewer broken channels than uniform t.
# No term looks at the images: the prior learns from the codes alone, whatever the channels
# look like. The ODE is solved with Heun's method in ODE_STEPS steps (an Euler step, then the
# mean of the slopes at its two ends: second order, so few steps); run backwards it maps a code
# to its u, up to the solver's error, so interpolation and conditioning on wells (below) still
# work on Gaussian u. v is an MLP for the dense latent and 3x3 convolutions for the fullyconv
# one (no dense layer, any grid), twice as deep (8 blocks, measured: results/levers.md): a
# channel runs through many cells, so its cells' codes depend on each other in long chains.
# A fitted v is too smooth (it blurs the velocities of nearby layouts), so some draws land
# between layouts and decode to channels that end, or fade. Autoguidance (Karras et al. 2024)
# steers away from that error: a rough v_r, a second net of the same shape fitted an eighth as
# many steps, makes the same errors, only larger. If v errs by e and v_r by k e, the ODE's
#   v_r + w (v - v_r),  w > 1,
# errs by e (1 - (w - 1)(k - 1)): not at all for w = 2, k = 2. It no longer carries N(0, I)
# to q(z) exactly, but towards q(z)'s surer layouts; it is still a map of u, and running it
# backwards still inverts it. An exact case: for Gaussian codes N(m, s^2 I) the best v is
# m a(t) + z b(t), a and b set by s and t alone, so, as w and 1 - w sum to 1, a v_r fitted to
# N(m_r, s^2 I) and a v to N(m, s^2 I) draw N(m_r + w (m - m_r), s^2 I) (a test checks it).
# w is measured (results/levers.md): it moved pieces, top-to-bottom channels and near-empty
# draws towards the data for both models; a larger w widens the channels.
PRIOR_HIDDEN = {"dense": 512, "fullyconv": 64}      # width of v's layers (channels on a grid)
PRIOR_DEPTH = {"dense": 4, "fullyconv": 8}          # residual blocks
PRIOR_BATCH = {"dense": 512, "fullyconv": 256}      # codes per step (a grid code has 16
#                                                     cells: 256 codes are 4,096 cells a step)
PRIOR_STEPS = {"dense": 8000, "fullyconv": 3000}    # Adam steps of the fit (measured:
#                                                     dense gains from 8,000, fullyconv not)
PRIOR_LR = 3e-3                                      # its peak learning rate
ODE_STEPS = 10                                       # Heun steps, two of v and of v_r each
ROUGH = 8                                            # v_r's fit: an eighth of v's steps
GUIDANCE = 2.0                                       # w, both archs


class Velocity(nn.Module):
    """v(z, t): (B, C, *grid) and (B,) -> (B, C, *grid), grid = () for dense. Residual blocks,
    each normalized (GroupNorm: steady steps at a high learning rate) and told the time by a
    scale and shift of its features, made from sin/cos features of t (FiLM, feature-wise
    linear modulation; on a grid, a 1x1 convolution of the time features over every cell)."""

    def __init__(self, channels, hidden, depth, spatial, freqs=8):
        super().__init__()
        layer = (lambda a, b, k=3: nn.Conv2d(a, b, k, 1, k // 2)) if spatial else \
            (lambda a, b, k=None: nn.Linear(a, b))
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(freqs))   # (T/2,): sin, cos
        self.first, self.last = layer(channels, hidden), layer(hidden, channels)
        self.norms = nn.ModuleList(nn.GroupNorm(8, hidden) for _ in range(depth))
        self.films = nn.ModuleList(layer(2 * freqs, 2 * hidden, 1) for _ in range(depth))
        self.blocks = nn.ModuleList(layer(hidden, hidden) for _ in range(depth))

    def forward(self, z, t):
        f = t.view(-1, 1) * self.freqs                                       # (B, T/2)
        f = torch.cat([f.sin(), f.cos()], 1).view(len(z), -1, *[1] * (z.dim() - 2))
        f = f.expand(-1, -1, *z.shape[2:])                                   # (B, T, *grid)
        h = self.first(z)                                                    # (B, hidden, *grid)
        for norm, film, block in zip(self.norms, self.films, self.blocks):
            scale, shift = film(f).chunk(2, 1)                               # (B, hidden, *grid)
            h = h + block(F.silu(norm(h) * (1 + scale) + shift))
        return self.last(F.silu(h))                                          # (B, C, *grid)


class LearnedPrior(nn.Module):
    """p(z) by flow matching, with the methods of Part 1's StandardNormal: to_z(u) solves the
    ODE forwards (sampling), to_u(z) backwards, both along the guided velocity."""
    name = "learned"
    title = "the learned prior z = ODE(u), u ~ N(0, I)"

    def __init__(self, latent_shape, hidden, depth, steps=ODE_STEPS, guidance=1.0):
        super().__init__()
        net = lambda: Velocity(latent_shape[0], hidden, depth, len(latent_shape) > 1)
        self.velocity, self.rough = net(), net()                        # v and v_r
        self.hidden, self.depth, self.steps, self.guidance = hidden, depth, steps, guidance

    def guided(self, z, t):
        """v_r + w (v - v_r): z (B, C, *grid) and t (B,) -> (B, C, *grid)."""
        rough = self.rough(z, t)
        return rough + self.guidance * (self.velocity(z, t) - rough)

    def solve(self, z, t0, t1):
        """Heun's method from t0 to t1: z (B, C, *grid) -> the same shape."""
        dt = (t1 - t0) / self.steps
        for i in range(self.steps):
            t = torch.full((len(z),), t0 + i * dt, device=z.device)
            a = self.guided(z, t)
            z = z + dt / 2 * (a + self.guided(z + dt * a, t + dt))
        return z

    def to_z(self, u):
        return self.solve(u, 0.0, 1.0)

    def to_u(self, z):
        return self.solve(z, 1.0, 0.0)


@torch.no_grad()
def encode_all(model, images, device, batch_size=500):
    """Posterior means and log-variances of uint8 images -> two (N, *latent_shape) tensors."""
    out = [model.encode(to_float(images[i:i + batch_size], device))
           for i in range(0, len(images), batch_size)]
    return torch.cat([m for m, _ in out]), torch.cat([v for _, v in out])


def flow_matching_loss(velocity, mu, logvar, batch_size):
    """The loss above for a velocity net on a batch of codes z1 ~ q(z|x) = N(mu, exp(logvar)),
    drawn from the codes of all training images, mu and logvar (N, *latent) -> a scalar."""
    i = torch.randint(len(mu), (batch_size,), device=mu.device)
    z1 = reparameterize(mu[i], logvar[i])                           # (B, *latent)
    z0 = torch.randn_like(z1)                                       # noise
    t = torch.sigmoid(torch.randn(batch_size, device=mu.device))   # (B,), logit-normal
    t_ = t.view(-1, *[1] * (z1.dim() - 1))
    v = velocity((1 - t_) * z0 + t_ * z1, t)
    return (v.float() - (z1 - z0)).pow(2).flatten(1).sum(1).mean()


def fit_prior(prior, mu, logvar, steps, batch_size, lr=PRIOR_LR, bf16=False, log=print):
    """Adam on flow_matching_loss, with Part 1's learning-rate schedule, for v_r (steps //
    ROUGH steps), then v (steps) -> the prior, fitted. bf16: their layers in bfloat16."""
    for name, n in (("rough", max(1, steps // ROUGH)), ("velocity", steps)):
        net = getattr(prior, name)
        opt, progress = torch.optim.Adam(net.parameters()), every(30)
        for step in range(n):
            with torch.autocast(mu.device.type, torch.bfloat16, enabled=bf16):
                loss = flow_matching_loss(net, mu, logvar, batch_size)
            adam_step(opt, loss, lr_at(step, n, lr))
            if progress() or step + 1 == n:                    # reading the loss is a sync
                log(f"fitting the prior's {name}: step {step + 1}/{n}  loss {loss.item():.2f}")
    return prior


# ------------------------------------------------------------------ conditioning on wells
# What the regularized latent space is for. Reservoir models are updated to honour data by
# ensemble methods such as ES-MDA, the ensemble smoother with multiple data assimilation
# (Emerick & Reynolds 2013), which assume Gaussian parameters. Facies are not Gaussian, but
# the noise u behind each draw is: ES-MDA moves an ensemble of u until the decoded facies
# match the observations, and every member stays something the decoder draws. Here the
# observations are the facies at K wells (pixels) of a held-out "true" image.
# N members m_j = u_j flattened (P,), forward model g(m) = the decoder's channel probability
# at the wells (K,), observations d_obs (K,) of 0 or 1 with error C_D = sd^2 I (sd = 0.02:
# well facies are hard data). Each of N_a assimilations, inflation alpha (sum of 1/alpha =
# 1, so together they make one full update), does
#   d_j  = d_obs + sqrt(alpha) e_j,  e_j ~ N(0, C_D)                (perturbed observations)
#   m_j <- m_j + C_MD (C_DD + alpha C_D)^-1 (d_j - g(m_j))          (a Kalman-type update)
# with C_MD (P, K) and C_DD (K, K) the ensemble covariances of m with g(m) and of g(m): each
# member moves along the regression of the parameters on the predicted data. For a linear g
# and Gaussian m this samples the exact posterior as the ensemble grows (a test checks it).
# The decoder is not linear, so each update is right only near the ensemble it starts from:
# 16 assimilations rather than the usual 4.
OBS_SD = 0.02
ASSIMILATIONS = 16
MEMBERS = 200
TRUTHS = 20


def esmda(forward, m, d_obs, obs_sd, n_assimilations=ASSIMILATIONS, generator=None):
    """ES-MDA with constant inflation alpha = N_a: the prior ensemble m (N, P), forward
    g(m) (N, K), d_obs (K,) -> the posterior ensemble (N, P)."""
    alpha = float(n_assimilations)
    for _ in range(n_assimilations):
        pred = forward(m)                                            # (N, K)
        n, k = pred.shape
        dm, dd = m - m.mean(0), pred - pred.mean(0)                  # ensemble anomalies
        c_md, c_dd = dm.T @ dd / (n - 1), dd.T @ dd / (n - 1)        # (P, K), (K, K)
        noise = torch.randn(pred.shape, generator=generator, dtype=m.dtype).to(m.device)
        d = d_obs + math.sqrt(alpha) * obs_sd * noise                # (N, K) perturbed
        c_d = obs_sd ** 2 * torch.eye(k, dtype=m.dtype, device=m.device)
        # solve rather than invert: (C_DD + alpha C_D) X = (d - g(m))^T, then m += X^T C_MD^T
        x = torch.linalg.solve(c_dd + alpha * c_d, (d - pred).T)     # (K, N)
        m = m + x.T @ c_md.T
    return m


@torch.no_grad()
def condition_on_wells(model, truth, device, n_wells=16, members=MEMBERS, obs_sd=OBS_SD,
                       assimilations=ASSIMILATIONS, seed=0):
    """ES-MDA on one image: its facies at n_wells random pixels are the data. truth (1, S, S)
    uint8 -> dict: wells (K, 2) as (row, col), obs (K,), and the prior and posterior
    ensembles' decoder probabilities (members, 1, S, S) on the device."""
    if n_wells > truth.numel():
        raise DataError(f"--wells {n_wells}: an image has only {truth.numel()} pixels")
    g = torch.Generator().manual_seed(seed)
    S = truth.shape[-1]
    flat = torch.randperm(S * S, generator=g)[:n_wells]               # (K,) pixel indices
    d_obs = truth.flatten()[flat].float().to(device)                  # (K,) 0 or 1

    def decode(m):                                                    # (N, P) -> (N, 1, S, S)
        return torch.sigmoid(model.decode(model.prior.to_z(m.view(len(m), *model.latent_shape))))

    def forward(m):                                                   # g(m): (N, P) -> (N, K)
        return decode(m).flatten(1)[:, flat.to(device)]

    u = torch.randn(members, *model.latent_shape, generator=g).flatten(1).to(device)   # (N, P)
    post = esmda(forward, u, d_obs, obs_sd, assimilations, generator=g)
    return {"wells": torch.stack([flat // S, flat % S], 1), "obs": d_obs,
            "prior": decode(u), "posterior": decode(post)}


def ensemble_report(probs, wells, obs):
    """How the facies of an ensemble (decoder probabilities (N, 1, S, S)) honour the wells
    (K, 2) of observations obs (K,), their counts (Part 3), and their mean Hamming distance."""
    m = facies(probs)
    return {"wells_honoured": (m[:, 0, wells[:, 0], wells[:, 1]] == obs).float().mean().item(),
            **counts(m), "spread": torch.pdist(m.flatten(1).float(), p=0).mean().item()}


def conditioning_study(model, val_x, device, n_wells=16, seed=0, log=print):
    """ES-MDA on TRUTHS held-out images (all, if fewer), each with its own wells ->
    (summary, the first case for the figure, all posterior members (truths * MEMBERS, 1,
    S, S) 0/1, the truths' held-out indices)."""
    pick = torch.randperm(len(val_x), generator=torch.Generator().manual_seed(seed))[:TRUTHS]
    cases, members = [], []
    for i, idx in enumerate(pick.tolist()):
        res = condition_on_wells(model, val_x[idx], device, n_wells, MEMBERS, OBS_SD,
                                 ASSIMILATIONS, seed + i)
        res = {k: v.cpu() for k, v in res.items()}
        prior, post = (ensemble_report(res[k], res["wells"], res["obs"])
                       for k in ("prior", "posterior"))
        cases.append({"held_out_index": idx, "prior": prior, "posterior": post,
                      "truth_proportion": val_x[idx].float().mean().item(),
                      "spread_ratio": post["spread"] / max(prior["spread"], 1)})
        members.append(facies(res["posterior"]))
        if i == 0:
            first = (val_x[idx], res)                                 # for the figure
        log(f"truth {i + 1}/{len(pick)}: wells honoured {prior['wells_honoured']:.2f} -> "
            f"{post['wells_honoured']:.2f}, pieces {prior['pieces']:.2f} -> {post['pieces']:.2f}")
    summary = {"truths": len(cases), "wells": n_wells, "members": MEMBERS, "obs_sd": OBS_SD,
               "assimilations": ASSIMILATIONS, "prior": model.prior.name}
    for ens in ("prior", "posterior"):                     # each ensemble's means over truths
        summary.update({f"{ens}_{k}": float(np.mean([c[ens][k] for c in cases]))
                        for k in cases[0][ens]})
    summary["spread_ratio"] = float(np.mean([c["spread_ratio"] for c in cases]))
    # the members' net-to-gross over the truths' (1 = unbiased)
    summary["posterior_proportion_over_truth"] = (
        summary["posterior_proportion"] / np.mean([c["truth_proportion"] for c in cases]))
    summary["worst_posterior_wells_honoured"] = min(c["posterior"]["wells_honoured"] for c in cases)
    return {**summary, "cases": cases}, first, torch.cat(members), pick.tolist()


def conditioning_figure(truth, res, title):
    """The truth; then for the prior and the posterior ensemble, the mean and the sd (doubled)
    of the members' facies (thresholded at 0.5), and four members. Wells: red circles in
    channel, white squares in background."""
    rows, titles = [], []
    for name in ("prior", "posterior"):
        m = facies(res[name]).float()                                   # (N, 1, S, S)
        rows.append(torch.cat([truth[None].float(), m.mean(0, keepdim=True),
                               2 * m.std(0, keepdim=True), m[:4]]))
        titles.append(["truth and wells", f"{name}: mean", f"{name}: sd x 2",
                       *[f"{name} member {i + 1}" for i in range(4)]])
    fig = show_grid(rows, title, panel=1.6, panel_titles=titles)
    wells, obs = res["wells"], res["obs"].bool()
    step, col = panel_pitch(truth.shape[-1], titled=True)
    for i in range(2):                     # each panel's origin in show_grid's one image
        for j in range(len(rows[0])):
            y, x = wells[:, 0] + i * step, wells[:, 1] + j * col
            fig.axes[0].scatter(x[obs], y[obs], marker="o", s=30, c="red", edgecolors="white")
            fig.axes[0].scatter(x[~obs], y[~obs], marker="s", s=24, c="white", edgecolors="black")
    return fig
# =============================================================================================
# Part 3: measuring and plumbing
# =============================================================================================
# ------------------------------------------------------------------ the synthetic stand-in
# Each image is drawn like an object-based facies model: up to three channels whose
# centrelines are leaning sine curves, x(y) = x_mid - tan(lean) (y - S/2) + amp sin(k y +
# phase), rasterized with a constant width, younger over older. It draws within about the
# ranges measured on re-digitized real images (13 are in results/real_reference.npz): 1-3
# channels, usually 2; leans of 1-22 degrees, median about 7; wavelengths of 120-190 px;
# half-amplitudes of 10-35 px; widths of 4-16 px, then 0.85-1.15 times that per image (the
# real images: proportion 0.21 +- 0.06). The distributions were chosen, then checked against
# the 13 images by --compare-data.

NATIVE = 128                    # the real images are 128x128
DEFAULT_DATA = Path("data/train_images.h5")
SYNTHETIC_DATA = Path("data/synthetic_train_images.h5")
SYNTHETIC_N = 50_000            # as many images as the real file holds
SYNTHETIC_VERSION = 1           # bump when make_synthetic_channels changes; the cache is rebuilt
REAL_REFERENCE = Path(__file__).resolve().parent / "results" / "real_reference.npz"


def make_synthetic_channels(n, size=NATIVE, seed=0, distinct=False):
    """n binary images in the real file's layout: uint8 (n, size, size, 1), values 0/1."""
    return np.concatenate(list(synthetic_chunks(n, size, seed, distinct=distinct)))


def synthetic_chunks(n, size=NATIVE, seed=0, chunk=500, distinct=False):
    """The images of make_synthetic_channels, `chunk` at a time, (B, size, size, 1) uint8:
    all random numbers are drawn first, so the images do not depend on the chunk size,
    and 50k images can be written to disk without holding them all (0.8 GB). distinct:
    each image a layout of its own (a reference set with no near-copies inside it)."""
    rng = np.random.default_rng(seed)
    S, f, K = size, size / NATIVE, 3   # f scales the 128-px geometry; K = most channels per image
    # layouts: each is reused ~4 times, shifted and re-widened, as the real images are
    # cut-outs of a few larger models (unless distinct)
    L = n if distinct else max(1, n // 4)
    # --- one layout = up to K channels, oldest first; every parameter is (L, K)
    n_ch = rng.choice([1, 2, 3], size=L, p=[0.15, 0.55, 0.30])
    active = np.arange(K) < n_ch[:, None]
    lean = np.clip(rng.lognormal(math.log(7), 0.45, (L, 1)) + rng.normal(0, 2.5, (L, K)), 1, 22)
    tan = np.tan(np.radians(lean))          # the centreline drifts left tan(lean) px per row
    k = 2 * np.pi / (rng.uniform(120, 190, (L, K)) * f)                  # wavenumber
    amp = np.clip(rng.lognormal(math.log(27), 0.3, (L, K)), 10, 35) * f  # half-amplitude
    phase = rng.uniform(0, 2 * np.pi, (L, K))
    width = np.clip(rng.lognormal(math.log(11), 0.25, (L, K)), 4, 16) * f  # differs per channel
    x_mid = np.zeros((L, K))                # where a centreline crosses mid-height, drawn below

    # Real channels cross in X shapes but never run side by side: redraw x_mid for layouts
    # where two centrelines stay closer than their half-widths + 6 px on > 12% of the rows.
    rows = np.linspace(0, S - 1, 33)
    redraw = np.ones(L, bool)
    for _ in range(30):
        x_mid[redraw] = rng.uniform(0.15, 0.85, (redraw.sum(), K)) * S
        cx = x_mid[..., None] - tan[..., None] * (rows - S / 2) \
            + amp[..., None] * np.sin(k[..., None] * rows + phase[..., None])     # (L, K, 33)
        redraw[:] = False
        for i in range(K):
            for j in range(i + 1, K):
                gap = (width[:, i, None] + width[:, j, None]) / 2 + 6 * f
                close = np.abs(cx[:, i] - cx[:, j]) < gap
                redraw |= active[:, j] & (close.mean(1) > 0.12)
        if not redraw.any():
            break

    # Truncated channels (a straight cut inside the frame) and dashed ones (a 10-20 px gap),
    # placed along the centreline so that the cuts are square to the channel.
    fate, where = rng.random((L, K)), rng.uniform(0.25, 0.75, (L, K)) * S
    fate[:, 0] = 1                                  # the oldest channel runs the full length
    start = np.where(fate < 0.08, where, -np.inf)
    end = np.where((fate >= 0.08) & (fate < 0.16), where, np.inf)
    gap0 = np.where(rng.random((L, K)) < 0.08, rng.uniform(0.2, 0.8, (L, K)) * S, np.inf)
    gap1 = gap0 + rng.uniform(10, 20, (L, K)) * f

    # --- each image takes one layout, shifted by up to 20 px and re-widened by up to 15 %
    pick = np.arange(n) if distinct else rng.integers(0, L, n)
    par = dict(active=active, tan=tan, k=k, amp=amp, phase=phase, x_mid=x_mid, width=width,
               start=start, end=end, gap0=gap0, gap1=gap1)
    par = {key: torch.as_tensor(v[pick], dtype=torch.float32) for key, v in par.items()}  # (n, K)
    par["x_mid"] += torch.as_tensor(rng.uniform(-20, 20, (n, 1)) * f, dtype=torch.float32)
    par["width"] *= torch.as_tensor(rng.uniform(0.85, 1.15, (n, 1)), dtype=torch.float32)
    shift_y = torch.as_tensor(rng.uniform(-20, 20, (n, 1, 1)) * f, dtype=torch.float32)

    # --- rasterize in chunks: every array below is (B, S, S) or broadcasts to it
    xs = torch.arange(S, dtype=torch.float32).view(1, 1, S)
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        y = torch.arange(S, dtype=torch.float32).view(1, S, 1) + shift_y[c0:c1]   # (B, S, 1)
        img = torch.zeros(c1 - c0, S, S, dtype=torch.bool)
        for j in range(K):
            p = {key: v[c0:c1, j].view(-1, 1, 1) for key, v in par.items()}
            phi = p["k"] * y + p["phase"]
            centre = p["x_mid"] - p["tan"] * (y - S / 2) + p["amp"] * torch.sin(phi)  # (B, S, 1)
            slope = -p["tan"] + p["amp"] * p["k"] * torch.cos(phi)                    # dx/dy
            dx = xs - centre                                                          # (B, S, S)
            cos = torch.rsqrt(1 + slope * slope)
            dist = dx.abs() * cos              # distance to the centreline's local tangent
            along = y + slope * dx * cos * cos  # row of the foot of that perpendicular
            keep = (p["active"] > 0) & (along >= p["start"]) & (along <= p["end"])
            keep &= (along < p["gap0"]) | (along > p["gap1"])
            half = p["width"] / 2
            img &= ~(keep & (dist <= half + 1))  # the younger channel cuts the older ones,
            img |= keep & (dist <= half)         # leaving a one-pixel line of background
        # An opening with a 3x3 cross removes the 1-px slivers that shallow cuts leave behind.
        pad = F.pad(img, (1, 1, 1, 1))
        core = img & pad[:, :-2, 1:-1] & pad[:, 2:, 1:-1] & pad[:, 1:-1, :-2] & pad[:, 1:-1, 2:]
        pad = F.pad(core, (1, 1, 1, 1))
        img &= core | pad[:, :-2, 1:-1] | pad[:, 2:, 1:-1] | pad[:, 1:-1, :-2] | pad[:, 1:-1, 2:]
        yield img.numpy().astype(np.uint8)[..., None]                              # (B, S, S, 1)


def synthetic_data(log=print):
    """The path of the synthetic stand-in, made once (50k images, about 25 s)."""
    if SYNTHETIC_DATA.is_file():
        with h5py.File(SYNTHETIC_DATA, "r") as f:
            if f.attrs.get("version") == SYNTHETIC_VERSION:
                return SYNTHETIC_DATA
    log(f"generating {SYNTHETIC_N:,} synthetic images -> {SYNTHETIC_DATA} (once) ...")
    write_h5(SYNTHETIC_DATA, synthetic_chunks(SYNTHETIC_N, seed=0), version=SYNTHETIC_VERSION)
    return SYNTHETIC_DATA


def real_reference(size):
    """The 13 re-digitized real images (results/real_reference.npz beside this file) ->
    uint8 (13, 1, size, size), or None if the file is not there (vae.py copied alone)."""
    if not REAL_REFERENCE.is_file():
        print(f"{REAL_REFERENCE} not found: the 13 real images are left out")
        return None
    return as_images(np.load(REAL_REFERENCE)["images"], size)


def data_name(path):
    return "the synthetic stand-in" if Path(path) == SYNTHETIC_DATA else str(path)


def get_data(path, size, log=print):
    """--data, else data/train_images.h5 if it is there, else the synthetic stand-in ->
    (uint8 images (N, 1, size, size), the file they came from)."""
    if path is None and not DEFAULT_DATA.is_file():
        log(f"{DEFAULT_DATA} not found: using the synthetic stand-in. The real data: {DATA_URL}")
        path = SYNTHETIC_DATA
    path = Path(path or DEFAULT_DATA)
    if path == SYNTHETIC_DATA:
        synthetic_data(log)                                 # made once
    return load_images(path, size), path


# ----------------------------------------------------------------------------- realism scores
# Two questions are asked of a set of generated images. Can they be told from data? A
# classifier two-sample test (C2ST; Lopez-Paz & Oquab 2017) trains a small CNN to tell N of
# them from N reference images, and scores each image once by cross-fitting: the 2N images
# are cut into two folds, a classifier trained on one fold labels the other, and the other
# way round (each trains until its loss on a fifth of its fold, held back, stops falling). The
# score is the share labelled right: 0.5 when the classifier finds nothing to tell the sets
# apart by, 1.0 when it always can; over 2N labels its 95% interval is +-1.96 sqrt(p(1-p)/2N).
# Why it can be trusted: it judges whole images, with no feature chosen for channels; it is
# nearly translation-invariant (3x3 convolutions, then each feature's mean and maximum over the
# image), so a break anywhere in a channel counts as much as anywhere else; a test shows that
# it tells images with one channel cut by a 3-pixel gap from intact ones; two sets of data
# score 0.5 within the interval and N(0, I) draws nearly 1. It bounds from below: the best
# possible classifier is right 1/2 + TV/2 of the time (TV: the total variation distance of the
# two distributions), so a score near 0.5 says that this classifier found no difference, not
# that none exists. The reference shares no layout with training where the data allow (the
# stand-in: images of a new seed), so that copying training images earns nothing.
# And do they have the data's numbers? The counts a geologist reads: channel proportion
# (net-to-gross), separate channel bodies, bodies that cross the image top to bottom as flow
# paths do, channel width, and the share of nearly empty images.
C2ST_WIDTHS = (8, 16, 32, 64)          # the classifier's channels, one stage each


class Critic(nn.Module):
    """The C2ST's classifier: (B, 1, S, S) -> one logit per image (B,), "the second set".
    Each stage is a 3x3 convolution, then 2x2 max-pooling (but the last), batch norm and ReLU
    (pooling before them does their work on a quarter of the pixels)."""

    def __init__(self, widths=C2ST_WIDTHS):
        super().__init__()
        chans, layers = [1, *widths], []
        for i, (a, b) in enumerate(zip(chans[:-1], chans[1:])):
            layers += [nn.Conv2d(a, b, 3, 1, 1, bias=False)]
            layers += [nn.MaxPool2d(2)] if i < len(widths) - 1 else []
            layers += [nn.BatchNorm2d(b), nn.ReLU()]
        self.features = nn.Sequential(*layers)             # (B, widths[-1], S/8, S/8)
        self.out = nn.Linear(2 * widths[-1], 1)

    def forward(self, x):
        h = self.features(x)
        return self.out(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))[:, 0]


@torch.enable_grad()                    # also when called from evaluation under no_grad
def c2st(a, b, device, seed=0, batch_size=64, lr=2e-3, patience=5, max_epochs=30, bf16=False):
    """The C2ST of binary images a and b (N, 1, S, S) -> (accuracy, half-width of its 95%
    interval), both floats."""
    n = min(len(a), len(b))
    x = torch.cat([a[:n], b[:n]]).to(device)
    y = (torch.arange(2 * n, device=device) >= n).float()            # 1: an image of b
    g = torch.Generator().manual_seed(seed)
    fold = torch.randperm(2 * n, generator=g).to(device) % 2
    right = 0.0
    for k in (0, 1):
        test, rest = torch.nonzero(fold == k)[:, 0], torch.nonzero(fold != k)[:, 0]
        rest = rest[torch.randperm(len(rest), generator=g).to(device)]
        held, fit = rest[:len(rest) // 5], rest[len(rest) // 5:]
        with torch.random.fork_rng(devices=[]):      # its own seed, the global one untouched
            torch.manual_seed(seed + k)
            net = Critic().to(device, memory_format=torch.channels_last)
        opt = torch.optim.Adam(net.parameters())

        def logits(i):                                             # (len(i),) in fp32
            with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
                return net(to_float(x[i], device)).float()
        best, waited, state, b = math.inf, 0, net.state_dict(), min(batch_size, len(fit))
        for epoch in range(max_epochs):
            net.train()
            order = fit[torch.randperm(len(fit), generator=g).to(device)]
            for i in order[:len(order) // b * b].view(-1, b):
                adam_step(opt, F.binary_cross_entropy_with_logits(logits(i), y[i]), lr)
            net.eval()
            with torch.no_grad():
                loss = F.binary_cross_entropy_with_logits(logits(held), y[held]).item()
            if loss < best:
                best, waited, state = loss, 0, copy.deepcopy(net.state_dict())
            elif (waited := waited + 1) == patience:
                break
        net.load_state_dict(state)
        with torch.no_grad():
            said = torch.cat([logits(i) for i in test.split(500)]) > 0
            right += (said == (y[test] > 0)).sum().item()
    p = right / (2 * n)
    return p, 1.96 * math.sqrt(p * (1 - p) / (2 * n))


def horizontal_runs(m):
    """m: (B, H, W) bool -> (B, H, W) id of the horizontal run of 1s each pixel is in
    (0 = none). Ids are unique across the whole batch."""
    left = F.pad(m, (1, 0))[..., :-1]                 # the pixel to the left, False at the edge
    return torch.cumsum((m & ~left).flatten(), 0).view(m.shape) * m


def connected_components(m):
    """4-connected labelling. m: (B, H, W) bool -> int64 labels, 0 = background, unique
    across the batch. Each channel pixel starts with its own label; the loop alternates
    taking the largest label along every horizontal run and every vertical run until nothing
    changes (a channel that winds k times needs about k rounds, not one per pixel)."""
    on = m.flatten()
    if not on.any():                                   # no channel pixel at all
        return torch.zeros(m.shape, dtype=torch.long, device=m.device)
    row_id = horizontal_runs(m).flatten()[on]                                   # (P,)
    col_id = horizontal_runs(m.transpose(1, 2)).transpose(1, 2).flatten()[on]   # (P,)
    label = torch.nonzero(on).squeeze(1) + 1                                     # (P,)
    while True:
        before = label
        for run in (row_id, col_id):
            best = label.new_zeros(int(run.max()) + 1)
            label = best.scatter_reduce_(0, run, label, "amax")[run]
        if torch.equal(label, before):
            break
    out = label.new_zeros(m.numel())
    out[on] = label
    return out.view(m.shape)


def pieces_and_spanning(m):
    """Per image of m (B, H, W) bool: its 4-connected channel pieces, and those that run from
    the top edge to the bottom edge, as flow paths do -> two int64 (B,) tensors."""
    lab = connected_components(m)
    labels, piece_of = torch.unique(lab.flatten()[m.flatten()], return_inverse=True)
    image = torch.arange(len(m), device=m.device).repeat_interleave(m[0].numel())[m.flatten()]
    owner = labels.new_zeros(len(labels)).scatter_(0, piece_of, image)                # (Q,)
    spans = torch.isin(labels, lab[:, 0]) & torch.isin(labels, lab[:, -1])            # (Q,)
    return torch.bincount(owner, minlength=len(m)), torch.bincount(owner[spans], minlength=len(m))


def run_widths(m):
    """Widths of the horizontal runs of 1s that do not touch the left or right edge (those
    are cut by the frame): m (B, H, W) bool -> (widths (R,), image index (R,))"""
    ids = horizontal_runs(m)
    lengths = torch.bincount(ids.flatten())
    image = torch.zeros_like(lengths).scatter_(
        0, ids.flatten(), torch.arange(len(m), device=m.device).repeat_interleave(m[0].numel()))
    keep = lengths > 0
    keep[ids[..., 0]] = False
    keep[ids[..., -1]] = False
    return lengths[keep], image[keep]


def image_statistics(x):
    """Per-image statistics of binary images (N, 1, H, W) -> dict of (N,) numpy arrays. The
    host boundary: the counts read their values (numpy, unique), so the images go to the CPU
    here, once, from whatever device made them."""
    m = x[:, 0].bool().cpu()
    widths, image = run_widths(m)
    per_image = np.split(widths.numpy(), np.searchsorted(image.numpy(), np.arange(1, len(m))))
    count, spanning = pieces_and_spanning(m)
    return {"proportion": m.float().mean((1, 2)).numpy(), "pieces": count.numpy(),
            "top-to-bottom channels": spanning.numpy(),
            "channel width (median)": np.array([np.median(v) if len(v) else np.nan
                                                for v in per_image])}


def counts(x):
    """The means over binary images x (N, 1, H, W) of image_statistics, and the share of
    nearly empty images (under 5% channel) -> dict of floats."""
    stats = image_statistics(x)
    means = {k: v[~np.isnan(v)].mean() if (~np.isnan(v)).any() else np.nan   # width: NaN if
             for k, v in stats.items()}                                       # no channel
    return {**{k: float(v) for k, v in means.items()},
            "near-empty": float((stats["proportion"] < 0.05).mean())}


def hamming(a, b):
    """Pairwise Hamming distances between binary images: (A, ...) x (B, ...) -> (A, B).
    |a - b| = |a| + |b| - 2 a.b, so one matrix product does all pairs."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    return a.sum(1, keepdim=True) + b.sum(1) - 2 * a @ b.T


def nearest(queries, pool, chunk=4096):
    """Each query image's nearest image in pool -> Hamming distances (Q,), indices (Q,), on the
    queries' device; a chunk of the pool at a time (each chunk is a (Q, chunk) matrix)."""
    best = torch.full((len(queries),), float("inf"), device=queries.device)
    index = torch.zeros(len(queries), dtype=torch.long, device=queries.device)
    for i in range(0, len(pool), chunk):
        d, j = hamming(queries, pool[i:i + chunk].to(queries.device)).min(1)
        index = torch.where(d < best, j + i, index)
        best = torch.minimum(d, best)
    return best, index


def memorisation(x, train_x, held_px):
    """How near images x lie to the training images, over how near held-out images lie
    (held_px: their median distance to the nearest one) -> (ratio, x's median distance).
    Below 1, x are nearer the training images than unseen data are: copies; None where
    held_px is 0 (most held-out images have exact copies in training)."""
    near = nearest(x, train_x)[0].median().item()
    return (near / held_px if held_px else None), near


# ----------------------------------------------------------------------------- evaluation

def reconstruct(model, images, device):
    """uint8 images (N, 1, S, S) -> decoder probabilities at their posterior means."""
    return decode_probs(model, encode_all(model, images, device)[0])


def recon_accuracy(model, images, device):
    """The share of pixels that the reconstruction's facies get right."""
    return (facies(reconstruct(model, images, device)) == images.to(device)).float().mean().item()


@torch.no_grad()
def evaluate(model, train_x, val_x, device, n=2000, seed=0, real=None, reference=None,
             bf16=False):
    """The metrics of a trained model -> dict (metrics.json). val_x should hold 2n images:
    the first n give the -ELBO and reconstruction, the other n are the "data" set. Every set
    of n images is compared with reference (n images; None: the first n of val_x)."""
    model.eval()
    torch.manual_seed(seed)
    n = min(n, len(val_x) // 2)
    held, other = val_x[:n].to(device), val_x[n:2 * n].to(device)   # the scores run there
    reference = held if reference is None else reference[:n].to(device)
    neg, rec, kl = validate(model, held, device, 1.0)               # nats per image
    mu, logvar = encode_all(model, other, device)
    out = {"n": n, "prior": model.prior.name, "neg_elbo": neg, "elbo_rec": rec, "elbo_kl": kl,
           "recon_accuracy": recon_accuracy(model, held, device),
           "real_recon_accuracy": None if real is None else recon_accuracy(model, real, device),
           # a latent number is active if its posterior mean moves with the image (Burda et
           # al. 2015); one that the decoder ignores stays at the prior whatever the image
           "active_units": int((mu.flatten(1).var(0) > 0.01).sum()), "latent_dim": mu[0].numel()}
    # the sets compared with the reference: draws of the model's prior and, through the same
    # decoder, of N(0, I); "codes", z ~ q(z|x) of the other held-out images decoded, what a
    # prior that matched the codes exactly would give; "data"
    g = torch.Generator().manual_seed(seed)
    priors = {p.name: p for p in (model.prior, StandardNormal())}     # one, for N(0, I) models
    sets = {name: facies(draw(model, n, g, prior=p)) for name, p in priors.items()}
    sets.update(codes=facies(decode_probs(model, reparameterize(mu, logvar, g))), data=other)
    held_px = nearest(held, train_x)[0].median().item()      # pixels to the nearest one
    out["scores"] = {}
    for name, x in sets.items():
        p, half = c2st(x, reference, device, seed, bf16=bf16)
        ratio, near = memorisation(x, train_x, held_px)
        out["scores"][name] = {"c2st": p, "c2st_95": [p - half, p + half], **counts(x),
                               "nearest_px": near, "memorisation": ratio}
    if len(model.latent_shape) > 1:        # fullyconv: fields twice as wide and tall
        _, h, w = model.latent_shape
        out["large_field"] = counts(facies(draw(model, n // 4, g, (2 * h, 2 * w))))
    return out


# ----------------------------------------------------------------------------- reports

@torch.no_grad()
def more_figures(model, train_x, val_x, history, out, device, note, real=None, seed=0):
    """reconstructions.png, nearest.png, losses.png and, for fullyconv, large_field.png."""
    model.eval()
    rows, labels = [], []
    for x, name in ((val_x[:8], "held-out"), (val_x[8:16], "held-out"), (real, "real")):
        if x is not None and len(x):
            rows += [x[:8].float(), reconstruct(model, x[:8], device)]
            labels += [name, "recon"]
    save_figure(show_grid(rows, f"{note}: inputs and reconstructions from the posterior mean",
                          labels), out / "reconstructions.png")

    # copying check: prior samples (thresholded) above their nearest training images, and
    # held-out images above theirs, for scale (the data hold shifted near-copies)
    g = torch.Generator().manual_seed(seed)
    samples = facies(draw(model, 8, g))
    (ds, js), (dh, jh) = nearest(samples, train_x), nearest(val_x[:8].to(device), train_x)
    fig = show_grid([samples, train_x[js], val_x[:8], train_x[jh]],
                    f"{note}\neach prior sample and held-out image above its nearest training "
                    f"image; d = Hamming distance to it in pixels",
                    ["prior sample", "nearest train", "held-out", "nearest train"],
                    panel_titles=[[f"d = {d:.0f}" for d in ds], None,
                                  [f"d = {d:.0f}" for d in dh], None])
    save_figure(fig, out / "nearest.png")

    if len(model.latent_shape) > 1:        # only a fully convolutional decoder can do this
        c, h, w = model.latent_shape
        fields = draw(model, 6, g, grid=(2 * h, 2 * w))
        fig = show_grid([fields[:3], fields[3:]], f"{note}: six {fields.shape[-1]}x"
                        f"{fields.shape[-1]} fields (4x the training area)\nfrom ({c}, {2 * h}, "
                        f"{2 * w}) latent grids through {model.prior.title}", panel=3.2)
        save_figure(fig, out / "large_field.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, term in zip(axes, ("rec", "kl")):
        train, val = history[f"train_{term}"], history[f"val_{term}"]
        ax.plot(history["epoch"], train, "o-", label="train")
        ax.plot(history["epoch"], val, "s-", label="held-out")
        ax.set(xlabel="epoch", ylabel="nats per image",
               title={"rec": "reconstruction  -log p(x|z)", "kl": "KL(q(z|x) || p(z))"}[term])
        ax.legend()
        if len(train) > 2:             # scale to epochs 2+: epoch 1 would flatten the rest
            ax.set_ylim(min(train[1:] + val[1:]) * 0.98, max(train[1:] + val[1:]) * 1.02)
    fig.suptitle(f"{note}: loss terms per epoch (the first may lie above the axis)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out / "losses.png")


def markdown_table(header, rows):
    """A header and rows of cells -> a markdown table."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines) + "\n"


RUNS = [f"{a}{suffix}" for a in ARCHS for suffix in ("", "-gaussian")]     # results/ folders
SCORES = ("c2st", "c2st_95", "proportion", "pieces", "top-to-bottom channels",
          "channel width (median)", "near-empty", "nearest_px", "memorisation")
MODEL_FACTS = ("neg_elbo", "recon_accuracy", "real_recon_accuracy", "active_units",
               "train_minutes", "train_img_per_s", "train_device")


def write_comparison(results_dir, held, device):
    """results/comparison.md: the scores of the runs in results_dir; samples_side_by_side.png:
    real images, held-out images and each run's prior draws."""
    runs = {f: read_json(results_dir / f / "metrics.json", {}) for f in RUNS}
    # runs of older versions of this file, without the C2ST's interval, are left out
    runs = {f: m for f, m in runs.items() if "c2st_95" in m.get("scores", {}).get("data", {})}
    if not runs:
        return

    def cell(v):
        return ("" if v is None else v if isinstance(v, str) else f"{v:.4g}" if not
                isinstance(v, list) else "-".join(f"{x:.3f}" for x in v))
    rows = [[f"{folder}: {name}", *[cell(m["scores"][name].get(k)) for k in SCORES]]
            for folder, m in runs.items() for name in m["scores"] if name != "data"]
    first = next(iter(runs.values()))
    rows.append(["data: held-out images", *[cell(first["scores"]["data"].get(k)) for k in SCORES]])
    facts = [[folder, *[cell(m.get(k)) for k in MODEL_FACTS], cell(m["code_version"]["git_commit"])]
             for folder, m in runs.items()]
    write_text(results_dir / "comparison.md",
               f"Each set of {first['n']} images (decoded at 0.5) against {first['n']} reference "
               f"images ({first['reference']}) of {first['data']}: c2st is the share of them a "
               f"classifier tells apart, cross-fitted (0.5: none), c2st_95 its 95% interval; the "
               f"counts are means per image; nearest_px is the median distance in pixels to the "
               f"nearest training image, and memorisation that over the held-out images' own "
               f"(below 1: nearer). \"learned\" and \"gaussian\" are prior draws through the "
               f"same decoder; \"codes\" decodes z ~ q(z|x) of held-out images, what a prior "
               f"matching the codes exactly would give.\n\n"
               + markdown_table(["images", *SCORES], rows) + "\n"
               + markdown_table(["model", *MODEL_FACTS, "code version"], facts))
    real = real_reference(held.shape[-1])
    rows = [held[:10].float()] if real is None else [real[:10].float(), held[:10].float()]
    labels = ([] if real is None else ["real"]) + [first["data"].replace("the ", "")]
    for folder in (f for f in runs if (results_dir / f / "model.pt").is_file()):
        try:
            model = load_model(results_dir / folder / "model.pt", device)
        except DataError as e:                  # older or unreadable: its own command
            print(f"left out of the figure: {e}")     # remakes it; the table is kept
            continue
        for prior in {p.name: p for p in (model.prior, StandardNormal())}.values():
            rows.append(draw(model, 10, torch.Generator().manual_seed(1), prior=prior))
            labels.append(f"{folder},\n{prior.title.split(' z = ')[0]}")   # two lines fit
    fig = show_grid(rows, "real images (re-digitized), held-out images, and decoder probabilities "
                    "of prior draws of each VAE", labels)
    save_figure(fig, results_dir / "samples_side_by_side.png")


def compare_data(out, n=5000, seed=1):
    """--compare-data: the synthetic stand-in against the 13 real images, a table and a figure."""
    real = real_reference(NATIVE)
    if real is None:
        raise DataError(f"{REAL_REFERENCE}: file not found; --compare-data needs the real images")
    synth = as_images(make_synthetic_channels(n, seed=seed), NATIVE)
    rs, ss = image_statistics(real), image_statistics(synth)
    rows = []
    for key in rs:
        r, s = rs[key][~np.isnan(rs[key])], ss[key][~np.isnan(ss[key])]
        rows.append([key, f"{r.min():.3g} - {r.max():.3g}", f"{r.mean():.3g} ({r.std():.2g})",
                     f"{s.mean():.3g} ({s.std():.2g})", "yes" if r.min() <= s.mean() <= r.max()
                     else "NO"])
    table = markdown_table(["statistic (per image, 128x128)", f"real: min - max (n = {len(real)})",
                            "real: mean (sd)", f"synthetic: mean (sd) (n = {n})",
                            "synthetic mean inside real range"], rows)
    write_text(out / "data_comparison.md", f"Made by `python vae.py --compare-data` ({n} "
               f"synthetic images, seed {seed}).\n\n{table}")
    fig = show_grid([real.float(), synth[:len(real)].float()], "top: 13 real images "
                    "(re-digitized); bottom: 13 synthetic stand-in images", ["real", "synthetic"])
    save_figure(fig, out / "data_real_vs_synthetic.png")
    print(table, end="")


# ------------------------------------------------------------------ files and checkpoints
# Every file is written to a temporary name and renamed, so that a crash or Ctrl-C midway
# leaves the old file or none, never half of one. Model files hold plain tensors and values
# only, and are loaded with weights_only=True, which refuses pickled code.

@contextmanager
def atomic(path):
    """Write to path.tmp, then rename it onto path."""
    tmp = Path(f"{path}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_figure(fig, path):
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def write_text(path, text):
    with atomic(path) as tmp:
        tmp.write_text(text)


def write_h5(path, parts, **attrs):
    """Images, an iterable of (B, S, S, 1) uint8 arrays -> an HDF5 file in the real file's
    layout. The dataset grows part by part, so the images are never all in memory."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic(path) as tmp, h5py.File(tmp, "w") as f:
        d = None
        for part in parts:
            if d is None:                   # the first part sets the image shape
                d = f.create_dataset(KEY, shape=(0, *part.shape[1:]), dtype=np.uint8,
                                     maxshape=(None, *part.shape[1:]), compression="gzip",
                                     chunks=(64, *part.shape[1:]))
            d.resize(len(d) + len(part), axis=0)
            d[-len(part):] = part
        f.attrs.update(attrs)


@torch.no_grad()
def write_samples(model, n, path, grid=None, seed=0, batch_size=500):
    """--sample: the facies of n prior draws -> path, uint8 (n, S, S, 1), batch by batch."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    parts = (facies(draw(model, min(batch_size, n - i), g, grid)).permute(0, 2, 3, 1).cpu()
             .numpy() for i in range(0, n, batch_size))
    write_h5(path, parts, arch=model.arch, prior=model.prior.name, seed=seed)


def code_version():
    """Which code made a file: the sha256 of this vae.py (12 hex digits) and, in a git
    checkout, the commit, with "+changes" when vae.py differs from it."""
    import hashlib
    import subprocess
    here = Path(__file__).resolve()
    git = ["git", "-C", str(here.parent)]
    try:
        commit = subprocess.run(git + ["rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or None
        if commit and subprocess.run(git + ["diff", "--quiet", "HEAD", "--", here.name]).returncode:
            commit += "+changes"
    except OSError:                                 # no git: the hash alone names the code
        commit = None
    return {"vae_py_sha256": hashlib.sha256(here.read_bytes()).hexdigest()[:12],
            "git_commit": commit}


def model_config(model):
    """What rebuilds `model`: plain values, safe to save and load."""
    cfg = {"arch": model.arch, "size": model.size, "widths": list(model.widths),
           "prior": model.prior.name}
    cfg["latent_dim" if model.arch == "dense" else "latent_channels"] = model.latent_shape[0]
    if model.prior.name == "learned":           # and how it draws: a later default must not
        p = model.prior                         # change a saved model's samples
        cfg.update(prior_hidden=p.hidden, prior_depth=p.depth, ode_steps=p.steps,
                   guidance=p.guidance)
    return cfg


def build_from_config(cfg):
    """build_model, then Part 2's learned prior where cfg asks for it."""
    cfg = dict(cfg)
    prior = [cfg.pop(k, None) for k in ("prior", "prior_hidden", "prior_depth", "ode_steps",
                                        "guidance")]
    model = build_model(cfg.pop("arch"), **cfg)
    if prior[0] == "learned":
        model.prior = LearnedPrior(model.latent_shape, *prior[1:])
    return model


def load_file(path, what):
    """torch.load onto the CPU with weights_only=True: plain tensors and containers only.
    Every failure, a refused pickled object included, ends in one line."""
    try:
        with warnings.catch_warnings():     # torch's own notes on a foreign pickle: the one
            warnings.simplefilter("ignore")  # line below says what is wrong with the file
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a {what}") from None
    except Exception as e:
        why = ("holds pickled Python objects, which could run code; refused" if "GLOBAL" in str(e)
               else f"corrupt or not a PyTorch file ({type(e).__name__})")
        raise DataError(f"{path}: not a readable {what} of this script: {why}") from None


def save_model(model, path):
    """model.pt: the weights and the config that rebuilds the model (no pickled code)."""
    with atomic(path) as tmp:
        torch.save({"config": model_config(model), "state_dict": model.state_dict()}, tmp)


def load_model(path, device="cpu"):
    """A model saved by save_model -> the model, in eval mode, on the device."""
    saved = load_file(path, "model file")
    try:
        model = build_from_config(saved["config"])
        model.load_state_dict(saved["state_dict"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"{path}: not a model file of this script, or one saved by another "
                        f"version of it ({type(e).__name__})") from None
    return model.to(device, memory_format=torch.channels_last).eval()


def read_json(path, default=None):
    try:
        return json.loads(path.read_text()) if path.is_file() else default
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not readable JSON ({e})") from None


def write_json(path, value):
    write_text(path, json.dumps(value, indent=2) + "\n")


# ----------------------------------------------------------------------------- command line
EPOCHS = {"dense": 24, "fullyconv": 20}     # 9-11 min on 2 cores with native bf16


def number(cast, low, strict=False):
    """A type for argparse: a finite number >= low (> low if strict)."""
    def parse(text):
        value = cast(text)
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} "
                                             f"{low}, not {text}")
        return value
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train VAEs that generate channel facies images.")
    count, add = number(int, 1), p.add_argument
    add("--arch", choices=list(ARCHS), help="dense: vector latent; fullyconv: no dense layer "
        "(required, except with --compare-data)")
    add("--prior", choices=["learned", "gaussian"], default="learned", help="learned: fitted "
        "to the codes after training; gaussian: the plain VAE's N(0, I) (default: learned)")
    # the flags that shape the model or change the run default to None: a checkpoint or a
    # trained model brings its own values, else DEFAULTS
    add("--size", type=int, choices=[64, NATIVE], help="image size to train at (default: 64)")
    add("--epochs", type=count, help=f"passes over the data (default: {EPOCHS['dense']} dense, "
        f"{EPOCHS['fullyconv']} fullyconv); --resume with more adds them at the final rate")
    add("--batch-size", type=count, help=f"(default: {BATCH_SIZE})")
    add("--lr", type=number(float, 0, strict=True), help=f"peak learning rate (default: {LR})")
    add("--beta", type=number(float, 0), help="KL weight; 1 = the ELBO (default: 1)")
    add("--warmup", type=number(float, 0),
        help=f"epochs over which the KL weight rises from 0 (default: {KL_WARMUP:g})")
    add("--prior-steps", type=count, help=f"Adam steps of the prior's fit (default: "
        f"{PRIOR_STEPS['dense']} dense, {PRIOR_STEPS['fullyconv']} fullyconv)")
    add("--latent-dim", type=count, help="dense (default: 32)")
    add("--latent-channels", type=count, help="fullyconv, on a size/16 grid (default: 8)")
    add("--widths", type=count, nargs="+", metavar="W",
        help=f"channels per stride-2 stage (default: {' '.join(map(str, WIDTHS))})")
    add("--fp32", action="store_true", help="no bf16 (default: bf16 where the hardware has it)")
    add("--seed", type=int, help="sets the split, the weights and the noise (default: 0)")
    add("--data", help=f"HDF5 file (default: {DEFAULT_DATA}, else the synthetic stand-in)")
    add("--out", type=Path, help="output folder (default: results/<arch>[-gaussian])")
    add("--device", default="auto", help="cpu, cuda, mps, ... (default: auto)")
    add("--resume", type=Path, nargs="?", const="auto", metavar="CKPT",
        help="go on from a checkpoint (default: <out>/checkpoint.pt)")
    add("--eval-n", type=count, default=2000, help="images per scored set (default: 2000)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--evaluate", action="store_true", help="figures and metrics of "
                      "<out>/model.pt (its seed and data unless named)")
    mode.add_argument("--sample", type=count, metavar="N", help="N samples -> <out>/samples.h5")
    mode.add_argument("--condition", action="store_true", help="ES-MDA on wells of held-out images")
    mode.add_argument("--compare-data", action="store_true", help="real vs synthetic statistics")
    add("--grid", type=count, metavar="G", help="--sample, fullyconv: a G x G latent grid")
    add("--wells", type=count, default=16, help="--condition (default: 16)")
    args = p.parse_args(argv)
    if args.arch is None and not args.compare_data:
        p.error("argument --arch: required (dense or fullyconv), except with --compare-data")
    if args.grid is not None and (args.arch != "fullyconv" or args.sample is None):
        p.error("argument --grid: only with --sample and --arch fullyconv")
    args.precision = "fp32" if args.fp32 else None
    size, stages = args.size or DEFAULTS["size"], len(args.widths or WIDTHS)
    if size % 2 ** stages:
        p.error(f"size {size} must be divisible by 2^{stages}, a halving per width")
    return args


DEFAULTS = dict(size=64, latent_dim=32, latent_channels=8, widths=list(WIDTHS), seed=0,
                batch_size=BATCH_SIZE, lr=LR, beta=1.0, warmup=KL_WARMUP)
RUN_SETTINGS = ("seed", "data", "batch_size", "lr", "beta", "warmup", "precision")


def model_keys(arch):
    """The flags that shape a model of this arch."""
    return ("arch", "size", "widths", "latent_dim" if arch == "dense" else "latent_channels")


def settle(args, saved, path, refuse=(), take=()):
    """Flags left unnamed (None) take the values of the saved run; one in refuse that names
    another value ends the command, so that a resumed or loaded run stays the run it was."""
    for key in (*refuse, *take):
        asked, was = getattr(args, key), saved.get(key)
        if asked is None:
            setattr(args, key, was)
        elif key in refuse and was is not None and asked != was:
            raise DataError(f"{path}: was trained with --{key.replace('_', '-')} {was}, but "
                            f"this run asks for {asked}")


def with_defaults(args):
    """args with each flag still unnamed at its default -> args"""
    per_arch = {"epochs": EPOCHS[args.arch], "prior_steps": PRIOR_STEPS[args.arch]}
    for key, value in {**DEFAULTS, **per_arch}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def new_model(args, device):
    """The untrained VAE that args describe, with N(0, I) until Part 2 fits its prior."""
    torch.manual_seed(args.seed)
    cfg = {k: getattr(args, k) for k in model_keys(args.arch)}
    return build_from_config(cfg).to(device, memory_format=torch.channels_last)


def pick_device(name):
    """--device -> torch.device; one that this torch or machine lacks is an input error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else
                            "mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(1, device=device)          # torch's own word on whether it can use it
    except (RuntimeError, AssertionError) as e:
        build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build"
        raise DataError(f"--device {name}: {str(e).splitlines()[0]} (torch {torch.__version__}, "
                        f"{build}); use --device cpu") from None
    return device


def bf16_native(device):
    """Whether this device does bf16 in hardware: CUDA GPUs of compute capability 8+ (Ampere
    on), and CPUs with AVX-512 BF16 or AMX that oneDNN may use (not under
    ONEDNN_MAX_CPU_ISA=AVX2). Elsewhere bf16 would be emulated, and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False
    has = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return has and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), device.type)
    return f"{name}, {os.cpu_count()} cores"


def train_and_save(model, train_x, val_x, args, device, out, config, resume):
    """train() with a checkpoint after every epoch, then Part 2's prior fitted to the codes
    -> history. Ctrl-C keeps the last epoch's checkpoint and exits with status 130."""
    saved = [resume is not None]

    def save_checkpoint(state):
        with atomic(out / "checkpoint.pt") as tmp:
            torch.save({**state, "config": config}, tmp)      # the settings, for --resume
        saved.append(True)
    try:
        history = train(model, train_x, val_x, device, args.epochs, args.batch_size, args.lr,
                        args.beta, args.warmup, args.seed, args.precision == "bf16",
                        resume, save_checkpoint)
        if args.prior == "learned":                                 # Part 2
            t = time.perf_counter()
            prior = LearnedPrior(model.latent_shape, PRIOR_HIDDEN[args.arch],
                                 PRIOR_DEPTH[args.arch], guidance=GUIDANCE).to(device)
            model.prior = fit_prior(prior, *encode_all(model.eval(), train_x, device),
                                    args.prior_steps, PRIOR_BATCH[args.arch],
                                    bf16=args.precision == "bf16")
            config["prior_minutes"] = (time.perf_counter() - t) / 60
    except KeyboardInterrupt:
        print("interrupted: " + ("the checkpoint keeps the last finished epoch; the same command "
                                 "with --resume goes on" if any(saved)
                                 else "no checkpoint was written"), file=sys.stderr)
        raise SystemExit(130) from None
    seconds = sum(history["seconds"])
    config["train_minutes"] = seconds / 60
    config["train_img_per_s"] = len(history["seconds"]) * (len(train_x) // args.batch_size) \
        * args.batch_size / seconds
    save_model(model, out / "model.pt")
    write_json(out / "config.json", config)
    write_json(out / "history.json", history)
    return history


def run(args):
    device = pick_device(args.device)
    out = Path("results") if args.compare_data else args.out or Path("results") / (
        args.arch if args.prior == "learned" else f"{args.arch}-{args.prior}")
    out.mkdir(parents=True, exist_ok=True)     # fails now, not after training, if it cannot
    if args.compare_data:
        return compare_data(out)
    torch.backends.cudnn.benchmark = True      # on a GPU: the fastest kernels for fixed shapes
    if args.evaluate or args.condition or args.sample:              # these use a trained model
        model = load_model(out / "model.pt", device)
        # its shape must be the one asked for; its seed and data file are taken unless named,
        # so that its held-out images stay held out
        settle(args, {**read_json(out / "config.json", {}), **model_config(model)},
               out / "model.pt", refuse=model_keys(args.arch), take=("seed", "data"))
    resume = None                        # everything that can fail is checked before training
    if args.resume is not None:
        path = out / "checkpoint.pt" if str(args.resume) == "auto" else args.resume
        resume = load_file(path, "checkpoint")
        keys = {"model", "optimizer", "history", "config", "schedule_steps", "rng", "rng_cuda"}
        if not isinstance(resume, dict) or not keys <= set(resume):
            raise DataError(f"{path}: not a training checkpoint of this script")
        settle(args, resume["config"], path, (*model_keys(args.arch), *RUN_SETTINGS),
               ("epochs", "prior_steps"))
    with_defaults(args)
    args.precision = args.precision or ("bf16" if bf16_native(device) else "fp32")
    if args.sample:
        write_samples(model, args.sample, out / "samples.h5", args.grid and (args.grid,) * 2,
                      args.seed)
        return print(f"wrote {args.sample} prior samples of {out}/model.pt to {out}/samples.h5")
    images, data_path = get_data(args.data, args.size)
    args.data = str(data_path)
    train_x, val_x = split(images, args.seed)
    if len(train_x) < args.batch_size:
        raise DataError(f"{data_path}: {len(images)} images leave {len(train_x)} for training, "
                        f"fewer than one batch of {args.batch_size}")
    del images                          # the split made copies
    note = f"{args.arch} VAE trained on {data_name(data_path)}"
    # the 13 real images belong to the exercise's data: the stand-in or its train_images.h5
    real = real_reference(args.size) if data_path.name in (SYNTHETIC_DATA.name, KEY + ".h5") \
        else None
    if args.condition:
        return run_condition(model, val_x, out, device, args, note)
    print(f"data {data_path}: {len(train_x)} train + {len(val_x)} held-out images at "
          f"{args.size}x{args.size}; device {device} ({device_name(device)})")
    train_x = train_x.to(device)        # on a GPU: 184 MB of uint8 at 45k x 64x64, kept there
    #                                     for training and for the nearest-image searches
    if args.evaluate:
        history = read_json(out / "history.json", {k: [] for k in HISTORY})
        config = read_json(out / "config.json", {})
    else:
        model = new_model(args, device)
        config = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "n_train": len(train_x), "n_val": len(val_x),
                  "device": device_name(device), "threads": torch.get_num_threads(),
                  "torch": str(torch.__version__), "code_version": code_version()}
        print(f"{args.arch} VAE, {args.prior} prior: {sum(p.numel() for p in model.parameters()):,}"
              f" parameters, latent {model.latent_shape}, {config['precision']}, {args.epochs} "
              f"epochs (Ctrl-C keeps the last epoch's checkpoint; --resume goes on)")
        if resume is not None:
            print(f"resuming after epoch {len(resume['history']['epoch'])}")
        history = train_and_save(model, train_x, val_x, args, device, out, config, resume)
    report(model, train_x, val_x, history, config, out, device, note, args, real)


def report(model, train_x, val_x, history, config, out, device, note, args, real):
    """The figures, metrics.json and comparison.md of a trained model; real: the exercise's
    13 real images, or None."""
    for name, fig in sample_figures(model, val_x, device, note, args.seed).items():
        save_figure(fig, out / name)
    more_figures(model, train_x, val_x, history, out, device, note, real, args.seed)
    t = time.perf_counter()
    # the stand-in can make images of layouts training never saw: they are the reference
    new = as_images(make_synthetic_channels(args.eval_n, seed=1, distinct=True), model.size) \
        if Path(args.data) == SYNTHETIC_DATA else None
    metrics = evaluate(model, train_x, val_x, device, args.eval_n, args.seed, real, new,
                       args.precision == "bf16")
    metrics.update(data=data_name(args.data), code_version=code_version(),
                   reference="stand-in images of a new seed, a layout each" if new is not None
                   else "held-out images",
                   train_device=config.get("device"), train_precision=config.get("precision"),
                   **{k: config.get(k) for k in ("train_minutes", "train_img_per_s",
                                                 "prior_minutes")})
    write_json(out / "metrics.json", metrics)
    write_comparison(out.parent, val_x[:args.eval_n], device)
    print(f"evaluated in {time.perf_counter() - t:.0f} s: held-out -ELBO {metrics['neg_elbo']:.1f}"
          f" nats/img (rec {metrics['elbo_rec']:.1f} + kl {metrics['elbo_kl']:.1f}), "
          f"reconstruction accuracy {metrics['recon_accuracy']:.4f}")
    for name, sc in metrics["scores"].items():
        print(f"{name:>8}: told from data {sc['c2st']:.3f} (0.5: never)  proportion "
              f"{sc['proportion']:.3f}  pieces {sc['pieces']:.2f}  top-to-bottom channels "
              f"{sc['top-to-bottom channels']:.2f}  near-empty {sc['near-empty']:.3f}")
    print(f"wrote {out}/: figures, metrics.json, and {out.parent}/comparison.md")


def run_condition(model, val_x, out, device, args, note):
    """--condition: the ES-MDA study -> conditioning.json, .png and conditioning_members.h5"""
    model.eval()
    title = (f"{note}, {model.prior.name} prior: ES-MDA on {args.wells} wells, {MEMBERS} "
             f"members, {ASSIMILATIONS} assimilations, observation sd {OBS_SD}")
    print(title)
    t = time.perf_counter()
    summary, (truth, res), members, truths = conditioning_study(model, val_x, device, args.wells,
                                                                args.seed)
    save_figure(conditioning_figure(truth, res, title), out / "conditioning.png")
    summary.update(seconds=time.perf_counter() - t, device=device_name(device),
                   code_version=code_version())
    write_json(out / "conditioning.json", summary)
    write_h5(out / "conditioning_members.h5", [members.permute(0, 2, 3, 1).numpy()],
             members_per_truth=MEMBERS, held_out_indices=truths)
    print(f"wells honoured {summary['prior_wells_honoured']:.3f} -> "
          f"{summary['posterior_wells_honoured']:.3f} over {summary['truths']} truths, "
          f"spread ratio {summary['spread_ratio']:.2f}, {summary['seconds']:.0f} s; "
          f"wrote {out}/: conditioning.json conditioning.png conditioning_members.h5")


# Python drops a KeyboardInterrupt raised inside a finalizer (h5py runs some as its objects
# are freed), so a Ctrl-C that lands there would be lost. This hook raises it again in the
# main thread, 50 ms later, once the finalizer has returned.
def reraise_lost_ctrl_c(unraisable):
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        import _thread
        import threading
        threading.Timer(0.05, _thread.interrupt_main).start()
    else:
        sys.__unraisablehook__(unraisable)


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)     # progress shows up in a log file too
    args = parse_args(argv)
    sys.unraisablehook = reraise_lost_ctrl_c
    try:
        run(args)
    except (DataError, OSError) as e:   # bad input, or a file that cannot be written
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}; try a lower --lr or a longer --warmup", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:           # Ctrl-C anywhere else: every file is written atomically
        print("interrupted: stopped by Ctrl-C; no file was left half-written", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
