"""
Variational autoencoders that draw new images of meandering channels from random latents.

    python vae.py --arch dense        # conv encoder/decoder joined by dense layers: z is a vector
    python vae.py --arch fullyconv    # no dense layer anywhere: z is a small image

The data: 128x128 binary images of channel facies (1 = channel, 0 = background), halved to
64x64 by default; without data/train_images.h5, a synthetic stand-in generated once.

Three parts, each under a "Part" banner:
  Part 1, the VAE: data, the two models, the ELBO, training, samples and interpolation: all
          of `python vae.py --arch dense --prior gaussian`. You can stop after it.
  Part 2, beyond the plain VAE: the learned flow prior (the default) that fixes the prior
          hole, shaped through the decoder so that samples have the data's statistics;
          then conditioning on wells with ES-MDA, what the latent space is for.
  Part 3, measuring and plumbing: the synthetic stand-in, reading files, realism metrics,
          evaluation, reports, the benchmark, checkpoints and Ctrl-C, the command line.
"""
import argparse
import json
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DATA_URL = ("https://grrjnyzvhu1t.objectstorage.sa-saopaulo-1.oci.customer-oci.com/p/"
            "jflQ-fCMHmA5jLi-DdqElenJTzARdTp61YIzIDpRBI531v05mmWObjM2F1CBTIVL/n/grrjnyzvhu1t/"
            "b/General_ltrace_files/o/deep_esmda/train_images.h5")
DEFAULT_DATA = Path("data/train_images.h5")
NATIVE = 128                    # the real images are 128x128
VAL_FRACTION = 0.05             # held-out share of the images


class DataError(Exception):
    """A problem with the user's input: main() prints it as one line and exits with status 2."""


# =============================================================================================
# Part 1: the VAE
# =============================================================================================
# ----------------------------------------------------------------------------- data

def downsample_majority(x):
    """(N, 1, S, S) uint8 0/1 -> (N, 1, S/2, S/2): the majority of each 2x2 block.

    Why a vote: averaging would give grey pixels, and the Bernoulli likelihood below needs
    binary ones. A 2-2 tie goes to the block's top-left pixel, so neither facies gains."""
    n, c, s, _ = x.shape
    block = x.view(n, c, s // 2, 2, s // 2, 2)
    votes = block.sum((3, 5))                                  # (N, 1, S/2, S/2), 0..4
    return ((votes >= 3) | ((votes == 2) & (block[:, :, :, 0, :, 0] == 1))).to(torch.uint8)


def get_data(path, size, log=print):
    """-> (images, the file they came from); images: uint8 (N, 1, size, size) of 0/1.

    An explicit path must exist. Without the default file, synthetic_data() (Part 3)
    generates the synthetic stand-in once and returns its path, SYNTHETIC_DATA. load_images
    (Part 3) reads a file in chunks, checks its layout and values, and halves 128x128 images
    with the vote above."""
    if path is not None:
        return load_images(path, size), Path(path)
    if DEFAULT_DATA.is_file():
        return load_images(DEFAULT_DATA, size), DEFAULT_DATA
    log(f"{DEFAULT_DATA} not found: using the synthetic stand-in. The real data: {DATA_URL}")
    return load_images(synthetic_data(log), size), SYNTHETIC_DATA


def split(images, seed):
    """A random train/validation split -> (train, held-out). Caveat: the real images include
    shifted near-copies of one another, so a random split leaks near-duplicates into
    validation, and held-out scores are optimistic."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(VAL_FRACTION * len(images)))
    return images[order[n_val:]], images[order[:n_val]]


def to_float(batch, device):
    """uint8 (B, 1, S, S) -> float32 on the device, one batch at a time, so the 50k images
    stay uint8 (200 MB). channels_last memory lets oneDNN pick its fastest CPU kernels."""
    return batch.to(device, non_blocking=True).float().contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- models
# Both models share a convolutional trunk. The encoder halves the image four times with
# stride-2 convolutions, so its last feature map is (C, S/16, S/16): 4x4 for 64x64 images.
# The decoder mirrors it with stride-2 transposed convolutions. The widths are narrow
# because the images are simple (a few smooth bands), which makes CPU training practical.

WIDTHS = (16, 32, 64, 128)              # channels after each stride-2 stage


def down(c_in, c_out):
    """(B, c_in, H, W) -> (B, c_out, H/2, W/2). inplace=True: the activation overwrites the
    batch norm's output rather than writing a new tensor; on a CPU such elementwise ops cost
    as much time moving memory as the convolutions take computing."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False),
                         nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, inplace=True))


def up(c_in, c_out):
    """(B, c_in, H, W) -> (B, c_out, 2H, 2W). A 4x4 kernel with stride 2 covers every
    output pixel equally often, which avoids the checkerboard of 3x3 transposed convs."""
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def encoder_trunk(widths):
    """(B, 1, S, S) -> (B, widths[-1], S/2^len, S/2^len)"""
    chans = [1] + list(widths)
    return nn.Sequential(*[down(a, b) for a, b in zip(chans[:-1], chans[1:])])


def decoder_trunk(widths):
    """(B, widths[-1], s, s) -> (B, 1, s*2^len, s*2^len) logits"""
    chans = list(reversed(widths))
    blocks = [up(a, b) for a, b in zip(chans[:-1], chans[1:])]
    return nn.Sequential(*blocks, nn.ConvTranspose2d(chans[-1], 1, 4, 2, 1))


class DenseVAE(nn.Module):
    """Conv encoder -> flatten -> linear heads -> vector z (D,) -> linear -> conv decoder.

    Every latent unit sees the whole image, and every output pixel depends on all of z.
    Shapes below are for the defaults: 64x64 images, widths (16, 32, 64, 128), D = 32."""
    arch = "dense"

    def __init__(self, size=64, latent_dim=32, widths=WIDTHS):
        super().__init__()
        self.grid = size // 2 ** len(widths)                # 4 (8 for 128x128 images)
        feat = widths[-1] * self.grid ** 2                  # 128*4*4 = 2048
        self.latent_shape = (latent_dim,)
        self.encoder = encoder_trunk(widths)                # (B, 128, 4, 4)
        self.mu = nn.Linear(feat, latent_dim)               # (B, D)
        self.logvar = nn.Linear(feat, latent_dim)           # (B, D)
        self.expand = nn.Sequential(nn.Linear(latent_dim, feat), nn.ReLU())   # (B, 2048)
        self.decoder = decoder_trunk(widths)                # (B, 1, 64, 64)
        self.size, self.widths = size, widths

    def encode(self, x):
        h = self.encoder(x).flatten(1)                      # (B, 2048)
        return self.mu(h), self.logvar(h)                   # (B, D), (B, D)

    def decode(self, z):
        h = self.expand(z).view(-1, self.widths[-1], self.grid, self.grid)   # (B, 128, 4, 4)
        return self.decoder(h)                              # (B, 1, 64, 64) logits


class FullyConvVAE(nn.Module):
    """Conv encoder -> 3x3 conv heads -> spatial z (C, S/16, S/16) -> conv decoder.

    No nn.Linear anywhere. The latent is a small image: at 64x64 a 4x4 grid, so each latent
    cell sits over a 16x16-pixel patch (and, through the receptive field, sees more), and
    the decoder can be run on a larger grid to draw a larger image. The heads use 3x3
    kernels with padding, so no kernel covers the whole feature map (a dense layer in
    disguise would). Shapes below: 64x64 images, widths (16, 32, 64, 128), C = 8."""
    arch = "fullyconv"

    def __init__(self, size=64, latent_channels=8, widths=WIDTHS):
        super().__init__()
        self.grid = size // 2 ** len(widths)                # 4 (8 for 128x128 images)
        self.latent_shape = (latent_channels, self.grid, self.grid)
        self.encoder = encoder_trunk(widths)                # (B, 128, 4, 4)
        self.mu = nn.Conv2d(widths[-1], latent_channels, 3, 1, 1)       # (B, C, 4, 4)
        self.logvar = nn.Conv2d(widths[-1], latent_channels, 3, 1, 1)   # (B, C, 4, 4)
        self.expand = nn.Sequential(nn.Conv2d(latent_channels, widths[-1], 3, 1, 1),
                                    nn.BatchNorm2d(widths[-1]), nn.ReLU())  # (B, 128, 4, 4)
        self.decoder = decoder_trunk(widths)                # (B, 1, 64, 64)
        self.size, self.widths = size, widths

    def encode(self, x):
        h = self.encoder(x)                                 # (B, 128, 4, 4)
        return self.mu(h), self.logvar(h)                   # (B, C, 4, 4) each

    def decode(self, z):
        return self.decoder(self.expand(z))                 # (B, 1, 64, 64) logits


ARCHS = {"dense": DenseVAE, "fullyconv": FullyConvVAE}


# ----------------------------------------------------------------------------- loss
# The ELBO is a lower bound on log p(x) that can be computed; training maximizes it. For
# binary images, its negative:
#   -ELBO(x) = E_q(z|x)[-log p(x|z)] + KL(q(z|x) || p(z))
# The expectation is estimated with one sample z ~ q(z|x) per image and step. The KL term
# keeps every q(z|x) close to the prior, which is what lets random prior draws decode (only
# partly with N(0, I), as Part 2 shows and fixes).
# p(x|z) is a Bernoulli per pixel, so -log p(x|z) is the binary cross-entropy of the
# decoder's logits, summed over pixels. q(z|x) = N(mu, diag sigma^2) and p(z) = N(0, I),
# so the KL has a closed form (Kingma & Welling 2014, appendix B), per latent element:
#   KL = -1/2 (1 + log sigma^2 - mu^2 - sigma^2)
# Both terms are summed over the image / the latent and averaged over the batch, so the
# numbers are nats per image. beta weights the KL (beta = 1 is the true ELBO).

def bernoulli_nll(logits, x):
    """-log p(x|z) for binary x, summed over pixels: (B, 1, S, S) -> (B,)"""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def gaussian_kl(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over all latent elements: (B, ...) -> (B,)"""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).flatten(1).sum(1)


def standard_normal_logpdf(z):
    """log N(z; 0, I) summed over all latent elements: (B, ...) -> (B,)"""
    return (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


def reparameterize(mu, logvar, generator=None):
    """z = mu + sigma * eps, eps ~ N(0, I): a sample of q(z|x) that gradients flow through
    to mu and logvar. Returns (z, eps), both shaped like mu; eps gives log q(z|x) (Part 2)."""
    if generator is None:
        eps = torch.randn_like(mu)
    else:
        eps = torch.randn(mu.shape, generator=generator).to(mu)
    return mu + eps * torch.exp(0.5 * logvar), eps


class StandardNormal(nn.Module):
    """The plain VAE's prior p(z) = N(0, I), and the interface every prior in this file has.

    Part 2's learned prior draws a Gaussian u ~ N(0, I) and maps it to z = f(u). Here f is
    the identity, so u = z and the first two methods do nothing; they exist so that
    sampling, interpolation and Part 2's ES-MDA run unchanged with either prior:
      to_z(u) -> z                      (sampling)
      to_u(z) -> (u, log|det du/dz|)    (back to the Gaussian)
      log_prob(z) -> (B,)
      kl(mu, logvar, z, eps) -> (B,)    KL(q(z|x) || p(z)), here in closed form."""
    name = "gaussian"
    title = "N(0, I)"

    def to_z(self, u):
        return u

    def to_u(self, z):
        return z, torch.zeros(len(z), device=z.device)

    def log_prob(self, z):
        return standard_normal_logpdf(z)

    def kl(self, mu, logvar, z, eps):
        return gaussian_kl(mu, logvar)             # z and eps are not needed: closed form


def neg_elbo(model, x, beta=1.0, bf16=False):
    """x (B, 1, S, S) -> (loss, rec, kl), each averaged over the batch, in nats per image.

    bf16=True runs the encoder's and the decoder's layers, which do almost all the
    arithmetic, in bfloat16 (autocast): much faster where the hardware does bf16 natively
    (see `bf16_native`, Part 3). bf16 keeps fp32's exponent range, so unlike fp16 it needs
    no loss scaling, but it has only 8 bits of mantissa; so the rest stays fp32: the sample
    z, the prior's KL (the flow's log-determinants) and the sums over S*S pixels."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        mu, logvar = model.encode(x)                # (B, *latent_shape) each
    mu, logvar = mu.to(x.dtype), logvar.to(x.dtype)     # fp32 again (no-op without bf16), so
    # that eps, z and the KL below are fp32 too
    z, eps = reparameterize(mu, logvar)             # one sample per image
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model.decode(z)                    # (B, 1, S, S)
    kl = model.prior.kl(mu, logvar, z, eps)         # (B,); .prior: set by build_model below
    rec, kl = bernoulli_nll(logits.to(x.dtype), x).mean(), kl.mean()
    return rec + beta * kl, rec, kl


def train_step(model, opt, x, beta, lr, bf16=False):
    """One optimizer step on a batch x (B, 1, S, S) -> (loss, rec, kl) before the step.
    The weights, their gradients and Adam's state stay fp32 also with bf16=True."""
    for group in opt.param_groups:
        group["lr"] = lr
    loss, rec, kl = neg_elbo(model, x, beta, bf16)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss, rec, kl


