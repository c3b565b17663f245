"""
Variational autoencoders that generate binary images of meandering channels.

One readable file: data -> models -> loss -> training -> evaluation -> figures -> main.

    python vae.py --arch dense        # conv encoder/decoder joined by dense layers, vector latent
    python vae.py --arch fullyconv    # no dense layer anywhere: the latent is a small image
    python vae.py --arch dense --evaluate     # metrics and figures again, from results/dense/model.pt
    python vae.py --arch dense --benchmark    # training img/s against this machine's matmul peak
    python vae.py --compare-data              # real vs synthetic image statistics
    python -m pytest -q test_vae.py

The data are 128x128 images of channel facies (1 = channel, 0 = background), by
default downsampled to 64x64. Without the real `data/train_images.h5` the script
trains on a synthetic stand-in that it generates once (see make_synthetic_channels).
"""
import argparse
import csv
import json
import math
import os
import random
import sys
import time
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
SYNTHETIC_DATA = Path("data/synthetic_train_images.h5")
SYNTHETIC_N = 50_000            # as many images as the real file holds
SYNTHETIC_VERSION = 1           # bump when make_synthetic_channels changes; the cache is rebuilt
REAL_REFERENCE = Path(__file__).resolve().parent / "results" / "real_reference.npz"
KEY = "train_images"
NATIVE = 128                    # the real images are 128x128


class DataError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------- data
# The stand-in data. Each image is drawn like an object-based facies model: up to three
# channels whose centrelines are leaning sine curves, x(y) = x_mid - tan(lean) (y - S/2)
# + amp sin(k y + phase), rasterized with a constant width, younger over older.
# The numbers come from measurements of 23 re-digitized real images (lean 2-20 degrees,
# wavelength 120-190 px, half-amplitude 10-35 px, widths 3-16 px, proportion 0.21 +- 0.06)
# and are checked against 13 of them (results/real_reference.npz): --compare-data.

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
                close = np.abs(cx[:, i] - cx[:, j]) < (width[:, i, None] + width[:, j, None]) / 2 + 6 * f
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


def write_h5(path, parts, **attrs):
    """Write images, given as an iterable of (B, S, S, 1) uint8 arrays, in the real layout,
    gzip-compressed, atomically (temporary file, then rename). The dataset grows part by
    part, so the images never need to be in memory all at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        d = None
        for part in parts:
            if d is None:                   # the first part sets the image shape
                d = f.create_dataset(KEY, shape=(0,) + part.shape[1:], maxshape=(None,) + part.shape[1:],
                                     dtype=np.uint8, compression="gzip", compression_opts=4,
                                     chunks=(64,) + part.shape[1:])
            d.resize(len(d) + len(part), axis=0)
            d[-len(part):] = part
        f.attrs.update(attrs)
    os.replace(tmp, path)


def downsample_majority(x):
    """(N, 1, S, S) uint8 0/1 -> (N, 1, S/2, S/2): majority of each 2x2 block.

    A 2-2 tie goes to the block's top-left pixel, so neither facies gains: averaging and
    thresholding would give grey values or a biased proportion, and the Bernoulli
    likelihood needs binary pixels."""
    n, c, s, _ = x.shape
    block = x.view(n, c, s // 2, 2, s // 2, 2)
    votes = block.sum((3, 5))                                  # (N, 1, S/2, S/2), 0..4
    return ((votes >= 3) | ((votes == 2) & (block[:, :, :, 0, :, 0] == 1))).to(torch.uint8)


def load_images(path, size=64, chunk=2000):
    """Read an HDF5 file in the real layout -> uint8 tensor (N, 1, size, size) of 0/1.

    Accepts (N, 128, 128, 1) or (N, 128, 128). Reads in chunks, so the 50k images are
    never held at full resolution or as float32."""
    path = Path(path)
    if size not in (64, NATIVE):
        raise DataError(f"size must be 64 or {NATIVE}, not {size}")
    if not path.is_file():
        raise DataError(f"{path}: file not found (the real data: {DATA_URL})")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        if KEY not in f or not isinstance(f[KEY], h5py.Dataset):
            raise DataError(f"{path}: no dataset '{KEY}'; the file holds {sorted(f.keys())}")
        d = f[KEY]
        if d.shape[1:] not in ((NATIVE, NATIVE, 1), (NATIVE, NATIVE)):
            raise DataError(f"{path}: '{KEY}' has shape {d.shape}; expected (N, {NATIVE}, "
                            f"{NATIVE}, 1) or (N, {NATIVE}, {NATIVE})")
        if d.shape[0] == 0:
            raise DataError(f"{path}: '{KEY}' holds zero images")
        out = torch.empty((d.shape[0], 1, size, size), dtype=torch.uint8)
        levels = set()                      # the two values the file uses: {0, 1} or {0, 255}
        for i in range(0, d.shape[0], chunk):
            try:
                a = d[i:i + chunk].reshape(-1, 1, NATIVE, NATIVE)
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: not a readable HDF5 file, images {i}+ fail ({e})") from None
            binary = (a == 0) | (a == 1) | (a == 255)
            if not binary.all():
                bad = np.unique(a[~binary])[:5].tolist()
                raise DataError(f"{path}: the data must be binary (0/1); found values such as {bad}")
            levels |= {v for v in (1, 255) if (a == v).any()}
            if levels == {1, 255}:
                raise DataError(f"{path}: the data must be binary; found three levels 0, 1 and 255")
            t = torch.from_numpy((a > 0).astype(np.uint8))
            out[i:i + len(a)] = downsample_majority(t) if size < NATIVE else t
        if levels == {255}:
            print(f"warning: {path}: values are 0/255 (an image mask); reading 255 as 1", file=sys.stderr)
    return out


def get_data(path, size, log=print):
    """The images to train on. An explicit path must exist; the default path falls back
    to the synthetic stand-in, generated once and cached in the same layout."""
    if path is not None:
        return load_images(path, size), Path(path)
    if DEFAULT_DATA.is_file():
        return load_images(DEFAULT_DATA, size), DEFAULT_DATA
    log(f"{DEFAULT_DATA} not found: using the synthetic stand-in. The real data: {DATA_URL}")
    fresh = True
    if SYNTHETIC_DATA.is_file():
        with h5py.File(SYNTHETIC_DATA, "r") as f:
            fresh = f.attrs.get("version") != SYNTHETIC_VERSION
    if fresh:
        t = time.perf_counter()
        log(f"generating {SYNTHETIC_N:,} synthetic images -> {SYNTHETIC_DATA} (once) ...")
        write_h5(SYNTHETIC_DATA, synthetic_chunks(SYNTHETIC_N, seed=0), version=SYNTHETIC_VERSION)
        log(f"  done in {time.perf_counter() - t:.0f} s")
    return load_images(SYNTHETIC_DATA, size), SYNTHETIC_DATA


# ----------------------------------------------------------------------------- models
# Both models share the convolutional trunk. The encoder halves the image four times with
# stride-2 convolutions, so its last feature map is (C, S/16, S/16): 4x4 for 64x64 images.
# The decoder mirrors it with stride-2 transposed convolutions. The default widths are
# narrow because the images are simple: 4x fewer FLOPs than 32-256 for little loss (README).

WIDTHS = (16, 32, 64, 128)              # channels after each stride-2 stage

def down(c_in, c_out):
    """(B, c_in, H, W) -> (B, c_out, H/2, W/2)"""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False),
                         nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2))


def up(c_in, c_out):
    """(B, c_in, H, W) -> (B, c_out, 2H, 2W). A 4x4 kernel with stride 2 covers every
    output pixel equally often, which avoids the checkerboard of 3x3 transposed convs."""
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


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


def build_model(arch, size=64, **kwargs):
    """A VAE with encode(x) -> (mu, logvar), decode(z) -> logits and latent_shape."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {list(ARCHS)}, not {arch!r}")
    widths = kwargs.get("widths", WIDTHS)
    if size % 2 ** len(widths):
        raise ValueError(f"size {size} must be divisible by 2^{len(widths)} (one halving per width)")
    return ARCHS[arch](size=size, **kwargs)