def build_model(arch, size=64, prior="gaussian", seed=0, **kwargs):
    """A VAE with encode(x) -> (mu, logvar), decode(z) -> logits, latent_shape, and .prior:
    StandardNormal() (the plain VAE of Part 1), or with prior="flow" the learned FlowPrior
    of Part 2, a normalizing flow whose coupling nets are FLOW_HIDDEN[arch] wide (the
    command line's default). The flow's random init uses its own seed and leaves the global
    RNG untouched, so the VAE's own init and noise are the same with either prior.
    kwargs: widths, latent_dim (dense), latent_channels (fullyconv). Bad settings raise
    ValueError."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {list(ARCHS)}, not {arch!r}")
    widths = kwargs.get("widths", WIDTHS)
    if size % 2 ** len(widths):
        raise ValueError(f"size {size} must be divisible by 2^{len(widths)} (one halving per "
                         f"width)")
    model = ARCHS[arch](size=size, **kwargs)
    if prior == "flow":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.prior = FlowPrior(model.latent_shape, FLOW_HIDDEN[arch])   # Part 2
    else:
        model.prior = StandardNormal()
    return model


# ----------------------------------------------------------------------------- training
# Default epochs per arch: about 10 minutes of a default command each on 2 CPU cores with
# bf16 (a fullyconv step costs more). Most of the sample quality arrives early; the last
# epochs mostly lower the -ELBO (results/levers.md).
EPOCHS = {"dense": 24, "fullyconv": 20}


def lr_at(step, total, lr):
    """Linear warm-up over the first 200 steps (about half an epoch at the defaults; 10% of a
    shorter run), so that Adam's running averages settle before full-size steps, then a
    cosine decay to 5% of lr: big steps early, small ones to settle the decoder at the end.
    The 200 and the 5% are chosen, not tuned."""
    warmup = min(200, total // 10)
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def beta_at(step, warmup_steps, beta):
    """KL warm-up (--warmup epochs): beta rises linearly from 0, so the decoder first learns
    to use z before the KL pulls the posteriors to the prior."""
    return beta * min(1.0, step / warmup_steps) if warmup_steps > 0 else beta


@torch.no_grad()
def validate(model, images, device, beta, batch_size=500):
    """Mean (loss, rec, kl) in nats per image over uint8 images (N, 1, S, S), in eval mode,
    at the full beta (not the warmed-up one); one z per image, so it varies a little."""
    model.eval()
    total = torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(images), batch_size):
        x = to_float(images[i:i + batch_size], device)
        loss, rec, kl = neg_elbo(model, x, beta)
        total += torch.tensor([loss.item(), rec.item(), kl.item()]) * len(x)
    model.train()
    return (total / len(images)).tolist()


def train(model, train_x, val_x, args, device, ckpt_path, resume=None, log=print):
    """Train in place with Adam -> the history: a dict of lists (losses, beta, lr, time),
    one entry per epoch. args: batch_size, epochs, lr, beta, warmup, seed, fp32.
    train_x, val_x: uint8 (N, 1, S, S)."""
    bs = args.batch_size
    bf16 = precision(args, device) == "bf16"     # Part 3: where the hardware has bf16
    steps = len(train_x) // bs                                  # per epoch
    total_steps = steps * args.epochs
    warmup_steps = round(args.warmup * steps)
    # fused: one kernel updates every weight, instead of a dozen small ops per tensor
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)
    model.train()
    # The Bookkeeper (Part 3) does the plumbing: it resumes from a checkpoint, logs progress
    # with an ETA, stops on a NaN loss, and saves a checkpoint every epoch and on Ctrl-C.
    with Bookkeeper(model, opt, args, steps, ckpt_path, resume, device, log) as book:
        for epoch in range(book.epoch, args.epochs):
            # the data order of epoch e depends on (seed, e) only, so a resumed run sees
            # the same batches as an uninterrupted one
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
            order = torch.randperm(len(train_x), generator=g).to(train_x.device)
            for s in range(book.step, steps):         # book.step: 0, unless resumed mid-epoch
                i = epoch * steps + s
                lr, beta = lr_at(i, total_steps, args.lr), beta_at(i, warmup_steps, args.beta)
                x = to_float(train_x[order[s * bs:(s + 1) * bs]], device)     # (B, 1, S, S)
                loss, rec, kl = train_step(model, opt, x, beta, lr, bf16)
                book.step_done(epoch, s, loss, rec, kl, beta, lr)
            book.epoch_done(epoch, validate(model, val_x, device, args.beta))
    return book.history


# ----------------------------------------------------------------------------- samples
# The product: new images from random latents. Draw u ~ N(0, I) and decode z = to_z(u)
# (z = u for N(0, I); z = f(u) for Part 2's flow). Figures show decoder probabilities,
# channel yellow.

@torch.no_grad()
def sample_latents(model, n, generator=None, grid=None):
    """n latents from the model's prior -> (n, *latent_shape) on the model's device.
    grid (fullyconv only) draws a latent grid of another size, e.g. (8, 8) for a field
    twice as wide and tall."""
    shape = model.latent_shape if grid is None else (model.latent_shape[0], *grid)
    u = torch.randn(n, *shape, generator=generator).to(next(model.parameters()))  # its device
    return model.prior.to_z(u)


@torch.no_grad()
def decode_probs(model, z, device, batch_size=500):
    """Decoder probabilities for latents z (N, *latent) -> (N, 1, S, S) float on the CPU."""
    return torch.cat([torch.sigmoid(model.decode(z[i:i + batch_size].to(device))).cpu()
                      for i in range(0, len(z), batch_size)])


@torch.no_grad()
def encode_all(model, images, device, batch_size=500):
    """Posterior means and log-variances of uint8 images -> two (N, *latent_shape) tensors."""
    out = [model.encode(to_float(images[i:i + batch_size], device))
           for i in range(0, len(images), batch_size)]
    return torch.cat([m.cpu() for m, _ in out]), torch.cat([v.cpu() for _, v in out])


def slerp(u0, u1, steps):
    """Spherical paths from u0 to u1 (P, ...) each -> (steps, P, ...).

    Why not a straight line: two Gaussian draws in d dimensions both have norm ~sqrt(d) and
    are nearly orthogonal, so their midpoint has norm ~sqrt(d/2), a point the prior almost
    never draws (here: too little channel). The great circle keeps the norm: exactly for
    ends of equal norm, and between the ends' norms for near-orthogonal ends."""
    a, b = u0.flatten(1), u1.flatten(1)                                     # (P, d)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1, 1)).view(1, -1, 1)                   # (1, P, 1)
    t = torch.linspace(0, 1, steps).view(-1, 1, 1)                          # (steps, 1, 1)
    sin = torch.sin(omega).clamp_min(1e-6)        # near-parallel ends: nearly a straight line
    path = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / sin
    return path.view(steps, *u0.shape)


@torch.no_grad()
def interpolate(model, ends, steps, device):
    """Decoded spherical paths between latents: ends (2, P, *latent) holds P starts and P
    ends -> probabilities (steps, P, 1, S, S). The path runs in the Gaussian u = to_u(z),
    where the prior is N(0, I) and slerp's argument holds; each point goes back through
    to_z to be decoded."""
    u = model.prior.to_u(ends.flatten(0, 1).to(device))[0].cpu().view(ends.shape)
    path = slerp(u[0], u[1], steps)                              # (steps, P, *latent)
    z = model.prior.to_z(path.flatten(0, 1).to(device))
    return decode_probs(model, z, device).view(steps, ends.shape[1], 1, model.size, model.size)


def show_grid(rows, path, title, row_labels=None, panel=1.3, gap=0.0, panel_titles=None):
    """rows: list of (N, 1, H, W) tensors in [0, 1], one per figure row -> PNG at path.
    Channels yellow on blue (viridis), as in the data's own pictures. gap: space between
    panels, as a fraction of a panel; panel_titles: per row, None or a title per panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ncol = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(panel * ncol, panel * len(rows) + 0.5),
                             squeeze=False)
    for i, row in enumerate(rows):
        for j in range(ncol):
            ax = axes[i, j]
            ax.set_xticks([]), ax.set_yticks([])
            if j < len(row):
                ax.imshow(row[j, 0].float().numpy(), cmap="viridis", vmin=0, vmax=1,
                          interpolation="nearest")
                if panel_titles and panel_titles[i]:
                    ax.set_title(panel_titles[i][j], fontsize=7)
            else:
                ax.axis("off")
        if row_labels:
            axes[i, 0].set_ylabel(row_labels[i], fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if gap:
        fig.subplots_adjust(wspace=gap, hspace=gap)
    save_figure(fig, path)                  # Part 3: written atomically, then closed


@torch.no_grad()
def sample_figures(model, val_x, out, device, note, seed=0):
    """samples.png (48 prior draws), interpolation.png and reconstructions.png in out/."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    probs = decode_probs(model, sample_latents(model, 48, g), device)        # (48, 1, S, S)
    show_grid(list(probs.view(6, 8, *probs.shape[1:])), out / "samples.png",
              f"{note}: decoder probabilities of 48 draws from {model.prior.title}")

    # interpolation: held-out image r -> held-out image k + r (their codes, ends shown), then
    # two pairs of prior draws
    k = min(4, len(val_x) // 2)
    z_held = encode_all(model, val_x[:2 * k], device)[0].view(2, k, *model.latent_shape)
    z_prior = sample_latents(model, 4, g).cpu().view(2, 2, *model.latent_shape)
    ends = torch.cat([z_held, z_prior], 1)                          # (2, k + 2, *latent)
    frames = interpolate(model, ends, 10, device)                    # (10, k + 2, 1, S, S)
    rows = [frames[:, r] for r in range(k + 2)]
    for r in range(k):                                             # the real ends, for reference
        rows[r] = torch.cat([val_x[r:r + 1].float(), rows[r], val_x[k + r:k + r + 1].float()])
    show_grid(rows, out / "interpolation.png",
              f"{note}: spherical paths in u (held-out image -> held-out image, ends shown;\n"
              f"then prior draw -> prior draw)", row_labels=["held-out"] * k + ["prior"] * 2)

    rows, labels = [], []
    real = real_reference(val_x.shape[-1])     # Part 3: 13 real images, None when missing
    for x, name in ((val_x[:8], "held-out"), (val_x[8:16], "held-out"),
                    (real[:8] if real is not None else val_x[:0], "real")):
        if len(x):
            rows += [x.float(), decode_probs(model, encode_all(model, x, device)[0], device)]
            labels += [name, "recon"]
    show_grid(rows, out / "reconstructions.png",
              f"{note}: inputs and reconstructions from the posterior mean", row_labels=labels)


# What `python vae.py --arch dense --prior gaussian` does with all of the above (run() in
# Part 3 holds the plumbing): get_data -> split -> build_model -> train -> sample_figures,
# then Part 3's evaluation and reports -> results/dense-gaussian/. Without --prior gaussian
# the same steps train Part 2's flow prior with the VAE, then shape it through the frozen
# decoder in a short last phase: the default.
#
# ---------------------------------------------------------------------------------------------
# You can stop here: that is the whole VAE. Part 2 replaces the N(0, I) prior with a learned
# one, which is what makes random draws decode to whole channels, and puts the regularized
# latent space to work on well data. Part 3 measures the results and holds the plumbing.
# ---------------------------------------------------------------------------------------------


# =============================================================================================
# Part 2: beyond the plain VAE
# =============================================================================================
# ----------------------------------------------------------------------------- the learned prior
# Why N(0, I) samples break: the KL term pulls each image's posterior q(z|x) towards N(0, I),
# but the codes of all images together (the aggregate posterior q(z)) fill only part of that
# ball, a thin curved region. Random z ~ N(0, I) also land in the holes around it, which the
# decoder never saw, and decode to broken channels (the "prior hole"). A normalizing flow
# learns a prior that matches q(z) and keeps a Gaussian beneath:
#   u ~ N(0, I),   z = f(u),   f invertible.
# Change of variables, with u = f^-1(z):
#   log p(z) = log N(u; 0, I) + log |det du/dz|
# f^-1 is a chain of steps, each exactly invertible with a log-determinant that is a plain
# sum, so log p(z) is exact (RealNVP, Dinh et al. 2017; Glow, Kingma & Dhariwal 2018).
#
# One step of f^-1 (z -> u) on a latent (B, C, *grid), grid = () for dense, (h, w) for fullyconv:
#   1. actnorm: a learned scale and shift per channel;
#   2. mix: a learned invertible C x C matrix on every grid cell (Glow's 1x1 convolution),
#      so that each step couples a different split of the channels;
#   3. affine coupling: the first half of the channels, a, passes through; the second half
#      becomes b * exp(s(a)) + t(a). s and t only see a, so b is recovered exactly as
#      (b' - t(a)) * exp(-s(a)), and the log-determinant is sum s(a).
# The coupling net is an MLP for the dense latent (C = D, no grid) and 3x3, 1x1 and 3x3
# convolutions for the spatial latent, so the fullyconv flow has no nn.Linear and runs on
# any grid size. The last layer starts at zero and the mix orthogonal, so an untrained flow
# is an orthogonal map (a rotation or reflection), which maps N(0, I) to exactly N(0, I):
# training starts from the plain VAE. Each step is written as f^-1 (to_u: z -> u, for the
# density); sampling runs the steps backwards (to_z: u -> z).
#
# The flow trains with the VAE from the first step: the KL term is taken against it. It has
# no closed form there, so it is estimated from the same sample z that the decoder sees:
#   KL ~ log q(z|x) - log p(z),   log q(z|x) = log N(eps; 0, I) - 1/2 sum log sigma^2
# (z = mu + sigma * eps is itself a change of variables from eps). Fitting the flow after
# the VAE instead was measured and rejected (results/levers.md).

FLOW_STEPS = 8
FLOW_HIDDEN = {"dense": 256, "fullyconv": 64}    # width of each coupling net


class FlowStep(nn.Module):
    """One invertible step: (B, C, *grid) <-> (B, C, *grid)."""

    def __init__(self, channels, hidden, spatial):
        super().__init__()
        self.half = channels // 2
        c_in, c_out = self.half, 2 * (channels - self.half)         # s and t for the b half
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.shift = nn.Parameter(torch.zeros(channels))
        self.mix = nn.Parameter(torch.linalg.qr(torch.randn(channels, channels))[0])
        if spatial:
            self.net = nn.Sequential(nn.Conv2d(c_in, hidden, 3, 1, 1), nn.ReLU(),   # as in Glow:
                                     nn.Conv2d(hidden, hidden, 1), nn.ReLU(),       # 3x3, 1x1, 3x3
                                     nn.Conv2d(hidden, c_out, 3, 1, 1))
        else:
            self.net = nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(),
                                     nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, c_out))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def per_channel(self, v, like):
        return v.view(1, -1, *[1] * (like.dim() - 2))     # (C,) -> (1, C) or (1, C, 1, 1)

    def coupling(self, a):
        s, t = self.net(a).chunk(2, dim=1)
        return 2 * torch.tanh(s / 2), t      # |s| < 2: no coupling stretches by more than e^2

    def to_u(self, z):
        """z -> (u, log|det du/dz|): (B, C, *grid) -> (B, C, *grid), (B,)"""
        cells = z[0, 0].numel()     # 1, or h * w: actnorm and mix act on every grid cell alike
        h = (z + self.per_channel(self.shift, z)) * self.per_channel(self.log_scale.exp(), z)
        h = torch.einsum("ij,bj...->bi...", self.mix, h)
        a, b = h[:, :self.half], h[:, self.half:]
        s, t = self.coupling(a)
        logdet = cells * (self.log_scale.sum() + torch.linalg.slogdet(self.mix)[1])
        return torch.cat([a, b * s.exp() + t], 1), logdet + s.flatten(1).sum(1)

    def to_z(self, u):
        """The exact inverse of to_u."""
        a, b = u[:, :self.half], u[:, self.half:]
        s, t = self.coupling(a)
        h = torch.cat([a, (b - t) * (-s).exp()], 1)
        h = torch.einsum("ij,bj...->bi...", torch.linalg.inv(self.mix), h)
        return h * self.per_channel((-self.log_scale).exp(), h) - self.per_channel(self.shift, h)