# ----------------------------------------------------------------------------- loss
# The negative ELBO for binary images:
#   -ELBO(x) = E_q(z|x)[-log p(x|z)] + KL(q(z|x) || p(z))
# p(x|z) is a Bernoulli per pixel, so -log p(x|z) is the binary cross-entropy of the
# decoder's logits, summed over pixels. q(z|x) = N(mu, diag sigma^2) and p(z) = N(0, I),
# so the KL has a closed form (Kingma & Welling 2014, appendix B), per latent element:
#   KL = -1/2 (1 + log sigma^2 - mu^2 - sigma^2)
# Both terms are summed over the image / the latent and averaged over the batch, so the
# numbers are nats per image. beta weights the KL (beta = 1 is the true ELBO).
#
# The KL acts on each image's posterior separately. What sampling needs is that the codes
# of *all* images together (the aggregate posterior) fill N(0, I); where they do not, a
# random z lands in a hole and decodes to broken channels. An optional MMD term (InfoVAE,
# Zhao et al. 2019) penalizes that mismatch directly, batch by batch. It is an addition to
# the ELBO, so with --mmd > 0 the training loss is no longer a pure -ELBO (the reported
# rec and kl terms still are).

def gaussian_kl(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over all latent elements: (B, ...) -> (B,)"""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).flatten(1).sum(1)


def bernoulli_nll(logits, x):
    """-log p(x|z) for binary x, summed over pixels: (B, 1, S, S) -> (B,)"""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def reparameterize(mu, logvar):
    """z = mu + sigma * eps, eps ~ N(0, I): a sample that gradients can flow through."""
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


def mmd(z, scales=(0.1, 0.2, 0.5, 1, 2, 5, 10)):
    """Maximum mean discrepancy between a batch of codes z (B, ...) and as many prior draws,
    with inverse multiquadratic kernels k(a, b) = C / (C + |a - b|^2), C = 2 d s (Tolstikhin et
    al. 2018, WAE). Zero when the codes are distributed like N(0, I)."""
    a = z.flatten(1)
    b = torch.randn_like(a)
    n, d = a.shape
    off = ~torch.eye(n, dtype=torch.bool, device=z.device)
    # squared distances (B, B) once; every scale only reweights them
    aa, bb, ab = (torch.cdist(u, v).pow(2) for u, v in ((a, a), (b, b), (a, b)))
    total = 0.0
    for s in scales:
        c = 2 * d * s
        total = total + (c / (c + aa))[off].mean() + (c / (c + bb))[off].mean() - 2 * (c / (c + ab)).mean()
    return total


def neg_elbo(model, x, beta=1.0, mmd_weight=0.0):
    """Returns (loss, rec, kl), each averaged over the batch, in nats per image."""
    mu, logvar = model.encode(x)
    z = reparameterize(mu, logvar)
    logits = model.decode(z)
    rec, kl = bernoulli_nll(logits, x).mean(), gaussian_kl(mu, logvar).mean()
    loss = rec + beta * kl
    if mmd_weight > 0:
        loss = loss + mmd_weight * mmd(z)
    return loss, rec, kl


# ----------------------------------------------------------------------------- training

def set_seed(seed):
    """One seed for python, numpy and torch; the data order has its own generator."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name="auto"):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def split(images, val_fraction, seed):
    """A random train/validation split. The real images include shifted near-copies of one
    another, so a random split leaks near-duplicates into validation (see README)."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(val_fraction * len(images)))
    return images[order[n_val:]], images[order[:n_val]]


def to_float(batch, device):
    """uint8 (B, 1, S, S) -> float32 on the device: converted per batch, never all at once.
    channels_last (NHWC) memory lets oneDNN run its fastest convolutions: +30% img/s on the
    CPU here (the model is put in channels_last too, in run())."""
    return batch.to(device, non_blocking=True).float().contiguous(memory_format=torch.channels_last)


def rotate180(x, turn):
    """Rotate the images where turn is True by 180 degrees: (B, 1, S, S) -> (B, 1, S, S).
    A half-turn keeps what the channels look like: they still run north-south and still
    lean from top-right to bottom-left, with the same widths, crossings and cuts. A
    left-right or up-down flip would reverse the lean, so it is not used. Off by default
    (--augment rot180): it cut dense's held-out -ELBO by 8 nats but did not make prior
    samples more realistic, and it made them blurrier (README, "Targets, and what was tried")."""
    return torch.where(turn.view(-1, 1, 1, 1), x.flip(-2, -1), x)


def lr_at(step, total, lr):
    """Linear warm-up over the first 200 steps (or 10% of a short run), then a cosine
    decay to 5% of lr at the end: big steps early, fine ones to settle the decoder."""
    warmup = min(200, total // 10)
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def beta_at(step, warmup_steps, beta):
    """KL warm-up: beta rises linearly from 0, so the decoder first learns to use z."""
    return beta * min(1.0, step / warmup_steps) if warmup_steps > 0 else beta


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a broken file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def validate(model, images, device, beta, batch_size=500):
    """Mean (loss, rec, kl) in nats per image over `images`, model in eval mode."""
    model.eval()
    total = torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(images), batch_size):
        x = to_float(images[i:i + batch_size], device)
        loss, rec, kl = neg_elbo(model, x, beta)
        total += torch.tensor([loss.item(), rec.item(), kl.item()]) * len(x)
    model.train()
    return (total / len(images)).tolist()


class TrainingDiverged(Exception):
    """The loss became NaN or inf."""


class Interrupted(Exception):
    """Ctrl-C: a checkpoint was saved and training can be resumed."""


def model_config(model):
    """What build_model needs to rebuild `model`: plain values, safe to save and load."""
    cfg = {"arch": "dense" if isinstance(model, DenseVAE) else "fullyconv",
           "size": model.size, "widths": list(model.widths)}
    if isinstance(model, DenseVAE):
        cfg["latent_dim"] = model.latent_shape[0]
    else:
        cfg["latent_channels"] = model.latent_shape[0]
    return cfg


def train(model, train_x, val_x, args, device, ckpt_path, resume=None, log=print):
    """Trains in place with Adam and returns the history (one entry per epoch).

    A checkpoint dict (model, optimizer, epoch, step, args, RNG state, history) is written
    atomically after every epoch and on Ctrl-C. The data order of epoch e is a function of
    (seed, e), so together with the saved RNG state a resumed run repeats the losses of an
    uninterrupted one exactly (on the CPU)."""
    bs = args.batch_size
    steps_per_epoch = len(train_x) // bs
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = round(args.warmup * steps_per_epoch)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    history = {k: [] for k in ("epoch", "train_rec", "train_kl", "val_rec", "val_kl", "val_loss",
                               "beta", "lr", "images_seen", "seconds")}
    epoch, first_step, sums, elapsed = 0, 0, [0.0, 0.0], 0.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        epoch, first_step, sums = resume["epoch"], resume["step"], list(resume["sums"])
        history, elapsed = resume["history"], resume["seconds"]
        torch.set_rng_state(resume["rng_cpu"])
        if device.type == "cuda" and resume.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(resume["rng_cuda"])
        log(f"resumed at epoch {epoch + 1}, step {first_step}/{steps_per_epoch}")

    def checkpoint(epoch, step):
        save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                     "config": model_config(model), "args": plain(vars(args)),
                     "epoch": epoch, "step": step, "sums": sums, "history": history,
                     "seconds": elapsed + time.perf_counter() - t_start,
                     "rng_cpu": torch.get_rng_state(),
                     "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
                    ckpt_path)

    # Ctrl-C sets a flag that is checked between steps, so the checkpoint never holds
    # half an optimizer step. A second Ctrl-C stops at once.
    import signal
    stop = []
    def on_sigint(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(True)
        log("\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again to quit now)")
    old_handler = signal.signal(signal.SIGINT, on_sigint)
    model.train()
    t_start = t_log = time.perf_counter()
    seen_log = 0
    try:
        for epoch in range(epoch, args.epochs):
            # The data order and the augmentation of epoch e are functions of (seed, e) only.
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
            order = torch.randperm(len(train_x), generator=g).to(train_x.device)
            turn = torch.rand(len(train_x), generator=g).to(train_x.device) < 0.5   # (N,) bool
            for s in range(first_step, steps_per_epoch):
                step = epoch * steps_per_epoch + s
                lr, beta = lr_at(step, total_steps, args.lr), beta_at(step, warmup_steps, args.beta)
                for group in opt.param_groups:
                    group["lr"] = lr
                idx = order[s * bs:(s + 1) * bs]
                x = to_float(train_x[idx], device)                          # (B, 1, S, S)
                if args.augment == "rot180":
                    x = rotate180(x, turn[idx].to(device))
                loss, rec, kl = neg_elbo(model, x, beta, args.mmd)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"the loss became {loss.item()} at epoch {epoch + 1}, step {s}; the last "
                        f"good checkpoint {ckpt_path} is kept. Try a lower --lr (now {args.lr}) "
                        f"or a longer --warmup (now {args.warmup})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums[0] += rec.item()
                sums[1] += kl.item()
                seen_log += bs
                now = time.perf_counter()
                if now - t_log > 30 or s == steps_per_epoch - 1:
                    rate = seen_log / (now - t_log)
                    left = (total_steps - step - 1) * bs / rate
                    log(f"epoch {epoch + 1}/{args.epochs} step {s + 1}/{steps_per_epoch}  "
                        f"rec {rec.item():7.1f}  kl {kl.item():6.1f} nats/img  beta {beta:.2f}  "
                        f"{rate:5.0f} img/s  ETA {left / 60:5.1f} min")
                    t_log, seen_log = now, 0
                if stop:
                    first_step = s + 1
                    checkpoint(epoch, first_step)
                    raise Interrupted(epoch, first_step)
            val_loss, val_rec, val_kl = validate(model, val_x, device, args.beta)
            n = steps_per_epoch - 0
            for key, value in (("epoch", epoch + 1), ("train_rec", sums[0] / n), ("train_kl", sums[1] / n),
                               ("val_rec", val_rec), ("val_kl", val_kl), ("val_loss", val_loss),
                               ("beta", beta), ("lr", lr), ("images_seen", (epoch + 1) * steps_per_epoch * bs),
                               ("seconds", elapsed + time.perf_counter() - t_start)):
                history[key].append(value)
            log(f"epoch {epoch + 1} done: validation -ELBO {val_loss:.1f} = rec {val_rec:.1f} "
                f"+ kl {val_kl:.1f} nats/img ({history['seconds'][-1] / 60:.1f} min)")
            first_step, sums = 0, [0.0, 0.0]
            checkpoint(epoch + 1, 0)
    finally:
        signal.signal(signal.SIGINT, old_handler)
    return history


def plain(d):
    """args as plain values (Path -> str), so that checkpoints load with weights_only=True."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def safe_load(path, what, device="cpu"):
    """torch.load with weights_only=True: tensors and plain containers only. A file that
    carries pickled Python objects (which could run code) is refused, not executed."""
    import pickle
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise DataError(f"{path}: not a readable {what} of this script: it holds pickled Python "
                        f"objects, which are refused (weights_only=True)") from None
    except Exception as e:            # truncated, corrupt, or not a torch file at all
        raise DataError(f"{path}: not a readable {what} of this script ({type(e).__name__})") from None


def save_model(model, path):
    """model.pt: the weights and the config that rebuilds the model (no pickled code)."""
    save_atomic({"config": model_config(model), "state_dict": model.state_dict()}, path)


def load_model(path, device="cpu"):
    """Rebuild a model saved by save_model (or a checkpoint) -> model in eval mode.
    weights_only=True: a file carrying pickled code objects is refused, not run."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    saved = safe_load(path, "model file", device)
    if not isinstance(saved, dict) or "config" not in saved:
        raise DataError(f"{path}: not a model file of this script (no 'config')")
    cfg = dict(saved["config"])
    model = build_model(cfg.pop("arch"), **cfg)
    model.load_state_dict(saved["state_dict"] if "state_dict" in saved else saved["model"])
    return model.to(device, memory_format=torch.channels_last).eval()


# ----------------------------------------------------------------------------- evaluation
# Reservoir engineers judge a facies model by its statistics, so the samples are scored
# the way geostatisticians score simulations: proportion, indicator variograms,
# connectivity, multi-point patterns, and the geometry of the channel bodies. Each score
# compares N prior samples with N held-out images; the noise floor is the same score
# between two disjoint sets of N held-out images (what "as good as real data" looks like).

def horizontal_runs(m):
    """m: (B, H, W) bool -> (B, H, W) id of the horizontal run of 1s each pixel is in (0 = none).
    Ids are unique across the whole batch."""
    left = F.pad(m, (1, 0))[..., :-1]                 # the pixel to the left, False at the edge
    start = m & ~left
    return torch.cumsum(start.flatten(), 0).view(m.shape) * m


def connected_components(m):
    """4-connected labelling. m: (B, H, W) bool -> int64 labels, 0 = background, unique
    across the batch. Each channel pixel starts with its own label; we alternate taking the
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
    """Per 4-connected piece: its image, whether it touches the top and the bottom edge.
    m: (B, H, W) bool -> (label image, owner (P,), top (P,), bottom (P,), inverse (pixels,))"""
    lab = connected_components(m)
    on = m.flatten()
    labels, inverse = torch.unique(lab.flatten()[on], return_inverse=True)
    image = torch.arange(len(m)).repeat_interleave(m[0].numel())[on]
    owner = torch.zeros(len(labels), dtype=torch.long).scatter_(0, inverse, image)
    top = torch.isin(labels, lab[:, 0]) & (labels > 0)
    bottom = torch.isin(labels, lab[:, -1]) & (labels > 0)
    return lab, owner, top, bottom, inverse


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
    for i, wi in enumerate(np.split(widths.numpy(), np.searchsorted(image.numpy(), np.arange(1, n)))):
        if len(wi):
            q[i] = np.percentile(wi, [10, 50, 90])
    stats["width_p10"], stats["width_p50"], stats["width_p90"] = q.T
    stats["runs_per_row"] = (m & ~F.pad(m, (1, 0))[..., :-1]).float().sum(2).mean(1).numpy()
    lab, owner, top, bottom, inverse = piece_table(m)
    stats["pieces"] = torch.bincount(owner, minlength=n).numpy()
    stats["spanning"] = torch.bincount(owner[top & bottom], minlength=n).numpy()
    # Lean: a least-squares line x = a + b y through each piece at least H/2 tall;
    # lean = -atan(b) in degrees (positive: top-right to bottom-left), averaged per image.
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    on = m.flatten()
    y, x_ = yy.flatten().repeat(n)[on], xx.flatten().repeat(n)[on]
    def per_piece(v, how="sum"):
        init = {"sum": 0.0, "amin": math.inf, "amax": -math.inf}[how]
        return torch.full((len(owner),), init, dtype=torch.float64).scatter_reduce_(0, inverse, v, how)
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
    """Pooled histogram of the 512 possible 3x3 binary patterns. m: (B, H, W) -> (512,)"""
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
    pieces = [torch.bincount(t[1], minlength=len(m)).numpy() for t, m in zip(tables, (ma, mb))]
    spans = [torch.bincount(t[1][t[2] & t[3]], minlength=len(m)).numpy() for t, m in zip(tables, (ma, mb))]
    scores["pieces_w1"] = wasserstein1(*pieces)
    scores["spanning_gap"] = float(abs(spans[0].mean() - spans[1].mean()))
    scores["width_w1"] = wasserstein1(run_widths(ma)[0].numpy(), run_widths(mb)[0].numpy())
    scores["pieces_mean"], scores["spanning_mean"] = float(pieces[0].mean()), float(spans[0].mean())
    return scores


@torch.no_grad()
def iwae_bound(model, x, k=100):
    """Importance-weighted bound on log p(x) (Burda et al. 2015), per image (B,):
    log 1/K sum_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x). K = 1 gives the ELBO in
    expectation; it tightens towards log p(x) as K grows."""
    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    log_w = []
    for _ in range(k):
        eps = torch.randn_like(mu)
        z = mu + std * eps
        log_px = -bernoulli_nll(model.decode(z), x)
        log_pz = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
        log_qz = (-0.5 * eps.pow(2) - 0.5 * logvar - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
        log_w.append(log_px + log_pz - log_qz)
    return torch.logsumexp(torch.stack(log_w), 0) - math.log(k)


def hamming(a, b):
    """Pairwise Hamming distances between binary images: (A, ...) x (B, ...) -> (A, B).
    |a - b| = |a| + |b| - 2 a.b, so one matrix product does all pairs."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    return a.sum(1, keepdim=True) + b.sum(1) - 2 * a @ b.T


def nearest_distance(queries, pool, chunk=4096):
    """Hamming distance from each query image to its nearest image in pool -> (Q,)"""
    best = torch.full((len(queries),), float("inf"))
    for i in range(0, len(pool), chunk):
        best = torch.minimum(best, hamming(queries, pool[i:i + chunk]).min(1).values)
    return best


def latent_health(mu, logvar):
    """Posterior means and log-variances of N images, (N, ...) each -> active units (latent
    elements whose mean moves with the image: Var_x mu(x) > 0.01) and the mismatch between
    the aggregate posterior and N(0, I): its covariance is Cov(mu) + E[diag sigma^2], which
    should be I, and its mean E[mu], which should be 0 (both scaled by 1/sqrt(d))."""
    m, v = mu.flatten(1).double(), logvar.flatten(1).double().exp()
    d = m.shape[1]
    agg = torch.cov(m.T).reshape(d, d) + torch.diag(v.mean(0)) - torch.eye(d, dtype=torch.float64)
    return {"active_units": int((m.var(0) > 0.01).sum()), "latent_dim": d,
            "agg_posterior_cov_err": float(agg.norm() / math.sqrt(d)),
            "agg_posterior_mean_err": float(m.mean(0).norm() / math.sqrt(d))}


def blur(probs):
    """Mean of min(p, 1 - p) over decoder probabilities: 0 = every pixel decided, 0.5 = coin flips."""
    return torch.minimum(probs, 1 - probs).mean().item()


def mean_pairwise_hamming(x):
    """Mean Hamming distance over all pairs of distinct images in x (N, ...)."""
    i, j = torch.triu_indices(len(x), len(x), 1)
    return hamming(x, x)[i, j].mean().item()


def step_changes(frames):
    """frames: (steps, paths, pixels) binary images along latent paths -> mean and max
    fraction of pixels that flip between consecutive steps (a jump shows in the max)."""
    change = (frames[1:].float() - frames[:-1].float()).abs().mean(2)      # (steps - 1, paths)
    return change.mean().item(), change.max().item()


@torch.no_grad()
def decode_probs(model, z, device, batch_size=500):
    """Decoder probabilities for latents z -> (N, 1, S, S) float on the CPU."""
    return torch.cat([torch.sigmoid(model.decode(z[i:i + batch_size].to(device))).cpu()
                      for i in range(0, len(z), batch_size)])


@torch.no_grad()
def encode_all(model, images, device, batch_size=500):
    """Posterior means and log-variances of uint8 images -> two (N, *latent_shape) tensors."""
    out = [model.encode(to_float(images[i:i + batch_size], device)) for i in range(0, len(images), batch_size)]
    return torch.cat([m.cpu() for m, _ in out]), torch.cat([v.cpu() for _, v in out])


def real_reference(size):
    """The 13 re-digitized real images (results/real_reference.npz) -> uint8 (13, 1, size, size)."""
    x = torch.from_numpy(np.load(REAL_REFERENCE)["images"]).permute(0, 3, 1, 2).contiguous()
    return downsample_majority(x) if size < NATIVE else x


@torch.no_grad()
def evaluate(model, train_x, val_x, device, n=1000, iwae_k=100, seed=0, log=print):
    """All metrics of the trained model -> dict (written to metrics.json).

    val_x must hold 2n images: n are compared with n prior samples, the other n give
    the noise floor. Fewer held-out images shrink n."""
    model.eval()
    n = min(n, len(val_x) // 2)
    torch.manual_seed(seed)
    held, floor_set = val_x[:n], val_x[n:2 * n]
    t0 = time.perf_counter()
    out = {"n": n, "iwae_k": iwae_k}

    # 1. likelihood: -ELBO (beta = 1) and the importance-weighted bound, nats per image
    rec = kl = iw = 0.0
    for i in range(0, n, 100):
        x = to_float(held[i:i + 100], device)
        _, r, k = neg_elbo(model, x, 1.0)
        rec, kl = rec + r.item() * len(x), kl + k.item() * len(x)
        iw += iwae_bound(model, x, iwae_k).sum().item()
    pixels = held[0].numel()
    out.update(elbo_rec=rec / n, elbo_kl=kl / n, neg_elbo=(rec + kl) / n, neg_iwae=-iw / n,
               bits_per_pixel=-iw / n / pixels / math.log(2))
    t_lik = time.perf_counter()

    # 2. reconstruction from the posterior mean, thresholded at 0.5
    mu, logvar = encode_all(model, held, device)
    recon = decode_probs(model, mu, device) >= 0.5
    out["recon_accuracy"] = (recon == held.bool()).float().mean().item()
    real = real_reference(held.shape[-1])
    real_recon = decode_probs(model, encode_all(model, real, device)[0], device) >= 0.5
    out["real_recon_accuracy"] = (real_recon == real.bool()).float().mean().item()

    # 3. latent health: active units and how far the aggregate posterior is from N(0, I)
    out.update(latent_health(mu, logvar))

    # 4-9. prior samples against held-out images, and the noise floor
    probs = decode_probs(model, torch.randn(n, *model.latent_shape), device)
    samples = (probs >= 0.5).to(torch.uint8)
    out["blur"] = blur(probs)
    out["realism"] = realism_scores(samples, held)
    out["floor"] = realism_scores(floor_set, held)
    out["data_pieces_mean"] = out["floor"]["pieces_mean"]
    out["data_spanning_mean"] = out["floor"]["spanning_mean"]
    out["diversity"] = mean_pairwise_hamming(samples) / mean_pairwise_hamming(held)
    out["memorisation"] = (nearest_distance(samples, train_x).median() /
                           nearest_distance(held, train_x).median()).item()
    t_real = time.perf_counter()

    # 10. interpolation: 8 straight paths of 16 steps between encoded held-out pairs
    pairs = min(8, len(mu) // 2)
    ends = mu[:2 * pairs].view(2, pairs, *model.latent_shape)
    t = torch.linspace(0, 1, 16).view(16, 1, *[1] * len(model.latent_shape))
    path = (1 - t) * ends[0].unsqueeze(0) + t * ends[1].unsqueeze(0)       # (16, pairs, *latent)
    frames = (decode_probs(model, path.flatten(0, 1), device) >= 0.5).view(16, pairs, -1)
    out["interp_step_mean"], out["interp_step_max"] = step_changes(frames)
    out["seconds"] = {"likelihood": t_lik - t0, "samples": t_real - t_lik,
                      "total": time.perf_counter() - t0}
    log(f"evaluated in {out['seconds']['total']:.0f} s (likelihood {t_lik - t0:.0f} s, "
        f"samples {t_real - t_lik:.0f} s)")
    return out


# ----------------------------------------------------------------------------- figures
# Every figure draws channels yellow on blue (viridis), as in the data's own pictures,
# and says in its title that the model was trained on the synthetic stand-in if it was.

def show_grid(rows, path, title, row_labels=None):
    """rows: list of (N, 1, H, W) tensors in [0, 1], one per figure row -> PNG at path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ncol = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.3 * ncol, 1.3 * len(rows) + 0.5), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(ncol):
            ax = axes[i, j]
            ax.set_xticks([]), ax.set_yticks([])
            if j < len(row):
                ax.imshow(row[j, 0].float().numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.axis("off")
        if row_labels:
            axes[i, 0].set_ylabel(row_labels[i], fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


@torch.no_grad()
def make_figures(model, val_x, history, out, device, data_name, seed=0):
    """samples.png, interpolation.png, reconstructions.png and losses.png in out/."""
    model.eval()
    arch = model_config(model)["arch"]
    note = f"{arch} VAE trained on {data_name}"
    torch.manual_seed(seed)
    probs = decode_probs(model, torch.randn(48, *model.latent_shape), device)
    show_grid(list(probs.view(6, 8, *probs.shape[1:])), out / "samples.png",
              f"{note}: decoder probabilities of 48 prior draws z ~ N(0, I)")

    # interpolation: between two encoded held-out images, and between two prior draws
    k = min(4, len(val_x) // 2)                                    # held-out pairs
    mu = encode_all(model, val_x[:2 * k], device)[0]
    ends = torch.cat([mu.view(2, k, *model.latent_shape), torch.randn(2, 2, *model.latent_shape)], 1)
    t = torch.linspace(0, 1, 10).view(10, 1, *[1] * len(model.latent_shape))
    path = (1 - t) * ends[0] + t * ends[1]                          # (10, k + 2, *latent)
    frames = decode_probs(model, path.flatten(0, 1), device).view(10, k + 2, *probs.shape[1:])
    rows = [frames[:, r] for r in range(k + 2)]
    for r in range(k):                                             # the real ends, for reference
        rows[r] = torch.cat([val_x[r:r + 1].float(), rows[r], val_x[k + r:k + r + 1].float()])
    show_grid(rows, out / "interpolation.png",
              f"{note}: straight latent paths (held-out image -> held-out image, ends shown; "
              f"then prior draw -> prior draw)", row_labels=["held-out"] * k + ["prior"] * 2)

    rows, labels = [], []
    for x, name in ((val_x[:8], "held-out"), (val_x[8:16], "held-out"), (real_reference(val_x.shape[-1])[:8], "real")):
        if len(x):
            rows += [x.float(), decode_probs(model, encode_all(model, x, device)[0], device)]
            labels += [name, "recon"]
    show_grid(rows, out / "reconstructions.png",
              f"{note}: inputs and reconstructions from the posterior mean", row_labels=labels)

    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, term in zip(axes, ("rec", "kl")):
        ax.plot(history["epoch"], history[f"train_{term}"], "o-", label="train")
        ax.plot(history["epoch"], history[f"val_{term}"], "s-", label="validation")
        ax.set_xlabel("epoch"), ax.set_ylabel("nats per image"), ax.legend()
        if term == "rec":
            ax.set_yscale("log")          # the first epoch's loss would flatten the rest
        ax.set_title({"rec": "reconstruction  -log p(x|z)", "kl": "KL(q(z|x) || p(z))"}[term])
    fig.suptitle(f"{note}: loss terms per epoch", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=80)
    plt.close(fig)


# The targets this project set itself (dense, fullyconv); realism scores are in multiples
# of the noise floor. "<=" means lower is better.
TARGETS = {"realism": ("<= 3x floor", "<= 5x floor"), "blur": ("<= 0.03", "<= 0.05"),
           "recon_accuracy": (">= 0.98", ">= 0.97"), "real_recon_accuracy": (">= 0.95", ">= 0.93"),
           "agg_posterior_cov_err": ("<= 0.2", "<= 0.3")}


def write_comparison(results_dir, held, device):
    """results/comparison.md: each arch's metrics.json beside the noise floor and the
    targets, and results/samples_side_by_side.png: real, synthetic and prior samples."""
    metrics = {a: json.loads((results_dir / a / "metrics.json").read_text())
               for a in ARCHS if (results_dir / a / "metrics.json").is_file()}
    if not metrics:
        return
    names, first = list(metrics), next(iter(metrics.values()))
    def row(cells):
        return "| " + " | ".join(cells) + " |"
    lines = [row(["metric"] + names + ["noise floor / data"] + [f"target {a}" for a in names]),
             row(["---"] * (2 + 2 * len(names)))]
    for key, floor in first["floor"].items():            # realism: value (multiple of floor)
        if key.endswith("_mean"):
            continue
        cells = [f"{metrics[a]['realism'][key]:.4f} ({metrics[a]['realism'][key] / max(floor, 1e-12):.0f}x)"
                 for a in names]
        lines.append(row([key] + cells + [f"{floor:.4f}"] + [TARGETS["realism"][list(ARCHS).index(a)] for a in names]))
    extra = {"pieces_mean": f"{first['data_pieces_mean']:.2f}", "spanning_mean": f"{first['data_spanning_mean']:.2f}"}
    for key, fmt in (("pieces_mean", ".2f"), ("spanning_mean", ".2f"), ("blur", ".4f"),
                     ("recon_accuracy", ".4f"), ("real_recon_accuracy", ".4f"), ("neg_elbo", ".1f"),
                     ("elbo_rec", ".1f"), ("elbo_kl", ".1f"), ("neg_iwae", ".1f"), ("bits_per_pixel", ".4f"),
                     ("active_units", "d"), ("latent_dim", "d"), ("agg_posterior_cov_err", ".3f"),
                     ("agg_posterior_mean_err", ".3f"), ("diversity", ".3f"), ("memorisation", ".3f"),
                     ("interp_step_mean", ".4f"), ("interp_step_max", ".4f"), ("train_minutes", ".1f")):
        vals = [metrics[a]["realism"].get(key, metrics[a].get(key)) for a in names]
        goals = [TARGETS[key][list(ARCHS).index(a)] if key in TARGETS else "" for a in names]
        lines.append(row([key] + ["-" if v is None else f"{v:{fmt}}" for v in vals] + [extra.get(key, "")] + goals))
    data = sorted({metrics[a].get("data", "?") for a in names})
    (results_dir / "comparison.md").write_text(
        f"{first['n']} prior samples of each model against {first['n']} held-out images; the noise floor "
        f"scores another {first['n']} held-out images the same way. Data: {', '.join(data)}.\n\n"
        + "\n".join(lines) + "\n")
    rows, labels = [real_reference(held.shape[-1])[:10].float(), held[:10].float()], ["real", "synthetic"]
    for a in names:
        if (results_dir / a / "model.pt").is_file():
            model = load_model(results_dir / a / "model.pt", device)
            torch.manual_seed(1)
            rows.append(decode_probs(model, torch.randn(10, *model.latent_shape), device))
            labels.append(a)
    show_grid(rows, results_dir / "samples_side_by_side.png",
              "real images (re-digitized), synthetic stand-in, and prior samples of each VAE "
              "(decoder probabilities)", labels)


def compare_data(out, n=5000, seed=1):
    """The synthetic stand-in against the 13 real images: a markdown table and a figure."""
    real = torch.from_numpy(np.load(REAL_REFERENCE)["images"]).permute(0, 3, 1, 2)
    t = time.perf_counter()
    synth = torch.from_numpy(make_synthetic_channels(n, seed=seed)).permute(0, 3, 1, 2)
    t_gen = time.perf_counter() - t
    rs, ss = image_statistics(real), image_statistics(synth)
    lines = [f"| statistic (per image, 128x128) | real: min - max (n = {len(real)}) | real: mean (sd) "
             f"| synthetic: mean (sd) (n = {n}) | synthetic mean inside real range |", "|---|---|---|---|---|"]
    for key in rs:
        r, s = rs[key][~np.isnan(rs[key])], ss[key][~np.isnan(ss[key])]
        inside = "yes" if r.min() <= s.mean() <= r.max() else "NO"
        lines.append(f"| {key} | {r.min():.3g} - {r.max():.3g} | {r.mean():.3g} ({r.std():.2g}) "
                     f"| {s.mean():.3g} ({s.std():.2g}) | {inside} |")
    table = "\n".join(lines)
    (out / "data_comparison.md").write_text(
        f"Made by `python vae.py --compare-data` ({n} synthetic images, seed {seed}, generated in "
        f"{t_gen:.1f} s).\n\n{table}\n")
    show_grid([real.float(), synth[:len(real)].float()], out / "data_real_vs_synthetic.png",
              "top: 13 real images (re-digitized); bottom: 13 synthetic stand-in images",
              ["real", "synthetic"])
    return table


# ----------------------------------------------------------------------------- benchmark

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


def benchmark(model, batch_size, device, seconds=10.0, log=print):
    """Training and sampling img/s on random binary batches, FLOPs per image, and the
    fraction of the matmul peak that a training step reaches (counted as 3x forward)."""
    from torch.utils.flop_counter import FlopCounterMode
    size = model_config(model)["size"]
    x = (torch.rand(batch_size, 1, size, size, device=device) > 0.8).float()
    with FlopCounterMode(display=False) as counter:
        neg_elbo(model, x, 1.0)
    flops = counter.get_total_flops() / batch_size                  # forward FLOPs per image
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()

    def train_step():
        loss = neg_elbo(model, x, 1.0)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def timed(step, images_per_call):
        for _ in range(3):                                         # warm-up
            step()
        sync()
        calls, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds / 2 or calls < 5:
            step()
            calls += 1
        sync()
        return calls * images_per_call / (time.perf_counter() - t)

    train_rate = timed(train_step, batch_size)
    model.eval()
    z = torch.randn(1000, *model.latent_shape, device=device)
    with torch.no_grad():
        sample_rate = timed(lambda: torch.sigmoid(model.decode(z)), len(z))
    peak = matmul_peak(device, min(seconds / 2, 2.0))
    achieved = 3 * flops * train_rate / 1e9
    result = {"device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "batch_size": batch_size, "size": size, "train_img_per_s": train_rate,
              "epoch_seconds_50k": 50_000 / train_rate, "sample_img_per_s": sample_rate,
              "forward_flops_per_image": flops, "train_gflops_per_s": achieved,
              "matmul_peak_gflops_per_s": peak, "fraction_of_peak": achieved / peak}
    log(f"train {train_rate:.0f} img/s ({50_000 / train_rate:.0f} s per 50k-image epoch), "
        f"sample {sample_rate:.0f} img/s, forward {flops / 1e6:.0f} MFLOP/img, "
        f"train {achieved:.1f} GFLOP/s = {100 * achieved / peak:.0f}% of the {peak:.0f} GFLOP/s matmul peak")
    return result


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


# ----------------------------------------------------------------------------- main

def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train VAEs that generate channel facies images.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", choices=list(ARCHS), help="dense: vector latent; fullyconv: no dense layer")
    p.add_argument("--size", type=int, choices=[64, 128], default=64, help="image size to train at")
    p.add_argument("--epochs", type=positive_int, default=28)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=2e-3, help="peak Adam learning rate")
    p.add_argument("--beta", type=non_negative_float, default=1.0, help="KL weight; 1 = the true ELBO")
    p.add_argument("--mmd", type=non_negative_float,
                   help="weight of the MMD(q(z), p(z)) term (default: 1000 for dense, 0 for fullyconv)")
    p.add_argument("--augment", choices=["none", "rot180"], default="none",
                   help="rot180: turn a random half of each batch by 180 degrees (README: "
                        "better likelihood for dense, no better samples)")
    p.add_argument("--warmup", type=non_negative_float, default=1.0, help="epochs of linear KL warm-up")
    p.add_argument("--latent-dim", type=positive_int, default=32, help="dense: latent vector length")
    p.add_argument("--latent-channels", type=positive_int, default=8,
                   help="fullyconv: latent channels; the grid is size/16 x size/16")
    p.add_argument("--widths", default=",".join(map(str, WIDTHS)), help="encoder channels per stride-2 stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out share of the images")
    p.add_argument("--data", type=Path, help=f"HDF5 file (default {DEFAULT_DATA}, else synthetic)")
    p.add_argument("--out", type=Path, help="output folder (default results/<arch>)")
    p.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    p.add_argument("--resume", type=Path, nargs="?", const="auto",
                   help="continue from a checkpoint (default <out>/checkpoint.pt)")
    p.add_argument("--evaluate", action="store_true", help="metrics and figures from <out>/model.pt, no training")
    p.add_argument("--benchmark", action="store_true", help="time training and sampling, then exit")
    p.add_argument("--bench-seconds", type=positive_float, default=10.0, help="benchmark: seconds per timing")
    p.add_argument("--compare-data", action="store_true", help="real vs synthetic statistics, then exit")
    p.add_argument("--eval-n", type=positive_int, default=1000, help="prior samples scored")
    p.add_argument("--iwae-k", type=positive_int, default=100, help="importance samples per image")
    args = p.parse_args(argv)
    if not args.compare_data and args.arch is None:
        p.error("--arch is required (dense or fullyconv)")
    if args.mmd is None:          # measured: helps the dense latent, hurts the spatial one (README)
        args.mmd = 1000.0 if args.arch == "dense" else 0.0
    if not 0 < args.val_fraction < 1:
        p.error(f"argument --val-fraction: must be between 0 and 1, not {args.val_fraction}")
    try:
        args.widths = tuple(int(w) for w in args.widths.split(","))
        assert all(w > 0 for w in args.widths) and args.size % 2 ** len(args.widths) == 0
    except (ValueError, AssertionError):
        p.error(f"argument --widths: comma-separated positive integers, at most "
                f"{int(math.log2(args.size))} of them (got {args.widths})")
    return args


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


def run(args):
    set_seed(args.seed)                 # before the model is built: the seed sets its init too
    device = pick_device(args.device)
    out = args.out or Path("results") / (args.arch or "")
    if args.compare_data:
        check_writable(Path("results"))
        print(compare_data(Path("results")))
        return
    kwargs = {"latent_dim": args.latent_dim} if args.arch == "dense" else {"latent_channels": args.latent_channels}
    model = build_model(args.arch, args.size, widths=args.widths, **kwargs)
    model = model.to(device, memory_format=torch.channels_last)
    if args.benchmark:
        check_writable(out.parent if args.out is None else out)
        result = benchmark(model, args.batch_size, device, args.bench_seconds)
        path = (Path("results") if args.out is None else out) / "benchmark.json"
        saved = json.loads(path.read_text()) if path.is_file() else {}
        saved[f"{args.arch}_{device.type}"] = result
        path.write_text(json.dumps(saved, indent=2) + "\n")
        print(f"wrote {path}")
        return

    # Everything that can fail on bad input is checked before anything is written.
    check_writable(out)
    ckpt_path = out / "checkpoint.pt"
    resume = None
    if args.resume is not None:
        path = ckpt_path if str(args.resume) == "auto" else args.resume
        resume = load_checkpoint(path, args)
    if args.evaluate:
        model = load_model(out / "model.pt", device)
        if model_config(model)["arch"] != args.arch:
            raise DataError(f"{out / 'model.pt'}: holds a {model_config(model)['arch']} model, not {args.arch}")
        args.size = model_config(model)["size"]
    images, data_path = get_data(args.data, args.size)
    data_name = ("the synthetic stand-in" if data_path == SYNTHETIC_DATA else str(data_path))
    train_x, val_x = split(images, args.val_fraction, args.seed)
    n_images = len(images)
    del images                          # the split made copies: free the original 200 MB
    if len(train_x) < args.batch_size:
        raise DataError(f"{data_path}: {n_images} images leave {len(train_x)} for training, "
                        f"fewer than one batch of {args.batch_size}")
    config = {**plain(vars(args)),
              "data_file": str(data_path), "n_images": n_images, "n_train": len(train_x),
              "n_val": len(val_x), "device": device_name(device), "torch": torch.__version__}
    print(f"device {device} ({config['device']}), torch {torch.__version__}, seed {args.seed}")
    print(f"data {data_path}: {len(train_x)} train + {len(val_x)} held-out images at {args.size}x{args.size}")

    if not args.evaluate:
        print("config " + json.dumps({k: config[k] for k in ("arch", "epochs", "batch_size", "lr", "beta",
                                                               "warmup", "mmd", "latent_dim",
                                                               "latent_channels", "widths")}))
        print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"latent shape {model.latent_shape}")
        try:
            # on a GPU the uint8 images live on the device (200 MB for 50k at 64x64)
            history = train(model, train_x.to(device), val_x, args, device, ckpt_path, resume)
        except Interrupted:
            make_figures(model, val_x, load_checkpoint(ckpt_path, args)["history"], out, device, data_name)
            again = [a for a in sys.argv[1:] if a != "--resume"] if argv_is_cli() else ["--arch", args.arch]
            print(f"saved {ckpt_path} and the figures so far; resume with:\n  python vae.py "
                  f"{' '.join(again)} --resume", file=sys.stderr)
            sys.exit(130)
        config["train_minutes"] = history["seconds"][-1] / 60        # resumed runs included
        save_model(model, out / "model.pt")
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        with open(out / "history.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(history.keys())
            w.writerows(zip(*history.values()))
        print(f"saved {out / 'model.pt'} ({(out / 'model.pt').stat().st_size / 1e6:.1f} MB)")
    else:
        history = read_history(out / "history.csv")
        config["train_minutes"] = json.loads((out / "config.json").read_text()).get("train_minutes") \
            if (out / "config.json").is_file() else None
    make_figures(model, val_x, history, out, device, data_name)
    metrics = evaluate(model, train_x, val_x, device, args.eval_n, args.iwae_k, args.seed)
    metrics.update(arch=args.arch, data=data_name, device=config["device"], train_minutes=config["train_minutes"])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_comparison(out.parent, val_x[:args.eval_n], device)
    r = metrics["realism"]
    print(f"held-out -ELBO {metrics['neg_elbo']:.1f} nats/img (rec {metrics['elbo_rec']:.1f} + kl "
          f"{metrics['elbo_kl']:.1f}), reconstruction accuracy {metrics['recon_accuracy']:.4f}, "
          f"blur {metrics['blur']:.4f}, pieces {r['pieces_mean']:.2f} (data {metrics['data_pieces_mean']:.2f})")
    print(f"wrote {out}/: samples.png interpolation.png reconstructions.png losses.png metrics.json")


def argv_is_cli():
    return Path(sys.argv[0]).name == "vae.py"


def read_history(path):
    if not path.is_file():
        return {k: [] for k in ("epoch", "train_rec", "train_kl", "val_rec", "val_kl")}
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows] for k in rows[0]} if rows else read_history(Path("/nonexistent"))


def load_checkpoint(path, args):
    """A training checkpoint that matches args.arch and args.size, loaded without pickled code."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    ckpt = safe_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "config", "epoch"} <= set(ckpt):
        raise DataError(f"{path}: not a training checkpoint of this script")
    cfg = ckpt["config"]
    for key, want in (("arch", args.arch), ("size", args.size), ("widths", list(args.widths))):
        if cfg.get(key) != want:
            raise DataError(f"{path}: checkpoint has {key} {cfg.get(key)}, but this run asks for {want}")
    return ckpt


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)     # progress shows up even in a log file
    args = parse_args(argv)
    try:
        run(args)
    except (DataError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, DataError) else 1)


if __name__ == "__main__":
    main()