class FlowPrior(nn.Module):
    """p(z) by a flow, with StandardNormal's interface (Part 1): to_z(u) = f(u) for sampling,
    to_u(z) = f^-1(z) with its log-determinant, log_prob(z), and the KL of q(z|x) to it."""
    name = "flow"
    title = "the learned flow prior z = f(u), u ~ N(0, I)"

    def __init__(self, latent_shape, hidden, steps=FLOW_STEPS):
        super().__init__()
        if latent_shape[0] < 2:
            raise ValueError("a flow prior couples half of the latent channels to the other "
                             "half, so it needs at least 2 (got 1); or use --prior gaussian")
        self.steps = nn.ModuleList(FlowStep(latent_shape[0], hidden, len(latent_shape) > 1)
                                   for _ in range(steps))

    def to_u(self, z):
        """u = f^-1(z): z (B, C, *grid) -> u of the same shape, and log|det du/dz| (B,)"""
        logdet = torch.zeros(len(z), device=z.device)
        for step in self.steps:
            z, ld = step.to_u(z)
            logdet = logdet + ld
        return z, logdet

    def to_z(self, u):
        """z = f(u): u (B, C, *grid) -> z of the same shape"""
        for step in reversed(self.steps):
            u = step.to_z(u)
        return u

    def log_prob(self, z):
        """log p(z) (B,) by the change of variables above."""
        u, logdet = self.to_u(z)
        return standard_normal_logpdf(u) + logdet

    def kl(self, mu, logvar, z, eps):
        """One-sample estimate of KL(q(z|x) || p(z)) at z = mu + sigma * eps: (B,).
        Unbiased: its mean over eps is the KL."""
        return log_q(eps, logvar) - self.log_prob(z)


def log_q(eps, logvar):
    """log q(z|x) at z = mu + sigma * eps, summed over latent elements: (B, ...) -> (B,)"""
    return standard_normal_logpdf(eps) - 0.5 * logvar.flatten(1).sum(1)


# -------------------------------------------------- shaping the prior through the decoder
# The flow learns where the codes are, but the codes of the training images are small,
# separate blobs, and the space between them decodes to blends of two layouts with less
# channel and more breaks: prior samples come out with less channel and fewer
# top-to-bottom channels than the data (results/levers.md). So after training, a short last
# phase fits what the samples look like, not only where the codes are. The VAE is frozen;
# only the flow trains, on
#   loss = -log p(z), z ~ q(z|x)                          (keep fitting the codes)
#        + S^2 * sum_k W1( stat_k(decoded prior draws), stat_k(data batch) )
# W1 is the 1-Wasserstein distance between the per-image values of a statistic over a batch
# of draws and over a data batch: with equal batch sizes, the mean absolute difference of
# the two sorted vectors. Times S^2 (the pixels per image), the proportion term is the W1
# distance between the draws' and the data's channel pixel counts per image: a per-image
# quantity, like the first term's nats (the weight 1 was measured, not derived). The draws'
# statistics are soft, so that gradients flow through the frozen decoder into f:
#   proportion   = the mean channel probability of an image (the net-to-gross);
#   row coverage = the mean over rows of each row's largest probability: a channel that
#                  crosses the image top to bottom covers every row, a broken one does not.
# The data's are taken on its 0/1 pixels. A blurred draw thus scores a little below a sharp
# one with the same layout, so the penalty also favours decided pixels.
# The objective is then no longer the pure ELBO: the flow gives up some fit to the codes
# (a few nats of KL) for samples with the data's statistics. Evaluation still reports the
# pure -ELBO and the IWAE bound, so likelihoods stay comparable.

SHAPE_LR = 3e-4                 # Adam, constant: the flow starts from a trained state


def soft_statistics(p):
    """Per-image statistics of probabilities or 0/1 images (B, 1, S, S) -> (proportion,
    row coverage), each (B,)"""
    return p.mean((1, 2, 3)), p.amax(dim=-1).mean((1, 2))


def wasserstein1_equal(a, b):
    """W1 between two 1-D samples of equal size (B,) each: differentiable in both."""
    return (a.sort().values - b.sort().values).abs().mean()


def shape_prior(model, train_x, device, steps, batch_size=128, seed=0, log=print):
    """The last phase above: `steps` Adam steps on the flow alone, the VAE frozen (and in
    eval mode, so BatchNorm keeps its statistics). train_x: uint8 (N, 1, S, S)."""
    g = torch.Generator().manual_seed(seed)
    flow, pixels = model.prior, train_x[0].numel()
    model.eval().requires_grad_(False)
    flow.requires_grad_(True)
    opt = torch.optim.Adam(flow.parameters(), lr=SHAPE_LR)
    t_log = time.perf_counter()
    for step in range(steps):
        x = to_float(train_x[torch.randint(len(train_x), (batch_size,), generator=g)], device)
        with torch.no_grad():
            mu, logvar = model.encode(x)                            # (B, *latent) each
        z = reparameterize(mu, logvar, g)[0]
        u = torch.randn(batch_size, *model.latent_shape, generator=g).to(device)
        probs = torch.sigmoid(model.decode(flow.to_z(u)))          # (B, 1, S, S)
        gaps = [wasserstein1_equal(a, b) for a, b in zip(soft_statistics(probs),
                                                         soft_statistics(x))]
        fit = -flow.log_prob(z).mean()
        loss = fit + pixels * sum(gaps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if time.perf_counter() - t_log > 30 or step in (0, steps - 1):
            log(f"shaping the prior: step {step + 1}/{steps}  -log p(z) {fit.item():6.1f}  "
                f"W1 proportion {gaps[0].item():.4f}  W1 row coverage {gaps[1].item():.4f}")
            t_log = time.perf_counter()
    model.requires_grad_(True)


# ------------------------------------------------------------------ conditioning on wells
# What the regularized latent space is for. A reservoir model is updated to honour data by
# ensemble methods such as ES-MDA (Emerick & Reynolds 2013), which assume Gaussian
# parameters. Facies images are not Gaussian, but the latent u behind them is: ES-MDA moves
# an ensemble of u until the decoded facies match observations, and every member stays
# something the decoder draws, i.e. a channel model. Here the data are the facies at K
# wells (pixels) of a held-out "true" image.
#
# Ensemble of N members, parameters m_j = u_j flattened (P,: 32 for dense, 128 for
# fullyconv's (8, 4, 4)), forward model g(m) = the decoder's channel probability at the
# wells (K,), observations d_obs (K,) of 0 or 1, error C_D = sd^2 I. Well facies are hard
# data, so sd is small (0.02). For each of N_a assimilations with inflation alpha_a (the
# update is damped by alpha_a; sum of 1/alpha_a = 1, so together they make one update):
#   d_j  = d_obs + sqrt(alpha_a) e_j,  e_j ~ N(0, C_D)              (perturbed observations)
#   m_j <- m_j + C_MD (C_DD + alpha_a C_D)^-1 (d_j - g(m_j))        (Kalman-type update)
# C_MD (P, K) and C_DD (K, K) are the ensemble (cross-)covariances of m and g(m): in words,
# each member moves along the regression of the parameters on the predicted data, towards
# its perturbed observations. For a linear g and Gaussian m it samples the exact Bayesian
# posterior as the ensemble grows (a test checks it). The decoder is not linear, so each
# update is only right for a small move: 16 assimilations take smaller steps than the usual
# 4 (measured in results/levers.md).

OBS_SD, ASSIMILATIONS, MEMBERS, TRUTHS = 0.02, 16, 200, 20


def inflation_factors(n_assimilations):
    """Constant alpha_a = N_a, the original choice: the inverses sum to 1, so the N_a
    damped updates add up to one full Bayesian update."""
    return [float(n_assimilations)] * n_assimilations


def esmda_update(m, pred, d_obs, obs_sd, alpha, generator=None):
    """One ES-MDA update. m (N, P), pred = g(m) (N, K), d_obs (K,) -> updated m (N, P)."""
    n = len(m)
    dm, dd = m - m.mean(0), pred - pred.mean(0)                      # ensemble anomalies
    c_md, c_dd = dm.T @ dd / (n - 1), dd.T @ dd / (n - 1)            # (P, K), (K, K)
    sd = torch.as_tensor(obs_sd, dtype=m.dtype, device=m.device).expand(pred.shape[1])  # (K,)
    noise = torch.randn(pred.shape, generator=generator, dtype=m.dtype).to(m.device)
    d = d_obs + math.sqrt(alpha) * sd * noise                        # (N, K) perturbed
    c_d = torch.diag(sd ** 2)                                        # (K, K)
    # solve instead of inverting: (C_DD + alpha C_D) X = (d - g(m))^T, then m += X^T C_MD^T
    x = torch.linalg.solve(c_dd + alpha * c_d, (d - pred).T)         # (K, N)
    return m + x.T @ c_md.T


def esmda(forward, m, d_obs, obs_sd, n_assimilations=ASSIMILATIONS, generator=None):
    """Run ES-MDA from the prior ensemble m (N, P) -> posterior ensemble (N, P)."""
    for alpha in inflation_factors(n_assimilations):
        m = esmda_update(m, forward(m), d_obs, obs_sd, alpha, generator)
    return m


@torch.no_grad()
def condition_on_wells(model, truth, device, n_wells=16, members=MEMBERS, obs_sd=OBS_SD,
                       assimilations=ASSIMILATIONS, seed=0):
    """ES-MDA on one held-out image: its facies at n_wells random pixels are the data.
    truth (1, S, S) uint8 -> dict: wells (K, 2) as (row, col), obs (K,), and the prior and
    posterior ensembles' decoder probabilities (members, 1, S, S)."""
    g = torch.Generator().manual_seed(seed)
    S = truth.shape[-1]
    flat = torch.randperm(S * S, generator=g)[:n_wells]               # (K,) pixel indices
    d_obs = truth.flatten()[flat].float().to(device)                  # (K,) 0 or 1

    def decode(m):                                                    # (N, P) -> (N, 1, S, S)
        z = model.prior.to_z(m.view(len(m), *model.latent_shape))
        return torch.sigmoid(model.decode(z))

    def forward(m):                                                   # g(m): (N, P) -> (N, K)
        return decode(m).flatten(1)[:, flat.to(device)]

    u = torch.randn(members, *model.latent_shape, generator=g).flatten(1).to(device)   # (N, P)
    post = esmda(forward, u, d_obs, obs_sd, assimilations, generator=g)
    return {"wells": torch.stack([flat // S, flat % S], 1), "obs": d_obs.cpu(),
            "prior": decode(u).cpu(), "posterior": decode(post).cpu()}


def ensemble_report(probs, wells, obs):
    """How well an ensemble of decoder probabilities (N, 1, S, S) honours the wells, and what
    its members look like (thresholded at 0.5), with Part 3's realism metrics."""
    m = (probs >= 0.5).to(torch.uint8)
    at_wells = m[:, 0, wells[:, 0], wells[:, 1]].float()              # (N, K)
    pieces, spanning = pieces_and_spanning(m[:, 0].bool())
    return {"wells_honoured": (at_wells == obs).float().mean().item(),
            "proportion": m.float().mean().item(), "blur": blur(probs),
            "pieces_mean": pieces.float().mean().item(),
            "spanning_mean": spanning.float().mean().item(),
            "mean_pairwise_hamming": mean_pairwise_hamming(m)}


def conditioning_study(model, val_x, device, n_wells=16, obs_sd=OBS_SD,
                       assimilations=ASSIMILATIONS, seed=0, log=print):
    """ES-MDA on TRUTHS different held-out images (all of them if fewer) and well sets ->
    (summary dict, the first case for the figure, every case's posterior members
    (truths * MEMBERS, 1, S, S) 0/1, the truths' held-out indices). Reported per case, then
    mean and worst over cases."""
    t0 = time.perf_counter()
    pick = torch.randperm(len(val_x), generator=torch.Generator().manual_seed(seed))[:TRUTHS]
    cases, first, members = [], None, []
    for i, idx in enumerate(pick.tolist()):
        res = condition_on_wells(model, val_x[idx], device, n_wells, MEMBERS, obs_sd,
                                 assimilations, seed + i)
        prior, post = (ensemble_report(res[k], res["wells"], res["obs"])
                       for k in ("prior", "posterior"))
        pieces, spanning = pieces_and_spanning(val_x[idx:idx + 1, 0].bool())
        spread = post["mean_pairwise_hamming"] / prior["mean_pairwise_hamming"]
        cases.append({"held_out_index": idx, "channel_wells": int(res["obs"].sum()),
                      "prior": prior, "posterior": post, "truth_pieces": int(pieces[0]),
                      "truth_spanning": int(spanning[0]),
                      "truth_proportion": val_x[idx].float().mean().item(),
                      "spread_ratio": spread})
        members.append((res["posterior"] >= 0.5).to(torch.uint8))
        first = first or (val_x[idx], res)
        log(f"truth {i + 1}/{len(pick)} (held-out image {idx}, {cases[-1]['channel_wells']} of "
            f"{n_wells} wells in a channel): wells honoured {prior['wells_honoured']:.2f} -> "
            f"{post['wells_honoured']:.2f}, pieces {prior['pieces_mean']:.2f} -> "
            f"{post['pieces_mean']:.2f}, proportion {post['proportion']:.3f} (truth "
            f"{cases[-1]['truth_proportion']:.3f}), spread ratio {cases[-1]['spread_ratio']:.2f}")
    summary = {"truths": len(cases), "wells": n_wells, "members": MEMBERS, "obs_sd": obs_sd,
               "assimilations": assimilations, "inflation": inflation_factors(assimilations),
               "prior": model.prior.name, "cases": cases}
    for key, worst in (("wells_honoured", min), ("blur", max), ("pieces_mean", max),
                       ("spanning_mean", min), ("proportion", min)):
        for ens in ("prior", "posterior"):
            vals = [c[ens][key] for c in cases]
            summary[f"{ens}_{key}"] = {"mean": sum(vals) / len(vals), "worst": worst(vals)}
    ratios = [c["spread_ratio"] for c in cases]
    summary["spread_ratio"] = {"mean": sum(ratios) / len(ratios), "worst": min(ratios)}
    # net-to-gross of the conditioned ensembles against their truths': the mean over truths
    # of the members' proportion, over the mean of the truths' (1 = unbiased)
    summary["posterior_proportion_over_truth"] = (summary["posterior_proportion"]["mean"] /
                                                  (sum(c["truth_proportion"] for c in cases)
                                                   / len(cases)))
    summary["seconds"] = time.perf_counter() - t0
    return summary, first, torch.cat(members), pick.tolist()


def conditioning_figure(truth, res, path, title):
    """The truth with its wells, then for the prior and the posterior ensemble: the mean and
    sd of the members' facies (thresholded at 0.5) and four members. Wells are drawn as red
    circles where the truth has channel and white squares where it has background, each
    with a dark or light edge, so that both stand out on both facies."""
    import matplotlib.pyplot as plt
    wells, obs = res["wells"], res["obs"].bool()
    fig, axes = plt.subplots(2, 7, figsize=(7 * 1.6 + 0.9, 2 * 1.6 + 1.1))
    fig.subplots_adjust(left=0.01, right=0.9, bottom=0.12, top=0.84, wspace=0.05, hspace=0.2)
    for r, name in enumerate(("prior", "posterior")):
        members = (res[name] >= 0.5).float()                                # (N, 1, S, S)
        panels = [(truth.float(), "truth and wells"), (members.mean(0), f"{name} mean"),
                  (members.std(0) * 2, f"{name} sd (x2)")]
        panels += [(members[i], f"{name} member {i + 1}") for i in range(4)]
        for c, (img, label) in enumerate(panels):
            ax = axes[r, c]
            shown = ax.imshow(img[0].numpy(), cmap="viridis", vmin=0, vmax=1,
                              interpolation="nearest")
            ax.scatter(wells[obs, 1], wells[obs, 0], marker="o", s=36, c="red",
                       edgecolors="white", linewidths=1, label="well in channel (1)")
            ax.scatter(wells[~obs, 1], wells[~obs, 0], marker="s", s=28, c="white",
                       edgecolors="black", linewidths=1, label="well in background (0)")
            ax.set_title(label, fontsize=7)
            ax.set_xticks([]), ax.set_yticks([])
    bar = fig.colorbar(shown, ax=axes, fraction=0.02, pad=0.01)
    bar.set_label("channel: 1 = yellow, 0 = blue\n(mean: share of members; sd doubled)",
                  fontsize=7)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
# =============================================================================================
# Part 3: measuring and plumbing
# =============================================================================================
# ------------------------------------------------------------------ the synthetic stand-in
# Each image is drawn like an object-based facies model: up to three channels whose
# centrelines are leaning sine curves, x(y) = x_mid - tan(lean) (y - S/2) + amp sin(k y +
# phase), rasterized with a constant width, younger over older. What was measured on
# re-digitized real images (13 of them are in results/real_reference.npz): 1-3 channels,
# usually 2; leans of 2-20 degrees, median about 7; wavelengths of 120-190 px; half-amplitudes
# of 10-35 px; widths of 3-16 px across the channel; proportion 0.21 +- 0.06. The generator
# takes those ranges as its bounds: wavelength uniform in 120-190 px, half-amplitude clipped
# to 10-35 px. The rest was chosen, then checked against the 13 real images by
# --compare-data (README, "The data"): 1/2/3 channels with probability 0.15/0.55/0.30; lean
# log-normal around 7 degrees plus per-channel noise, clipped to 1-22; half-amplitude
# log-normal around 27 px; width log-normal around 11 px, clipped to 4-16 px.

SYNTHETIC_DATA = Path("data/synthetic_train_images.h5")
SYNTHETIC_N = 50_000            # as many images as the real file holds
SYNTHETIC_VERSION = 1           # bump when make_synthetic_channels changes; the cache is rebuilt
REAL_REFERENCE = Path(__file__).resolve().parent / "results" / "real_reference.npz"


def make_synthetic_channels(n, size=NATIVE, seed=0):
    """n binary images in the real file's layout: uint8 (n, size, size, 1), values 0/1."""
    return np.concatenate(list(synthetic_chunks(n, size, seed)))


def synthetic_chunks(n, size=NATIVE, seed=0, chunk=500):
    """The images of make_synthetic_channels, `chunk` at a time, (B, size, size, 1) uint8:
    all random numbers are drawn first, so the images do not depend on the chunk size,
    and 50k images can be written to disk without holding them all (0.8 GB)."""
    rng = np.random.default_rng(seed)
    S, f, K = size, size / NATIVE, 3   # f scales the 128-px geometry; K = most channels per image
    L = max(1, n // 4)                 # layouts; each is reused ~4 times, shifted and re-widened,
    #                                    as the real images are cut-outs of a few larger models
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
    pick = rng.integers(0, L, n)
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
    """The path of the synthetic stand-in, generated once (50k images, about 20 s)."""
    fresh = True
    if SYNTHETIC_DATA.is_file():
        with h5py.File(SYNTHETIC_DATA, "r") as f:
            fresh = f.attrs.get("version") != SYNTHETIC_VERSION
    if fresh:
        t = time.perf_counter()
        log(f"generating {SYNTHETIC_N:,} synthetic images -> {SYNTHETIC_DATA} (once) ...")
        write_h5(SYNTHETIC_DATA, synthetic_chunks(SYNTHETIC_N, seed=0), version=SYNTHETIC_VERSION)
        log(f"  done in {time.perf_counter() - t:.0f} s")
    return SYNTHETIC_DATA


def real_reference(size):
    """The 13 re-digitized real images (results/real_reference.npz beside this file) ->
    uint8 (13, 1, size, size), or None if the file is not there (vae.py copied alone)."""
    if not REAL_REFERENCE.is_file():
        return None
    x = torch.from_numpy(np.load(REAL_REFERENCE)["images"]).permute(0, 3, 1, 2).contiguous()
    return downsample_majority(x) if size < x.shape[-1] else x


# ----------------------------------------------------------------------------- the data file
KEY = "train_images"            # the one dataset in the real file


def check_file(path, what, hint=""):
    """A path where a file belongs: it must exist and be a file, not a folder."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a {what}")
    if not path.is_file():
        raise DataError(f"{path}: {what} not found{hint}")
    return path


def load_images(path, size=64, chunk=2000):
    """An HDF5 file in the real layout -> uint8 tensor (N, 1, size, size) of 0/1.

    The file holds dataset 'train_images' of shape (N, S, S, 1) or (N, S, S); S = 2 * size
    is halved by majority vote (the real file: S = 128), S = size is read as it is. It is read
    in chunks, so 50k images are never held at full resolution or as float32. Every way a
    file can be wrong ends in a DataError that says what was found."""
    if size not in (64, NATIVE):
        raise DataError(f"size must be 64 or {NATIVE}, not {size}")
    path = check_file(path, "file", f" (the real data: {DATA_URL})")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        if KEY not in f or not isinstance(f[KEY], h5py.Dataset):
            raise DataError(f"{path}: no dataset '{KEY}'; the file holds {sorted(f.keys())}")
        d = f[KEY]
        s = d.shape[1] if len(d.shape) > 1 else 0
        if d.shape[1:] not in ((s, s, 1), (s, s)) or s not in (size, 2 * size):
            raise DataError(f"{path}: '{KEY}' has shape {d.shape}; expected (N, S, S, 1) or "
                            f"(N, S, S) with S = {2 * size} or {size} (--size {size})")
        if d.shape[0] == 0:
            raise DataError(f"{path}: '{KEY}' holds zero images")
        out = torch.empty((d.shape[0], 1, size, size), dtype=torch.uint8)
        levels = set()                      # the two values the file uses: {0, 1} or {0, 255}
        for i in range(0, d.shape[0], chunk):
            try:
                a = d[i:i + chunk].reshape(-1, 1, s, s)
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: not a readable HDF5 file, images {i}+ fail "
                                f"({e})") from None
            binary = (a == 0) | (a == 1) | (a == 255)
            if not binary.all():
                bad = np.unique(a[~binary])[:5].tolist()
                raise DataError(f"{path}: the data must be binary (0/1); found values such "
                                f"as {bad}")
            levels |= {v for v in (1, 255) if (a == v).any()}
            if levels == {1, 255}:
                raise DataError(f"{path}: the data must be binary; found three levels 0, 1 and 255")
            t = torch.from_numpy((a > 0).astype(np.uint8))
            out[i:i + len(a)] = downsample_majority(t) if s > size else t
        if levels == {255}:
            print(f"warning: {path}: values are 0/255 (an image mask); reading 255 as 1",
                  file=sys.stderr)
    return out


# ----------------------------------------------------------------------------- realism metrics
# Reservoir engineers judge a facies model by its statistics, so samples are scored the way
# geostatisticians score simulations: proportion, indicator variograms, connectivity,
# multi-point patterns, and the geometry of the channel bodies. Each score compares N prior
# samples with N held-out images; the noise floor is the same score between two disjoint
# sets of N held-out images (what "as good as real data" looks like).

def horizontal_runs(m):
    """m: (B, H, W) bool -> (B, H, W) id of the horizontal run of 1s each pixel is in
    (0 = none). Ids are unique across the whole batch."""
    left = F.pad(m, (1, 0))[..., :-1]                 # the pixel to the left, False at the edge
    start = m & ~left
    return torch.cumsum(start.flatten(), 0).view(m.shape) * m


def connected_components(m):
    """4-connected labelling. m: (B, H, W) bool -> int64 labels, 0 = background, unique
    across the batch. Each channel pixel starts with its own label; the loop alternates taking the
    largest label along every horizontal run and every vertical run until nothing changes
    (a channel that winds k times needs about k rounds, not one round per pixel)."""
    on = m.flatten()
    if not on.any():                                   # no channel pixel at all
        return torch.zeros(m.shape, dtype=torch.long)
    row_id = horizontal_runs(m).flatten()[on]                                   # (P,)
    col_id = horizontal_runs(m.transpose(1, 2)).transpose(1, 2).flatten()[on]   # (P,)
    label = torch.nonzero(on).squeeze(1) + 1                                     # (P,)
    while True:
        before = label
        for run in (row_id, col_id):
            best = torch.zeros(int(run.max()) + 1, dtype=label.dtype)
            label = best.scatter_reduce_(0, run, label, "amax")[run]
        if torch.equal(label, before):
            break
    out = torch.zeros(m.numel(), dtype=torch.long)
    out[on] = label
    return out.view(m.shape)


def piece_table(m):
    """Per 4-connected piece: its image, and whether it touches the top and the bottom edge.
    m: (B, H, W) bool -> (label image, owner (P,), top (P,), bottom (P,), inverse (pixels,))"""
    lab = connected_components(m)
    on = m.flatten()
    labels, inverse = torch.unique(lab.flatten()[on], return_inverse=True)
    image = torch.arange(len(m)).repeat_interleave(m[0].numel())[on]
    owner = torch.zeros(len(labels), dtype=torch.long).scatter_(0, inverse, image)
    top = torch.isin(labels, lab[:, 0]) & (labels > 0)
    bottom = torch.isin(labels, lab[:, -1]) & (labels > 0)
    return lab, owner, top, bottom, inverse


def pieces_and_spanning(m, table=None):
    """Per image: separate channel pieces, and pieces that run from the top edge to the
    bottom edge. m: (B, H, W) bool -> two int64 (B,) tensors."""
    _, owner, top, bottom, _ = piece_table(m) if table is None else table
    return (torch.bincount(owner, minlength=len(m)),
            torch.bincount(owner[top & bottom], minlength=len(m)))


def run_widths(m):
    """Widths of horizontal runs of 1s that do not touch the left or right edge (those are
    cut by the frame): -> (widths (R,), image index (R,))"""
    ids = horizontal_runs(m)
    lengths = torch.bincount(ids.flatten())
    image = torch.zeros_like(lengths).scatter_(
        0, ids.flatten(), torch.arange(len(m)).repeat_interleave(m[0].numel()))
    cut = torch.zeros_like(lengths, dtype=torch.bool)
    cut[ids[..., 0]] = True
    cut[ids[..., -1]] = True
    keep = (lengths > 0) & ~cut
    keep[0] = False
    return lengths[keep], image[keep]


def image_statistics(x):
    """Per-image statistics of binary images (N, 1, H, W) or (N, H, W) -> dict of (N,) arrays.
    Used to compare the synthetic stand-in with real images."""
    m = torch.as_tensor(x).bool().reshape(-1, x.shape[-2], x.shape[-1])
    n, h, w = m.shape
    stats = {"proportion": m.float().mean((1, 2)).numpy()}
    widths, image = run_widths(m)
    q = np.full((n, 3), np.nan)
    per_image = np.split(widths.numpy(), np.searchsorted(image.numpy(), np.arange(1, n)))
    for i, wi in enumerate(per_image):
        if len(wi):
            q[i] = np.percentile(wi, [10, 50, 90])
    stats["width_p10"], stats["width_p50"], stats["width_p90"] = q.T
    stats["runs_per_row"] = (m & ~F.pad(m, (1, 0))[..., :-1]).float().sum(2).mean(1).numpy()
    table = piece_table(m)
    _, owner, _, _, inverse = table
    stats["pieces"], stats["spanning"] = (v.numpy() for v in pieces_and_spanning(m, table))
    # Lean: a least-squares line x = a + b y through each piece at least H/2 tall;
    # lean = -atan(b) in degrees (positive: top-right to bottom-left), averaged per image.
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                            torch.arange(w, dtype=torch.float64), indexing="ij")
    on = m.flatten()
    y, x_ = yy.flatten().repeat(n)[on], xx.flatten().repeat(n)[on]

    def per_piece(v, how="sum"):
        init = {"sum": 0.0, "amin": math.inf, "amax": -math.inf}[how]
        out = torch.full((len(owner),), init, dtype=torch.float64)
        return out.scatter_reduce_(0, inverse, v, how)
    cnt = per_piece(torch.ones_like(y))
    my, mx = per_piece(y) / cnt, per_piece(x_) / cnt
    slope = (per_piece(x_ * y) / cnt - mx * my) / (per_piece(y * y) / cnt - my ** 2).clamp_min(1e-9)
    tall = per_piece(y, "amax") - per_piece(y, "amin") >= h / 2
    lean = -torch.rad2deg(torch.atan(slope))
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, owner[tall], lean[tall])
    stats["lean"] = (total / torch.bincount(owner[tall], minlength=n)).numpy()
    return stats


def wasserstein1(a, b):
    """1-Wasserstein distance between two 1-D empirical distributions: the area between
    their cumulative distribution functions (sizes may differ)."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    grid = np.concatenate([a, b])
    grid.sort()
    cdf_a = np.searchsorted(a, grid[:-1], side="right") / len(a)
    cdf_b = np.searchsorted(b, grid[:-1], side="right") / len(b)
    return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(grid)))


def variogram(m, axis):
    """Indicator variogram gamma(h) = 1/2 E[(x(u) - x(u+h))^2] for h = 1..S/2 along
    axis 'x' (columns) or 'y' (rows), pooled over images. m: (B, H, W) -> (S/2,)"""
    m = m.float() if axis == "x" else m.float().transpose(1, 2)
    lags = range(1, m.shape[-1] // 2 + 1)
    return torch.stack([0.5 * (m[..., h:] - m[..., :-h]).pow(2).mean() for h in lags])


def connectivity(m, axis, labels=None):
    """Connectivity function: P(two channel pixels h apart lie in the same 4-connected
    piece), h = 1..S/2, pooled over images. m: (B, H, W) bool -> (S/2,)"""
    lab = connected_components(m) if labels is None else labels
    if axis == "y":
        lab = lab.transpose(1, 2)
    curve = []
    for h in range(1, lab.shape[-1] // 2 + 1):
        a, b = lab[..., h:], lab[..., :-h]
        both = (a > 0) & (b > 0)
        curve.append(((a == b) & both).sum() / both.sum().clamp_min(1))
    return torch.stack(curve).float()


def pattern_histogram(m):
    """Pooled histogram of the 512 possible 3x3 binary patterns. m: (B, H, W) -> (512,).
    A pattern's code is sum_k 2^k x_k, k = 3 * row + column inside the 3x3 window."""
    patches = F.unfold(m.float().unsqueeze(1), 3)                 # (B, 9, L)
    codes = (patches * (2 ** torch.arange(9.0)).view(1, 9, 1)).sum(1).long()
    hist = torch.bincount(codes.flatten(), minlength=512).double()
    return hist / hist.sum()


def jensen_shannon(p, q):
    """Jensen-Shannon divergence in bits between two histograms (0 = identical, 1 = disjoint)."""
    mid = 0.5 * (p + q)

    def kl(a, b):
        nz = a > 0
        return float((a[nz] * torch.log2(a[nz] / b[nz])).sum())
    return 0.5 * kl(p, mid) + 0.5 * kl(q, mid)


def realism_scores(a, b):
    """Scores that compare two sets of binary images (N, 1, S, S); 0 = identical statistics."""
    ma, mb = a[:, 0].bool(), b[:, 0].bool()
    pa, pb = ma.float().mean((1, 2)).numpy(), mb.float().mean((1, 2)).numpy()
    p = pb.mean()
    scores = {"proportion_gap": float(abs(pa.mean() - pb.mean())),
              "proportion_w1": wasserstein1(pa, pb)}
    tables = [piece_table(m) for m in (ma, mb)]
    for axis in ("x", "y"):
        diff = variogram(ma, axis) - variogram(mb, axis)
        scores[f"variogram_{axis}"] = float(diff.pow(2).mean().sqrt() / (p * (1 - p)))
        diff = connectivity(ma, axis, tables[0][0]) - connectivity(mb, axis, tables[1][0])
        scores[f"connectivity_{axis}"] = float(diff.pow(2).mean().sqrt())
    scores["patterns_jsd"] = jensen_shannon(pattern_histogram(ma), pattern_histogram(mb))
    half = [downsample_majority(v.to(torch.uint8))[:, 0].bool() for v in (a, b)]
    scores["patterns_jsd_half"] = jensen_shannon(*(pattern_histogram(v) for v in half))
    (pieces_a, span_a), (pieces_b, span_b) = (pieces_and_spanning(m, t)
                                              for m, t in zip((ma, mb), tables))
    scores["pieces_w1"] = wasserstein1(pieces_a.numpy(), pieces_b.numpy())
    scores["spanning_gap"] = float(abs(span_a.numpy().mean() - span_b.numpy().mean()))
    scores["width_w1"] = wasserstein1(run_widths(ma)[0].numpy(), run_widths(mb)[0].numpy())
    scores["pieces_mean"] = float(pieces_a.numpy().mean())
    scores["spanning_mean"] = float(span_a.numpy().mean())
    return scores


def hamming(a, b):
    """Pairwise Hamming distances between binary images: (A, ...) x (B, ...) -> (A, B).
    |a - b| = |a| + |b| - 2 a.b, so one matrix product does all pairs."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    return a.sum(1, keepdim=True) + b.sum(1) - 2 * a @ b.T


def nearest(queries, pool, chunk=4096):
    """Each query image's nearest image in pool -> Hamming distances (Q,), indices (Q,)"""
    best = torch.full((len(queries),), float("inf"))
    index = torch.zeros(len(queries), dtype=torch.long)
    for i in range(0, len(pool), chunk):
        d, j = hamming(queries, pool[i:i + chunk]).min(1)
        closer = d < best
        best, index = torch.where(closer, d, best), torch.where(closer, j + i, index)
    return best, index


def mean_pairwise_hamming(x):
    """Mean Hamming distance over all pairs of distinct images in x (N, ...)."""
    i, j = torch.triu_indices(len(x), len(x), 1)
    return hamming(x, x)[i, j].mean().item()


def blur(probs):
    """Mean of min(p, 1 - p) over decoder probabilities: 0 = all decided, 0.5 = coin flips."""
    return torch.minimum(probs, 1 - probs).mean().item()


def near_empty(images):
    """Share of binary images (N, 1, S, S) with under 5% channel: nearly empty frames."""
    return (images.float().mean((1, 2, 3)) < 0.05).float().mean().item()


def latent_health(mu, logvar=None):
    """Codes of N images, (N, ...) -> active units (latent elements whose mean moves with the
    image: Var_x mu(x) > 0.01, the threshold of Burda et al. 2015; a unit the decoder ignores
    sits at the prior, with a variance near 0, while a used one varies on the order of 1) and
    the mismatch between the aggregate posterior and N(0, I):
    its covariance, Cov(mu) + E[diag sigma^2], should be I, and its mean E[mu] should be 0
    (both errors scaled by 1/sqrt(d)). logvar=None: mu are samples, with no sigma^2 term."""
    m = mu.flatten(1).double()
    d = m.shape[1]
    agg = torch.cov(m.T).reshape(d, d)
    if logvar is not None:
        agg = agg + torch.diag(logvar.flatten(1).double().exp().mean(0))
    agg = agg - torch.eye(d, dtype=torch.float64)
    return {"active_units": int((m.var(0) > 0.01).sum()), "latent_dim": d,
            "agg_posterior_cov_err": float(agg.norm() / math.sqrt(d)),
            "agg_posterior_mean_err": float(m.mean(0).norm() / math.sqrt(d))}


def step_changes(frames):
    """frames: (steps, paths, pixels) binary images along latent paths -> mean and max
    fraction of pixels that flip between consecutive steps (a jump shows in the max)."""
    change = (frames[1:].float() - frames[:-1].float()).abs().mean(2)      # (steps - 1, paths)
    return change.mean().item(), change.max().item()


# ----------------------------------------------------------------------------- evaluation

IWAE_K = 100                    # importance samples per image for the likelihood bound


@torch.no_grad()
def iwae_bound(model, x, k=IWAE_K):
    """Importance-weighted bound on log p(x) (Burda et al. 2015), per image (B,):
    log 1/K sum_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x). K = 1 gives the ELBO in
    expectation; it tightens towards log p(x) as K grows."""
    mu, logvar = model.encode(x)
    log_w = []
    for _ in range(k):
        z, eps = reparameterize(mu, logvar)
        log_px = -bernoulli_nll(model.decode(z), x)
        log_w.append(log_px + model.prior.log_prob(z) - log_q(eps, logvar))
    return torch.logsumexp(torch.stack(log_w), 0) - math.log(k)


@torch.no_grad()
def sample_scores(model, z, held, train_x, held_near, device):
    """Scores of the images decoded from latents z (N, *latent) against held-out images.
    held_near: each held-out image's Hamming distance to its nearest training image."""
    probs = decode_probs(model, z, device)
    samples = (probs >= 0.5).to(torch.uint8)
    near = nearest(samples, train_x)[0]
    return {"blur": blur(probs), "realism": realism_scores(samples, held),
            "proportion": samples.float().mean().item(),
            "near_empty": near_empty(samples),
            "diversity": mean_pairwise_hamming(samples) / mean_pairwise_hamming(held),
            # > 1: samples sit farther from the training images than held-out images do
            "memorisation": (near.median() / held_near.median()).item(),
            # share of samples nearer a training image than the median held-out image is
            "closer_than_held_out": (near < held_near.median()).float().mean().item()}


@torch.no_grad()
def large_field_scores(model, held, device, n=200, seed=0):
    """fullyconv only: fields drawn from a latent grid twice as wide and tall (4x the area)
    through the same prior. Pieces and spanning channels per unit area (one training image
    = one unit), and the same statistics in each of the field's four quadrants, which
    should look like training images. -> (dict, fields (n, 1, 2S, 2S) uint8)"""
    c, h, w = model.latent_shape
    z = sample_latents(model, n, torch.Generator().manual_seed(seed), grid=(2 * h, 2 * w))
    fields = (decode_probs(model, z, device, batch_size=100) >= 0.5).to(torch.uint8)
    S = held.shape[-1]
    quadrants = torch.cat([fields[..., i:i + S, j:j + S] for i in (0, S) for j in (0, S)])
    stats, data, quad = (image_statistics(v) for v in (fields, held, quadrants))
    return {"n_fields": n, "field_size": fields.shape[-1],
            "pieces_per_unit_area": float(stats["pieces"].mean() / 4),
            "spanning_per_unit_area": float(stats["spanning"].mean() / 4),
            "proportion": float(stats["proportion"].mean()),
            "quadrant_pieces": float(quad["pieces"].mean()),
            "quadrant_spanning": float(quad["spanning"].mean()),
            "quadrant_proportion": float(quad["proportion"].mean()),
            "data_pieces": float(data["pieces"].mean()),
            "data_spanning": float(data["spanning"].mean()),
            "data_proportion": float(data["proportion"].mean())}, fields


@torch.no_grad()
def evaluate(model, train_x, val_x, device, n=1000, seed=0, log=print):
    """All metrics of the trained model -> dict (written to metrics.json).

    val_x must hold 2n images: n are compared with n prior samples, the other n give
    the noise floor. Fewer held-out images shrink n."""
    model.eval()
    n = min(n, len(val_x) // 2)
    torch.manual_seed(seed)
    held, floor_set = val_x[:n], val_x[n:2 * n]
    t0 = time.perf_counter()
    out = {"n": n, "iwae_k": IWAE_K, "prior": model.prior.name}

    # 1. likelihood under the model's prior: -ELBO (beta = 1; a Monte Carlo KL for a flow)
    #    and the importance-weighted bound, nats per image; and the KL to N(0, I) for reference
    rec = kl = kl_gauss = iw = 0.0
    for i in range(0, n, 100):
        x = to_float(held[i:i + 100], device)
        _, r, k = neg_elbo(model, x, 1.0)
        rec, kl = rec + r.item() * len(x), kl + k.item() * len(x)
        kl_gauss += gaussian_kl(*model.encode(x)).sum().item()
        iw += iwae_bound(model, x).sum().item()
    pixels = held[0].numel()
    out.update(elbo_rec=rec / n, elbo_kl=kl / n, neg_elbo=(rec + kl) / n, neg_iwae=-iw / n,
               bits_per_pixel=-iw / n / pixels / math.log(2), elbo_kl_gaussian=kl_gauss / n)
    t_lik = time.perf_counter()

    # 2. reconstruction from the posterior mean, thresholded at 0.5; and of the 13 real
    #    images, never seen in training (a sim-to-real check), where the file is there
    mu, logvar = encode_all(model, held, device)
    recon = decode_probs(model, mu, device) >= 0.5
    out["recon_accuracy"] = (recon == held.bool()).float().mean().item()
    real = real_reference(held.shape[-1])
    out["real_recon_accuracy"] = None
    if real is None:
        log(f"{REAL_REFERENCE} not found: skipped the real-image reconstruction check")
    else:
        real_recon = decode_probs(model, encode_all(model, real, device)[0], device) >= 0.5
        out["real_recon_accuracy"] = (real_recon == real.bool()).float().mean().item()

    # 3. latent health: active units, and how far the aggregate posterior is from the
    #    prior's Gaussian: u = to_u(z) of one z ~ q(z|x) per image should look like N(0, I)
    z = reparameterize(mu, logvar, torch.Generator().manual_seed(seed))[0]
    codes, u = latent_health(mu), latent_health(model.prior.to_u(z.to(device))[0].cpu())
    out.update(active_units=codes["active_units"], latent_dim=codes["latent_dim"],
               agg_posterior_cov_err=u["agg_posterior_cov_err"],
               agg_posterior_mean_err=u["agg_posterior_mean_err"])

    # 4. prior samples against held-out images, and the noise floor. "posterior" decodes
    #    z ~ q(z|x) of the other n held-out images: what a prior that matched the codes
    #    exactly would give with this decoder, the best any prior can do.
    held_near = nearest(held, train_x)[0]
    fmu, flogvar = encode_all(model, floor_set, device)
    latents = {out["prior"]: sample_latents(model, n, torch.Generator().manual_seed(seed)).cpu(),
               "posterior": reparameterize(fmu, flogvar)[0]}
    out["samples"] = {name: sample_scores(model, z, held, train_x, held_near, device)
                      for name, z in latents.items()}
    out["floor"] = realism_scores(floor_set, held)
    out["data_pieces_mean"] = out["floor"]["pieces_mean"]
    out["data_spanning_mean"] = out["floor"]["spanning_mean"]
    out["data_proportion"] = floor_set.float().mean().item()
    out["data_near_empty"] = near_empty(floor_set)
    if len(model.latent_shape) > 1:
        out["large_field"] = large_field_scores(model, held, device, seed=seed)[0]
    t_real = time.perf_counter()

    # 5. interpolation: 8 spherical paths of 16 steps in u between encoded held-out pairs
    pairs = min(8, len(mu) // 2)
    frames = interpolate(model, mu[:2 * pairs].view(2, pairs, *model.latent_shape), 16,
                         device) >= 0.5                                 # (16, pairs, 1, S, S)
    out["interp_step_mean"], out["interp_step_max"] = step_changes(frames.view(16, pairs, -1))
    out["seconds"] = {"likelihood": t_lik - t0, "samples": t_real - t_lik,
                      "total": time.perf_counter() - t0}
    log(f"evaluated in {out['seconds']['total']:.0f} s (likelihood {t_lik - t0:.0f} s, "
        f"samples {t_real - t_lik:.0f} s)")
    return out


# ----------------------------------------------------------------------------- reports

@torch.no_grad()
def more_figures(model, train_x, val_x, history, out, device, note, seed=0):
    """nearest.png, losses.png, and for fullyconv large_field.png, in out/."""
    import matplotlib.pyplot as plt
    model.eval()
    g = torch.Generator().manual_seed(seed)
    # copying check: prior samples (thresholded) above their nearest training images, and
    # held-out images above theirs, for scale (the data hold shifted near-copies)
    samples = (decode_probs(model, sample_latents(model, 8, g), device) >= 0.5).to(torch.uint8)
    (ds, js), (dh, jh) = nearest(samples, train_x), nearest(val_x[:8], train_x)
    show_grid([samples.float(), train_x[js].float(), val_x[:8].float(), train_x[jh].float()],
              out / "nearest.png", f"{note}\neach prior sample and held-out image above its "
              f"nearest training image; d = Hamming distance to it in pixels",
              row_labels=["prior sample", "nearest train", "held-out", "nearest train"],
              panel_titles=[[f"d = {d:.0f}" for d in ds], None, [f"d = {d:.0f}" for d in dh],
                            None])

    if len(model.latent_shape) > 1:        # only a fully convolutional decoder can do this
        c, h, w = model.latent_shape
        fields = decode_probs(model, sample_latents(model, 6, g, grid=(2 * h, 2 * w)), device)
        show_grid([fields[:3], fields[3:]], out / "large_field.png",
                  f"{note}: six {fields.shape[-1]}x{fields.shape[-1]} fields (4x the training "
                  f"area)\nfrom ({c}, {2 * h}, {2 * w}) latent grids through {model.prior.title}",
                  panel=3.2, gap=0.08)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, term in zip(axes, ("rec", "kl")):
        train, val = history[f"train_{term}"], history[f"val_{term}"]
        ax.plot(history["epoch"], train, "o-", label="train")
        ax.plot(history["epoch"], val, "s-", label="validation")
        ax.set_xlabel("epoch"), ax.set_ylabel("nats per image"), ax.legend()
        ax.set_title({"rec": "reconstruction  -log p(x|z)", "kl": "KL(q(z|x) || p(z))"}[term])
        if len(train) > 2:             # scale to epochs 2+: epoch 1 would flatten the rest
            later = train[1:] + val[1:]
            lo, hi = min(later), max(later)
            ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
            if max(train[0], val[0]) > ax.get_ylim()[1]:
                ax.set_xlabel(f"epoch (epoch 1 is off the axis: train {train[0]:.0f}, "
                              f"validation {val[0]:.0f})")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    fig.suptitle(f"{note}: loss terms per epoch", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out / "losses.png")


# The targets set for the default commands' prior samples (results/levers.md), as
# (dense, fullyconv). Reconstruction may fall at most 0.3 points below that of the models
# trained before the shaping phase existed.
TARGETS = {"proportion": ("data +- 5%", "data +- 5%"),
           "near_empty": ("<= 0.005", "<= 0.005"),
           "pieces_mean": ("data +- 10%", "<= 2.56; goal data +- 10%"),
           "spanning_mean": ("data +- 10%", "data +- 10%"),
           "blur": ("<= 0.025", "<= 0.02"), "memorisation": (">= 0.95", ">= 0.95"),
           "recon_accuracy": (">= 0.9770", ">= 0.9900")}
RUNS = [(f"{a}{suffix}", a, label) for a in ARCHS               # (folder, arch, column header)
        for suffix, label in (("", "flow prior"), ("-gaussian", "N(0, I)"))]


def write_comparison(results_dir, held, device):
    """results/comparison.md: the runs found in results_dir (results/<arch> from the default
    commands, results/<arch>-gaussian from --prior gaussian) beside the noise floor, the data
    and the targets; results/samples_side_by_side.png: real, data and each run's samples."""
    runs = {}
    for folder, arch, label in RUNS:
        path = results_dir / folder / "metrics.json"
        m = json.loads(path.read_text()) if path.is_file() else {}
        if "data_near_empty" in m:                      # metrics of this version only
            runs[folder] = m
    if not runs:
        return
    cols = []                      # (folder, whose samples, header); each flow run's best case
    for folder, arch, label in RUNS:
        if folder in runs:
            cols.append((folder, runs[folder]["prior"], f"{arch}: {label}"))
            if folder == arch:
                cols.append((folder, "posterior", f"{arch}: posterior (best case)"))
    archs = [a for a in ARCHS if a in runs]
    first = next(iter(runs.values()))
    header = ["metric", *[c[2] for c in cols], "noise floor / data"]
    header += [f"target {a}" for a in archs]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def add(key, cells, ref=""):
        targets = [TARGETS[key][list(ARCHS).index(a)] if key in TARGETS else "" for a in archs]
        lines.append("| " + " | ".join([key, *cells, ref, *targets]) + " |")

    def value(f, p, key):
        s = runs[f]["samples"][p]
        return s["realism"].get(key, s.get(key))
    for key, floor in first["floor"].items():          # realism: value (multiple of the floor)
        if not key.endswith("_mean"):
            add(key, [f"{value(f, p, key):.4f} ({value(f, p, key) / max(floor, 1e-12):.0f}x)"
                      for f, p, _ in cols], f"{floor:.4f}")
    data = {"pieces_mean": first["data_pieces_mean"], "spanning_mean": first["data_spanning_mean"],
            "proportion": first["data_proportion"], "near_empty": first["data_near_empty"]}
    for key, fmt in (("pieces_mean", ".2f"), ("spanning_mean", ".2f"), ("proportion", ".3f"),
                     ("near_empty", ".4f"), ("blur", ".4f"), ("diversity", ".3f"),
                     ("memorisation", ".3f"), ("closer_than_held_out", ".2f")):
        add(key, [f"{value(f, p, key):{fmt}}" for f, p, _ in cols],
            f"{data[key]:{fmt}}" if key in data else "")
    # properties of a model, not of its samples: not repeated in the best-case columns
    for key, fmt in (("neg_elbo", ".1f"), ("elbo_rec", ".1f"), ("elbo_kl", ".1f"),
                     ("elbo_kl_gaussian", ".1f"), ("neg_iwae", ".1f"), ("bits_per_pixel", ".4f"),
                     ("recon_accuracy", ".4f"), ("real_recon_accuracy", ".4f"),
                     ("active_units", "d"), ("latent_dim", "d"), ("agg_posterior_cov_err", ".3f"),
                     ("agg_posterior_mean_err", ".3f"), ("interp_step_mean", ".4f"),
                     ("interp_step_max", ".4f"), ("train_minutes", ".1f")):
        add(key, ["" if p == "posterior" or runs[f].get(key) is None else f"{runs[f][key]:{fmt}}"
                  for f, p, _ in cols])
    add("trained on (train_minutes' hardware)",
        ["" if p == "posterior" or not runs[f].get("train_device") else
         f"{runs[f]['train_device']}, threads: {runs[f].get('train_threads') or '?'}"
         for f, p, _ in cols])
    n = first["n"]
    text = (f"{n} prior samples of each model against {n} held-out images; the noise floor scores "
            f"another {n} held-out images the same way. \"posterior (best case)\" decodes z ~ "
            f"q(z|x) of those other held-out images with the flow model's decoder: what a prior "
            f"that matched the codes exactly would give. Data: "
            f"{', '.join(sorted({m['data'] for m in runs.values()}))}.\n\n"
            + "\n".join(lines) + "\n")
    for f, m in runs.items():
        if "large_field" in m:
            lf, S = m["large_field"], held.shape[-1]
            rows = [("pieces per unit area", lf["pieces_per_unit_area"], lf["data_pieces"]),
                    ("top-to-bottom channels per unit area", lf["spanning_per_unit_area"],
                     lf["data_spanning"] / 2),
                    ("proportion", lf["proportion"], lf["data_proportion"]),
                    ("pieces per quadrant", lf["quadrant_pieces"], lf["data_pieces"]),
                    ("top-to-bottom channels per quadrant", lf["quadrant_spanning"],
                     lf["data_spanning"])]
            size = f"{lf['field_size']}x{lf['field_size']}"
            text += (f"\n{f}: {lf['n_fields']} fields of {size} pixels (4x the training area) "
                     f"from latent grids twice as wide, through the model's {m['prior']} prior. "
                     f"One unit of area = one {S}x{S} training image. A field "
                     f"twice as wide and tall holds twice the channels of an image, each twice as "
                     f"long, so the data's top-to-bottom channels per unit area are half those per "
                     f"image.\n\n| statistic | large fields | data |\n|---|---|---|\n"
                     + "".join(f"| {name} | {a:.3f} | {b:.3f} |\n" for name, a, b in rows))
    write_text(results_dir / "comparison.md", text)

    real = real_reference(held.shape[-1])
    rows, labels = [held[:10].float()], ["synthetic" if "synthetic" in first["data"] else "data"]
    if real is not None:
        rows, labels = [real[:10].float()] + rows, ["real"] + labels
    for f, a, label in RUNS:
        if f in runs and (results_dir / f / "model.pt").is_file():
            model = load_model(results_dir / f / "model.pt", device)
            z = sample_latents(model, 10, torch.Generator().manual_seed(1))
            rows.append(decode_probs(model, z, device))
            labels.append(f"{a}, {label}")
    show_grid(rows, results_dir / "samples_side_by_side.png",
              "real images (re-digitized), training data, and decoder probabilities of prior "
              "samples of each VAE", labels)


def compare_data(out, n=5000, seed=1):
    """The synthetic stand-in against the 13 real images: a markdown table and a figure."""
    real = real_reference(NATIVE)
    if real is None:
        raise DataError(f"{REAL_REFERENCE}: file not found; --compare-data needs the real images")
    t = time.perf_counter()
    synth = torch.from_numpy(make_synthetic_channels(n, seed=seed)).permute(0, 3, 1, 2)
    t_gen = time.perf_counter() - t
    rs, ss = image_statistics(real), image_statistics(synth)
    lines = [f"| statistic (per image, 128x128) | real: min - max (n = {len(real)}) | real: mean "
             f"(sd) | synthetic: mean (sd) (n = {n}) | synthetic mean inside real range |",
             "|---|---|---|---|---|"]
    for key in rs:
        r, s = rs[key][~np.isnan(rs[key])], ss[key][~np.isnan(ss[key])]
        inside = "yes" if r.min() <= s.mean() <= r.max() else "NO"
        lines.append(f"| {key} | {r.min():.3g} - {r.max():.3g} | {r.mean():.3g} ({r.std():.2g}) "
                     f"| {s.mean():.3g} ({s.std():.2g}) | {inside} |")
    table = "\n".join(lines)
    write_text(out / "data_comparison.md",
               f"Made by `python vae.py --compare-data` ({n} synthetic images, seed {seed}, "
               f"generated in {t_gen:.1f} s).\n\n{table}\n")
    show_grid([real.float(), synth[:len(real)].float()], out / "data_real_vs_synthetic.png",
              "top: 13 real images (re-digitized); bottom: 13 synthetic stand-in images",
              ["real", "synthetic"])
    return table


# ----------------------------------------------------------------------------- benchmark
BENCH_SECONDS = 20.0            # each timing of --benchmark takes a quarter of this


def matmul_peak(device, seconds=2.0, n=4096):
    """Measured fp32 matmul throughput of this device in GFLOP/s: the ceiling for training."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        torch.mm(a, b)
    sync()
    repeats, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        torch.mm(a, b)
        repeats += 1
        if device.type == "cuda" and repeats % 50:   # queue work; time it in batches
            continue
        sync()
    sync()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t) / 1e9


class PeerVAE(nn.Module):
    """For scale only (--benchmark): the shape of the VAE that public solutions of this
    exercise train: five stride-2 3x3 convs with batch norm (32 ... 512 channels, 64x64 down
    to 2x2), a dense 512-d latent, and a mirrored decoder of five stride-2 3x3 transposed
    convs (the fifth, 32 -> 32 channels, reaches full size) and a last 3x3 conv to logits.
    The interface of DenseVAE and FullyConvVAE, with the N(0, I) prior."""

    def __init__(self, size=64, widths=(32, 64, 128, 256, 512), latent_dim=512):
        super().__init__()
        def block(conv, c_out):
            return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.LeakyReLU())
        chans, back = [1, *widths], list(reversed(widths)) + [widths[0]]
        self.grid, self.widths, self.size = size // 2 ** len(widths), widths, size
        feat = widths[-1] * self.grid ** 2                          # flattened features
        self.encoder = nn.Sequential(*[block(nn.Conv2d(a, b, 3, 2, 1), b) for a, b in
                                       zip(chans[:-1], chans[1:])])     # (B, C, grid, grid)
        self.mu, self.logvar = nn.Linear(feat, latent_dim), nn.Linear(feat, latent_dim)
        self.expand = nn.Linear(latent_dim, feat)
        self.decoder = nn.Sequential(*[block(nn.ConvTranspose2d(a, b, 3, 2, 1, 1), b)
                                       for a, b in zip(back[:-1], back[1:])],  # (B, 32, S, S)
                                     nn.Conv2d(widths[0], 1, 3, 1, 1))          # (B, 1, S, S)
        self.latent_shape, self.prior = (latent_dim,), StandardNormal()

    def encode(self, x):
        h = self.encoder(x).flatten(1)
        return self.mu(h), self.logvar(h)

    def decode(self, z):
        return self.decoder(self.expand(z).view(-1, self.widths[-1], self.grid, self.grid))


def train_img_per_s(model, x, bf16, seconds, sync):
    """Training img/s of train_step (Part 1) on the batch x, after a warm-up."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)       # as in train()
    model.train()
    return images_per_second(lambda: train_step(model, opt, x, 1.0, 1e-4, bf16), len(x),
                             seconds, sync)


def images_per_second(step, images_per_call, seconds, sync):
    """Calls step() for at least `seconds` (and 5 calls) after 3 warm-up calls -> img/s."""
    for _ in range(3):                                         # warm-up
        step()
    sync()
    calls, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds or calls < 5:
        step()
        calls += 1
    sync()
    return calls * images_per_call / (time.perf_counter() - t)


def benchmark(model, batch_size, device, seconds, default_precision, log=print):
    """Training img/s in fp32 and, where it is native, in bf16, each back to back with the
    peer shape (PeerVAE) in the same precision; sampling img/s (fp32); FLOPs per image, and
    the share of the fp32 matmul peak that an fp32 training step reaches (3x forward)."""
    from torch.utils.flop_counter import FlopCounterMode
    size = model.size
    x = (torch.rand(batch_size, 1, size, size, device=device) > 0.8).float()
    x = x.contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter:
        neg_elbo(model, x, 1.0)
    flops = counter.get_total_flops() / batch_size                  # forward FLOPs per image
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    peer = PeerVAE(size).to(device, memory_format=torch.channels_last)
    train, peer_rate = {}, {}
    for p in ["fp32", "bf16"] if bf16_native(device) else ["fp32"]:
        train[p] = train_img_per_s(model, x, p == "bf16", seconds / 4, sync)
        peer_rate[p] = train_img_per_s(peer, x, p == "bf16", seconds / 4, sync)
        log(f"train {p}: {train[p]:.0f} img/s, the peer shape {peer_rate[p]:.0f} img/s, "
            f"{train[p] / peer_rate[p]:.1f}x")
    rate = train[default_precision]
    model.eval()
    u = torch.randn(1000, *model.latent_shape, device=device)
    with torch.no_grad():                               # sampling = the prior's f(u), then decode
        sample_rate = images_per_second(lambda: torch.sigmoid(model.decode(model.prior.to_z(u))),
                                        len(u), seconds / 4, sync)
    peak = matmul_peak(device, min(seconds / 4, 2.0))
    achieved = 3 * flops * train["fp32"] / 1e9
    result = {"device": device_name(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "batch_size": batch_size, "size": size,
              "precision": default_precision, "train_img_per_s": rate,
              "epoch_seconds_50k": 50_000 / rate,
              **{f"train_img_per_s_{p}": r for p, r in train.items()},
              **{f"peer_img_per_s_{p}": r for p, r in peer_rate.items()},
              "times_peer_fp32": rate / peer_rate["fp32"],      # the peer as its authors run it
              "times_peer_same_precision": rate / peer_rate[default_precision],
              "sample_img_per_s": sample_rate, "forward_flops_per_image": flops,
              "train_gflops_per_s_fp32": achieved, "matmul_peak_gflops_per_s": peak,
              "fraction_of_peak_fp32": achieved / peak}
    log(f"training ({default_precision}) {rate:.0f} img/s ({50_000 / rate:.0f} s per 50k-image "
        f"epoch), {result['times_peer_fp32']:.1f}x the peer shape in fp32 and "
        f"{result['times_peer_same_precision']:.1f}x in {default_precision}; sample "
        f"{sample_rate:.0f} img/s; "
        f"forward {flops / 1e6:.0f} MFLOP/img; fp32 training {achieved:.1f} GFLOP/s = "
        f"{100 * achieved / peak:.0f}% of the {peak:.0f} GFLOP/s fp32 matmul peak")
    return result


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


# ------------------------------------------------------------------ files and checkpoints
# Every file is written to a temporary name and renamed onto its own, so a crash or Ctrl-C
# midway leaves the old file (or none), never a half-written one. Everything is loaded with
# weights_only=True: plain tensors and containers, never pickled code.

def write_atomic(path, write):
    """write(tmp) fills a temporary file beside `path`, which is then renamed onto it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)         # only still there if write() was interrupted


def write_text(path, text):
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def save_figure(fig, path):
    """Save a matplotlib figure as PNG, atomically, and close it."""
    import matplotlib.pyplot as plt
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


def write_h5(path, parts, **attrs):
    """Write images, an iterable of (B, S, S, 1) uint8 arrays, in the real file's layout
    (dataset 'train_images'), gzip-compressed. The dataset grows part by part, so the
    images never need to be in memory all at once."""
    def write(tmp):
        with h5py.File(tmp, "w") as f:
            d = None
            for part in parts:
                if d is None:                   # the first part sets the image shape
                    shape = part.shape[1:]
                    d = f.create_dataset(KEY, shape=(0,) + shape, maxshape=(None,) + shape,
                                         dtype=np.uint8, compression="gzip",
                                         compression_opts=4, chunks=(64,) + shape)
                d.resize(len(d) + len(part), axis=0)
                d[-len(part):] = part
            f.attrs.update(attrs)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, write)


@torch.no_grad()
def write_samples(model, n, path, device, grid=None, seed=0, batch_size=500):
    """--sample: n prior samples, thresholded at 0.5, -> path in the real file's layout,
    uint8 (n, S, S, 1), decoded batch by batch."""
    model.eval()
    g = torch.Generator().manual_seed(seed)

    def parts():
        for i in range(0, n, batch_size):
            z = sample_latents(model, min(batch_size, n - i), g, grid)
            images = (decode_probs(model, z, device) >= 0.5).to(torch.uint8)     # (B, 1, S, S)
            yield images.permute(0, 2, 3, 1).numpy()                             # (B, S, S, 1)
    cfg = model_config(model)
    write_h5(path, parts(), arch=cfg["arch"], prior=cfg["prior"], seed=seed,
             latent_grid=str(grid or model.latent_shape[1:]))


def model_config(model):
    """What build_model needs to rebuild `model`: plain values, safe to save and load."""
    cfg = {"arch": model.arch, "size": model.size, "widths": list(model.widths),
           "prior": model.prior.name}
    cfg["latent_dim" if model.arch == "dense" else "latent_channels"] = model.latent_shape[0]
    return cfg


def code_version():
    """Which code made a file: the sha256 of this vae.py (first 12 hex digits) and, where it
    runs from a git checkout, the commit, with "+changes" when vae.py differs from it."""
    import hashlib
    import subprocess
    here = Path(__file__).resolve()
    version = {"vae_py_sha256": hashlib.sha256(here.read_bytes()).hexdigest()[:12],
               "git_commit": None}
    try:
        git = ["git", "-C", str(here.parent)]
        commit = subprocess.run(git + ["rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode == 0:
            dirty = subprocess.run(git + ["status", "--porcelain", "--", here.name],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            version["git_commit"] = commit.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass                                      # no git: the hash alone names the code
    return version


def safe_load(path, what, device="cpu"):
    """torch.load with weights_only=True: plain tensors and containers only. Each way a file
    can be wrong gets its own message: a folder, a missing file, a file that carries pickled
    Python objects (which could run code: refused, never run), and a corrupt or foreign one."""
    import pickle
    import pickletools
    path = check_file(path, what)
    try:
        with warnings.catch_warnings():     # torch warns about some foreign files; the
            # error below says why
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        error = e
    refused = f"{path}: holds pickled Python objects, which could run code; refused"
    if "GLOBAL" in str(error):                  # torch's file format, with objects inside
        raise DataError(refused) from None
    if isinstance(error, pickle.UnpicklingError):     # maybe a plain pickle: read its opcodes
        try:
            ops = {op.name for op, _, _ in pickletools.genops(path.read_bytes())}
            if ops & {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE"}:
                raise DataError(refused) from None
        except (ValueError, IndexError, EOFError):
            pass
    raise DataError(f"{path}: not a readable {what} of this script: the file is corrupt or "
                    f"not a PyTorch file ({type(error).__name__})") from None


def save_model(model, path):
    """model.pt: the weights and the config that rebuilds the model (no pickled code)."""
    save_atomic({"config": model_config(model), "state_dict": model.state_dict()}, path)


def load_model(path, device="cpu"):
    """Rebuild a model saved by save_model (or a checkpoint) -> model in eval mode."""
    saved = safe_load(path, "model file", device)
    if not isinstance(saved, dict) or "config" not in saved:
        raise DataError(f"{path}: not a model file of this script (no 'config')")
    cfg = dict(saved["config"])
    model = build_model(cfg.pop("arch"), **cfg)
    model.load_state_dict(saved["state_dict"] if "state_dict" in saved else saved["model"])
    return model.to(device, memory_format=torch.channels_last).eval()


def check_matches(path, cfg, want):
    """A saved model's or checkpoint's config must match what this run asks for."""
    for key, value in want.items():
        if value is not None and cfg.get(key) != value:
            raise DataError(f"{path}: holds a model with {key} {cfg.get(key)}, but this run "
                            f"asks for {value}")


def save_atomic(obj, path):
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def plain(d):
    """args as plain values (Path -> str), so that checkpoints load with weights_only=True."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def save_checkpoint(path, model, opt, args, state, device):
    """One dict: model, optimizer, config, args, where training stands (the Bookkeeper's
    state: epoch, step, running sums, history, seconds) and the RNG state, so a resumed run
    repeats the losses of an uninterrupted one exactly (on the same machine)."""
    save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                 "config": model_config(model), "args": plain(vars(args)), **state,
                 "rng_cpu": torch.get_rng_state(),
                 "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}, path)


def load_checkpoint(path, args):
    """A training checkpoint that matches this run's arch, size, widths and prior."""
    ckpt = safe_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "config", "epoch"} <= set(ckpt):
        raise DataError(f"{path}: not a training checkpoint of this script")
    check_matches(path, ckpt["config"], {"arch": args.arch, "size": args.size,
                                         "widths": list(args.widths), "prior": args.prior})
    return ckpt


def read_history(path):
    """history.csv -> the dict of lists that train returns (empty lists without the file)."""
    lines = path.read_text().splitlines() if path.is_file() else []
    if len(lines) < 2:
        return {k: [] for k in HISTORY}
    keys = lines[0].split(",")
    rows = [list(map(float, line.split(","))) for line in lines[1:]]
    return {k: [r[i] for r in rows] for i, k in enumerate(keys)}


def write_history(path, history):
    rows = [",".join(history)] + [",".join(map(str, row)) for row in zip(*history.values())]
    write_text(path, "\n".join(rows) + "\n")


# ------------------------------------------------------------ training plumbing and Ctrl-C
# Ctrl-C ends a run with one line and exit status 130, as a shell does, with no traceback and
# no half-written file (every write is atomic, above). During training the Bookkeeper turns
# the first Ctrl-C into a flag, checked between steps, so the checkpoint it saves never holds
# half an optimizer step. Anywhere else Ctrl-C raises KeyboardInterrupt, which main() turns
# into the one line.

HISTORY = ("epoch", "train_rec", "train_kl", "val_rec", "val_kl", "val_loss", "beta", "lr",
           "images_seen", "seconds")


class TrainingDiverged(Exception):
    """The loss became NaN or inf."""


class Interrupted(Exception):
    """Ctrl-C, caught where something could be saved; the message says what was kept."""


class Bookkeeper:
    """The plumbing of train() (Part 1), as a context manager around its loop.

    It holds where training stands, in `state`: the epoch and step to go on from, the running
    sums of the epoch's losses, the history (a list per HISTORY key), the seconds trained, and
    the last step's beta and learning rate.
    On entry it restores a checkpoint if given one (weights, optimizer, RNG, state) and turns
    Ctrl-C into a flag. step_done logs progress with an ETA every 30 s, stops on a NaN loss,
    and after a Ctrl-C saves a checkpoint and raises Interrupted. epoch_done adds the
    epoch's history row and saves a checkpoint."""

    def __init__(self, model, opt, args, steps, ckpt_path, resume, device, log):
        self.model, self.opt, self.args, self.steps = model, opt, args, steps
        self.ckpt_path, self.device, self.log = ckpt_path, device, log
        self.state = {"epoch": 0, "step": 0, "sums": [0.0, 0.0], "seconds": 0.0,
                      "history": {k: [] for k in HISTORY}, "beta_lr": [0.0, 0.0]}
        self.pressed = False
        if resume is not None:
            model.load_state_dict(resume["model"])
            opt.load_state_dict(resume["optimizer"])
            torch.set_rng_state(resume["rng_cpu"])
            if device.type == "cuda" and resume.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(resume["rng_cuda"])
            self.state = {k: resume.get(k, v) for k, v in self.state.items()}
            log(f"resumed at epoch {self.epoch + 1}, step {self.step}/{steps}"
                if self.epoch < args.epochs else
                f"resumed: the checkpoint has finished all {args.epochs} epochs")

    epoch = property(lambda self: self.state["epoch"])       # where the loops start
    step = property(lambda self: self.state["step"])
    history = property(lambda self: self.state["history"])

    def __enter__(self):
        self.old_handler = signal.signal(signal.SIGINT, self.on_ctrl_c)
        self.elapsed, self.t_start = self.state["seconds"], time.perf_counter()
        self.t_log, self.seen_log = self.t_start, 0
        self.log(f"training {self.args.epochs - self.epoch} epochs of {self.steps} steps "
                 f"(Ctrl-C saves a checkpoint; --resume continues)")
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.old_handler)

    def on_ctrl_c(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt                       # a second Ctrl-C stops at once
        self.pressed = True
        self.log("\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again to quit now)")

    def seconds(self):
        return self.elapsed + time.perf_counter() - self.t_start

    def save(self, epoch, step):
        self.state.update(epoch=epoch, step=step, seconds=self.seconds())
        save_checkpoint(self.ckpt_path, self.model, self.opt, self.args, self.state, self.device)

    def step_done(self, epoch, s, loss, rec, kl, beta, lr):
        args, sums = self.args, self.state["sums"]
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"the loss became {loss.item()} at epoch {epoch + 1}, step {s}; the last good "
                f"checkpoint {self.ckpt_path} is kept. Try a lower --lr (now {args.lr}) or a "
                f"longer KL warm-up, --warmup (now {args.warmup})")
        sums[0] += rec.item()
        sums[1] += kl.item()
        self.state["beta_lr"] = [beta, lr]                # the epoch's last, for its row
        self.seen_log += args.batch_size
        now = time.perf_counter()
        if now - self.t_log > 30 or s == self.steps - 1:              # progress, every 30 s
            rate = self.seen_log / (now - self.t_log)
            left = (self.steps * (args.epochs - epoch) - s - 1) * args.batch_size / rate
            self.log(f"epoch {epoch + 1}/{args.epochs} step {s + 1}/{self.steps}  "
                     f"rec {rec.item():7.1f}  kl {kl.item():6.1f} nats/img  beta {beta:.2f}  "
                     f"{rate:5.0f} img/s  ETA {left / 60:5.1f} min")
            self.t_log, self.seen_log = now, 0
        if self.pressed:
            self.save(epoch, s + 1)
            raise Interrupted(f"saved {self.ckpt_path} at epoch {epoch + 1}, step {s + 1}")

    def epoch_done(self, epoch, validation):
        val_loss, val_rec, val_kl = validation
        sums, seconds = self.state["sums"], self.seconds()
        row = (epoch + 1, sums[0] / self.steps, sums[1] / self.steps, val_rec, val_kl, val_loss,
               *self.state["beta_lr"], (epoch + 1) * self.steps * self.args.batch_size, seconds)
        for key, value in zip(HISTORY, row):
            self.history[key].append(value)
        self.log(f"epoch {epoch + 1} done: validation -ELBO {val_loss:.1f} = rec {val_rec:.1f} "
                 f"+ kl {val_kl:.1f} nats/img ({seconds / 60:.1f} min)")
        sums[:] = [0.0, 0.0]
        self.save(epoch + 1, 0)


# Python drops a KeyboardInterrupt raised inside a finalizer (h5py runs some while files
# close): it cannot propagate from there. main() installs this hook, which catches it and
# raises it again in the main thread 50 ms later, once the finalizer has returned.
def reraise_lost_ctrl_c(unraisable):
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        import _thread
        import threading
        threading.Timer(0.05, _thread.interrupt_main).start()
    else:
        sys.__unraisablehook__(unraisable)


# ----------------------------------------------------------------------------- command line

def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, not {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {text}")
    return value


def positive_float(text):
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


class Parser(argparse.ArgumentParser):
    def error(self, message):           # one line, like every other input error; not the usage
        self.exit(2, f"error: {message} (python vae.py --help lists the flags)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to a flag's help, once, unless its help already says the default
    in words (flags whose default depends on other flags) or it has none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text \
                or action.default == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def widths_list(text):
    """--widths "16,32,64,128" -> (16, 32, 64, 128)"""
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"comma-separated positive integers, not {text}")
    return widths


def parse_args(argv=None):
    p = Parser(description="Train VAEs that generate channel facies images.",
               formatter_class=HelpFormatter)
    p.add_argument("--arch", choices=list(ARCHS),
                   help="dense: vector latent; fullyconv: no dense layer. Required, except "
                        "with --compare-data")
    p.add_argument("--prior", choices=["flow", "gaussian"], default="flow",
                   help="flow: a normalizing flow z = f(u), u ~ N(0, I), trained with the VAE; "
                        "gaussian: the plain VAE, z ~ N(0, I)")
    p.add_argument("--size", type=int, choices=[64, NATIVE],
                   help="image size to train at (default 64; a trained model keeps its own)")
    p.add_argument("--epochs", type=positive_int,
                   help=f"passes over the data (default: {EPOCHS['dense']} dense, "
                        f"{EPOCHS['fullyconv']} fullyconv)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per step")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="peak Adam learning rate")
    p.add_argument("--beta", type=non_negative_float, default=1.0,
                   help="KL weight; 1 = the true ELBO")
    p.add_argument("--warmup", type=non_negative_float, default=1.0,
                   help="epochs of linear KL warm-up")
    p.add_argument("--shape-steps", type=non_negative_int, default=1000,
                   help="steps of the last phase that shapes the flow prior through the "
                        "frozen decoder; 0 skips it")
    p.add_argument("--latent-dim", type=positive_int, default=32,
                   help="dense: latent vector length")
    p.add_argument("--latent-channels", type=positive_int, default=8,
                   help="fullyconv: latent channels; the grid is size/16 x size/16")
    p.add_argument("--widths", type=widths_list, default=WIDTHS, metavar="W1,W2,...",
                   help="encoder channels per stride-2 stage (default: "
                        f"{','.join(map(str, WIDTHS))})")
    p.add_argument("--fp32", action="store_true",
                   help="train in fp32 also where bf16 is native (by default the encoder and "
                        "decoder run in bf16 on CPUs with AVX-512 BF16 or AMX, and on bf16 GPUs)")
    p.add_argument("--seed", type=int, default=0,
                   help="sets the split, the initial weights and the noise")
    p.add_argument("--data", type=Path, help=f"HDF5 file (default: {DEFAULT_DATA} if it exists, "
                                             f"else the synthetic stand-in)")
    p.add_argument("--out", type=Path,
                   help="output folder (default: results/<arch>, or results/<arch>-gaussian)")
    p.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    p.add_argument("--resume", type=Path, nargs="?", const="auto", metavar="CKPT",
                   help="continue from a checkpoint (default: <out>/checkpoint.pt)")
    p.add_argument("--eval-n", type=positive_int, default=1000, help="prior samples scored")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--evaluate", action="store_true",
                      help="metrics and figures from <out>/model.pt, no training")
    mode.add_argument("--sample", type=positive_int, metavar="N",
                      help="write N prior samples of <out>/model.pt to <out>/samples.h5")
    mode.add_argument("--condition", action="store_true",
                      help="ES-MDA: condition <out>/model.pt's samples on wells of held-out images")
    mode.add_argument("--benchmark", action="store_true", help="time training and sampling")
    mode.add_argument("--compare-data", action="store_true", help="real vs synthetic statistics")
    p.add_argument("--grid", type=positive_int, metavar="G",
                   help="--sample with fullyconv: a G x G latent grid (default: size/16, the "
                        "training grid)")
    p.add_argument("--wells", type=positive_int, default=16,
                   help="--condition: observed pixels per truth")
    p.add_argument("--assimilations", type=positive_int, default=ASSIMILATIONS,
                   help="--condition: ES-MDA steps N_a")
    p.add_argument("--obs-sd", type=positive_float, default=OBS_SD,
                   help="--condition: observation error sd of the channel probability at a well")
    args = p.parse_args(argv)
    if not args.compare_data and args.arch is None:
        p.error("argument --arch: required (dense or fullyconv), except with --compare-data")
    if args.grid is not None and (args.arch != "fullyconv" or args.sample is None):
        p.error("argument --grid: only with --sample and --arch fullyconv (a dense latent has "
                "no grid)")
    if args.size is None and not (args.evaluate or args.condition or args.sample):
        args.size = 64                  # a trained model keeps its own size
    if args.epochs is None and args.arch is not None:
        args.epochs = EPOCHS[args.arch]
    if args.size is not None and args.arch is not None:
        try:                            # build_model checks these flags; report its error
            build_model(args.arch, args.size, args.prior, **model_kwargs(args))
        except ValueError as e:
            p.error(str(e))
    return args


def model_kwargs(args):
    """The model-size flags that build_model takes for args.arch."""
    return {"widths": args.widths, **({"latent_dim": args.latent_dim} if args.arch == "dense"
                                      else {"latent_channels": args.latent_channels})}


def pick_device(name="auto"):
    """--device -> torch.device; a device that this torch or machine lacks is an input error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DataError(f"--device {name}: not a device name torch knows (cpu, cuda, cuda:1, "
                        f"mps, ...)") from None
    build = f"this torch ({torch.__version__})"
    if device.type == "cuda" and torch.version.cuda is None:
        raise DataError(f"--device {name}: {build} is a CPU-only build; install a CUDA build "
                        f"of torch (pytorch.org/get-started/locally) or use --device cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {name}: {build} has CUDA {torch.version.cuda}, but finds no "
                        f"usable GPU (driver?); use --device cpu")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None)
                                     and torch.backends.mps.is_available()):
        raise DataError(f"--device {name}: {build} finds no Apple GPU (MPS needs macOS on Apple "
                        f"silicon and a torch built for it); use --device cpu")
    return device


def bf16_native(device):
    """Whether this device runs bf16 matmuls and convolutions in hardware: CUDA GPUs with
    bf16, and CPUs with AVX-512 BF16 or AMX instructions whose oneDNN may use them (not
    under ONEDNN_MAX_CPU_ISA=AVX2). Elsewhere bf16 would be emulated in software."""
    if device.type == "cuda":                    # Ampere (compute capability 8) and later
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False                                                  # mps: fp32
    has = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return has and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def precision(args, device):
    """"bf16" (autocast for the encoder and decoder, see neg_elbo) where it is native,
    unless --fp32; else "fp32"."""
    return "bf16" if bf16_native(device) and not args.fp32 else "fp32"


def check_writable(folder):
    """Fail before training, not after, if results cannot be written."""
    import shutil
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_test.tmp"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise DataError(f"{folder}: cannot write results there ({e.strerror or e})") from None
    free = shutil.disk_usage(folder).free
    if free < 100e6:
        raise DataError(f"{folder}: only {free / 1e6:.0f} MB free; training needs about 100 MB")


def new_model(args, device):
    """The untrained model that args describe, on the device, in channels_last."""
    torch.manual_seed(args.seed)        # before the model is built: the seed sets its init too
    model = build_model(args.arch, args.size, args.prior, args.seed, **model_kwargs(args))
    return model.to(device, memory_format=torch.channels_last)


def run(args):
    device = pick_device(args.device)
    if args.compare_data:
        check_writable(Path("results"))
        print(compare_data(Path("results")))
        return
    out = args.out or Path("results") / (args.arch if args.prior == "flow" else
                                         f"{args.arch}-{args.prior}")
    check_writable(out)
    if args.benchmark:
        return run_benchmark(args, device, out)
    if args.evaluate or args.condition or args.sample:
        model = load_model(out / "model.pt", device)             # these use a trained model
        check_matches(out / "model.pt", model_config(model), {"arch": args.arch, "size": args.size})
        args.size = model.size
        if args.sample:
            path = out / "samples.h5"
            grid = (args.grid, args.grid) if args.grid else None
            write_samples(model, args.sample, path, device, grid, args.seed)
            print(f"wrote {args.sample} prior samples of {out / 'model.pt'} to {path}")
            return
    if not (args.evaluate or args.condition):
        model = new_model(args, device)
    # Everything that can fail on bad input is checked before anything is written.
    ckpt_path = out / "checkpoint.pt"
    resume = None
    if args.resume is not None:
        resume = load_checkpoint(ckpt_path if str(args.resume) == "auto" else args.resume, args)
    images, data_path = get_data(args.data, args.size)
    data_name = "the synthetic stand-in" if data_path == SYNTHETIC_DATA else str(data_path)
    train_x, val_x = split(images, args.seed)
    n_images = len(images)
    del images                          # the split made copies: free the original 200 MB
    if len(train_x) < args.batch_size:
        raise DataError(f"{data_path}: {n_images} images leave {len(train_x)} for training, "
                        f"fewer than one batch of {args.batch_size}")
    note = f"{args.arch} VAE trained on {data_name}"
    if args.condition:
        return run_condition(model, val_x, out, device, args, note)
    config = {**plain(vars(args)), "data_file": str(data_path), "n_images": n_images,
              "n_train": len(train_x), "n_val": len(val_x), "device": device_name(device),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "precision": precision(args, device), "code_version": code_version()}
    print(f"device {device} ({config['device']}), torch {torch.__version__}, "
          f"{config['precision']}, seed {args.seed}")
    print(f"data {data_path}: {len(train_x)} train + {len(val_x)} held-out images at "
          f"{args.size}x{args.size}")
    if args.evaluate:                   # the training run's own record, where it is there
        history = read_history(out / "history.csv")
        saved = out / "config.json"
        config = json.loads(saved.read_text()) if saved.is_file() else {}
    else:
        print("config " + json.dumps({k: config[k] for k in (
            "arch", "prior", "epochs", "batch_size", "lr", "beta", "warmup", "latent_dim",
            "latent_channels", "widths")}))
        print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"latent shape {model.latent_shape}")
        try:
            # on a GPU the uint8 images live on the device (200 MB for 50k at 64x64)
            history = train(model, train_x.to(device), val_x, args, device, ckpt_path, resume)
        except Interrupted as e:
            sample_figures(model, val_x, out, device, note, args.seed)
            raise Interrupted(f"{e} and the figures so far; resume: the same command with "
                              f"--resume") from None
        config["train_minutes"] = history["seconds"][-1] / 60        # resumed runs included
        if args.shape_steps and args.prior == "flow":                 # Part 2's last phase
            t = time.perf_counter()
            try:
                shape_prior(model, train_x.to(device), device, args.shape_steps,
                            args.batch_size, args.seed)
            except KeyboardInterrupt:
                raise Interrupted(f"Ctrl-C while shaping the prior; {ckpt_path} keeps the "
                                  f"trained model: the same command with --resume shapes it "
                                  f"again") from None
            config["shape_minutes"] = (time.perf_counter() - t) / 60
        save_model(model, out / "model.pt")
        write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
        write_history(out / "history.csv", history)
        print(f"saved {out / 'model.pt'} ({(out / 'model.pt').stat().st_size / 1e6:.1f} MB)")
    sample_figures(model, val_x, out, device, note, args.seed)
    more_figures(model, train_x, val_x, history, out, device, note, args.seed)
    metrics = evaluate(model, train_x, val_x, device, args.eval_n, args.seed)
    metrics.update(arch=args.arch, data=data_name, device=device_name(device),
                   threads=torch.get_num_threads(), torch=torch.__version__,
                   code_version=code_version(), train_minutes=config.get("train_minutes"),
                   train_device=config.get("device"), train_threads=config.get("threads"),
                   train_precision=config.get("precision"))
    write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_comparison(out.parent, val_x[:args.eval_n], device)
    s = metrics["samples"][metrics["prior"]]
    print(f"held-out -ELBO {metrics['neg_elbo']:.1f} nats/img (rec {metrics['elbo_rec']:.1f} + kl "
          f"{metrics['elbo_kl']:.1f}), reconstruction accuracy {metrics['recon_accuracy']:.4f}")
    print(f"{metrics['prior']} prior samples: blur {s['blur']:.4f}, pieces "
          f"{s['realism']['pieces_mean']:.2f} (data {metrics['data_pieces_mean']:.2f}), "
          f"top-to-bottom channels {s['realism']['spanning_mean']:.2f} (data "
          f"{metrics['data_spanning_mean']:.2f}), memorisation {s['memorisation']:.2f}")
    print(f"wrote {out}/: samples.png interpolation.png reconstructions.png losses.png "
          f"metrics.json")


def run_condition(model, val_x, out, device, args, note):
    """--condition: the ES-MDA study -> conditioning.json, .png and conditioning_members.h5"""
    model.eval()
    prior = model.prior.name
    n_wells, n_a = args.wells, args.assimilations
    if n_wells >= val_x[0].numel():
        raise DataError(f"--wells {n_wells}: an image has only {val_x[0].numel()} pixels")
    print(f"ES-MDA with the {prior} prior: {min(TRUTHS, len(val_x))} held-out truths, "
          f"{n_wells} wells each, {MEMBERS} members, {n_a} assimilations, observation sd "
          f"{args.obs_sd}")
    summary, (truth, res), members, truths = conditioning_study(
        model, val_x, device, n_wells=n_wells, obs_sd=args.obs_sd, assimilations=n_a)
    conditioning_figure(truth, res, out / "conditioning.png",
                        f"{note}, {prior} prior: ES-MDA on {n_wells} wells, {MEMBERS} members, "
                        f"{n_a} assimilations, observation sd {args.obs_sd}")
    summary.update(device=device_name(device), threads=torch.get_num_threads(),
                   code_version=code_version())
    write_text(out / "conditioning.json", json.dumps(summary, indent=2) + "\n")
    write_h5(out / "conditioning_members.h5", [members.permute(0, 2, 3, 1).numpy()],
             members_per_truth=MEMBERS, held_out_indices=truths)
    s = summary
    print(f"wells honoured {s['prior_wells_honoured']['mean']:.3f} -> "
          f"{s['posterior_wells_honoured']['mean']:.3f} (worst "
          f"{s['posterior_wells_honoured']['worst']:.3f}), spread ratio "
          f"{s['spread_ratio']['mean']:.2f} (worst {s['spread_ratio']['worst']:.2f}), "
          f"{s['seconds']:.1f} s")
    print(f"wrote {out}/: conditioning.json conditioning.png conditioning_members.h5 "
          f"({len(members)} posterior members, {MEMBERS} per truth)")


def run_benchmark(args, device, out):
    """--benchmark -> results/benchmark.json, one entry per arch, batch size and machine: the
    key names the CPU, its kernel capability (AVX512, AVX2, ...) and the threads, or the GPU."""
    result = benchmark(new_model(args, device), args.batch_size, device, BENCH_SECONDS,
                       precision(args, device))
    path = (Path("results") if args.out is None else out) / "benchmark.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    result["code_version"] = code_version()
    machine = result["device"]
    if device.type == "cpu":
        result["capability"] = torch.backends.cpu.get_cpu_capability()
        machine += f", {result['capability']}, {result['threads']} threads"
    saved[f"{args.arch}, batch {args.batch_size}, {machine}"] = result
    write_text(path, json.dumps(saved, indent=2) + "\n")
    print(f"wrote {path}")


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)     # progress shows up even in a log file
    args = parse_args(argv)
    sys.unraisablehook = reraise_lost_ctrl_c
    try:
        run(args)
    except (DataError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, DataError) else 1)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:           # Ctrl-C anywhere else: every file is written atomically
        print("interrupted: stopped by Ctrl-C; no file was left half-written", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
