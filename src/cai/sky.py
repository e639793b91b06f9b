"""A deterministic synthetic SDSS-main-sample-like galaxy catalogue with images.

The model, per galaxy:

* Redshift from dN/dz ~ z^2 exp(-(z/z_c)^1.5), mode 0.1, drawn as
  z = z_c * Gamma(2)^(1/1.5) and redrawn outside 0.005 < z < 0.4.
* A continuous type t in [0, 1] (0 = red/early, 1 = blue/late) from a two-Beta
  mixture (40 % red). Each galaxy is a red bulge (Sersic n ~ 4) plus a blue
  exponential disc; the type sets the bulge's share of the r-band light,
  B/T = (1 - t)^1.5 with scatter, and through it the K-correction and the colours.
* Flat LCDM distances (H0 = 70 km/s/Mpc, Omega_m = 0.3) from a tabulated integral.
* Absolute magnitude M_r ~ Normal(mu(t), 0.8) truncated, by an inverse-CDF draw, so
  that the apparent r = M_r + DM(z) + K_r(z) lies in the main-sample range
  [13.5, 17.77].
* Colours u-g, g-r, r-i, i-z of each component from linear colour-redshift tracks
  (the bulge on the red sequence, the disc in the blue cloud) plus intrinsic
  scatter; the galaxy's colours are those of the summed fluxes. Because bulge and
  disc differ in colour and profile, a galaxy's colour changes from its centre to
  its outskirts, as in real galaxies: the images say more about the type, and so
  about the redshift, than the total colours do.
* SDSS-like photometric errors from the 5-sigma point-source depths, degraded for
  extended sources; catalogue magnitudes are the true ones plus that noise.
* 5x32x32 images (pixel scale 0.396", band order u, g, r, i, z): the bulge and the
  disc as elliptical Sersic profiles (2x oversampled), each convolved with a
  Gaussian PSF per band as separable Toeplitz matrix products, mixed by the band's
  bulge fraction and scaled so that each noise-free band sums to the flux of the
  catalogue magnitude, plus Gaussian sky noise per pixel whose sigma follows from
  the depths.

Pixels are in nanomaggies with zero point 22.5: flux_nmgy = 10**(-0.4 (m - 22.5)).

Determinism: chunk k (rows k*SIM_CHUNK_ROWS onwards) draws from
``default_rng(SeedSequence([seed, k]))``; the catalogue quantities of a chunk are
always drawn for all SIM_CHUNK_ROWS rows, so a file of n galaxies is the prefix of
any longer file with the same seed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cai.formats import BANDS, IMAGE_SHAPE, GalaxyBatch, GalaxyWriter

ZERO_POINT_MAG = 22.5  # mag of 1 nanomaggy; pixel unit is the nanomaggy
SIM_CHUNK_ROWS = 4096  # galaxies per generated chunk (fixed: part of determinism)
MODEL_VERSION = 2  # bump when the model changes the generated arrays

# --- Redshift distribution -------------------------------------------------------
Z_MODE = 0.1  # mode of dN/dz
Z_C = Z_MODE / (4.0 / 3.0) ** (2.0 / 3.0)  # ~ 0.0826, scale of dN/dz
Z_MIN, Z_MAX = 0.005, 0.4  # accepted redshift range
Z_REDRAW_ROUNDS = 64  # redraw rounds before clipping (P(out) ~ 3e-4 per draw)

# --- Galaxy type -----------------------------------------------------------------
RED_FRACTION = 0.4  # fraction of red/early galaxies
RED_BETA = (2.0, 9.0)  # Beta(a, b) of t for red galaxies, mean ~ 0.18
BLUE_BETA = (6.0, 3.0)  # Beta(a, b) of t for blue galaxies, mean ~ 0.67

# --- Cosmology -------------------------------------------------------------------
H0 = 70.0  # km/s/Mpc
OMEGA_M = 0.3  # matter density; flat, so Omega_L = 0.7
C_KM_S = 299_792.458  # speed of light, km/s
DIST_GRID_Z_MAX = 0.5  # top of the tabulated distance grid
DIST_GRID_POINTS = 4001  # grid points (dz = 1.25e-4)
PC_PER_MPC = 1.0e6
ARCSEC_PER_RAD = 180.0 / math.pi * 3600.0

# --- Luminosity and flux limits --------------------------------------------------
M_R_MEAN_RED = -21.3  # mag, mean M_r of t = 0
M_R_MEAN_BLUE = -20.8  # mag, mean M_r of t = 1
M_R_SD = 0.8  # mag
R_BRIGHT, R_FAINT = 13.5, 17.77  # mag, SDSS main-sample apparent r range
K_R_BLUE, K_R_RED_EXTRA = 0.5, 1.0  # K_r(z) = (0.5 + 1.0 (1 - t)) z, mag

# --- Colour tracks: colour = a + b z, columns u-g, g-r, r-i, i-z -----------------
# The bulge follows the red sequence, the disc the blue cloud.
RED_COLOUR_A = np.array([1.75, 0.75, 0.38, 0.30])  # mag
RED_COLOUR_B = np.array([1.00, 2.00, 0.60, 0.30])  # mag per unit z
BLUE_COLOUR_A = np.array([1.20, 0.45, 0.28, 0.15])  # mag
BLUE_COLOUR_B = np.array([0.80, 1.10, 0.30, 0.40])  # mag per unit z
# Intrinsic scatter of a component's colours at fixed redshift (mag), about that of
# the SDSS red sequence (g-r about 0.03 mag), more in u-g; the spread of the galaxies'
# colours comes mostly from their spread in bulge-to-total ratio.
COLOUR_SCATTER = np.array([0.06, 0.03, 0.02, 0.03])

# --- Structure: bulge + disc -----------------------------------------------------
BT_POWER = 1.5  # r-band bulge-to-total ratio B/T = (1 - t)^BT_POWER, before scatter
BT_SCATTER = 0.05  # Gaussian scatter of B/T (then clipped to [0, 1])
BULGE_SERSIC = 4.0  # Sersic index of bulges (de Vaucouleurs)
BULGE_SERSIC_SCATTER_DEX = 0.1  # log-normal scatter of the bulge index, dex
BULGE_SERSIC_MIN, BULGE_SERSIC_MAX = 2.0, 6.0
DISC_SERSIC = 1.0  # exponential discs
RE_KPC_DISC = 4.5  # kpc, median disc half-light radius at M_r = -21
RE_LUM_SLOPE = -0.12  # dex per mag of M_r (R_e ~ L^0.3)
RE_SCATTER_DEX = 0.15  # dex, of the disc radius
# Median bulge / disc half-light radius: bulges are compact (in spirals about 0.1 to
# 0.3 of the disc's radius), so a galaxy's colour reddens towards its centre.
BULGE_RE_RATIO = 0.35
BULGE_RE_SCATTER_DEX = 0.1  # dex
RE_MIN_PX, RE_MAX_PX = 0.5, 12.0  # clip of the angular half-light radii, pixels
Q_MIN_BULGE, Q_MIN_DISC = 0.6, 0.25  # axis ratios drawn uniform in [q_min, 1]

# --- Imaging ---------------------------------------------------------------------
PIXEL_SCALE = 0.396  # arcsec per pixel
STAMP = IMAGE_SHAPE[-1]  # 32 pixels
OVERSAMPLE = 2  # profile sub-samples per pixel and axis
PSF_FWHM = np.array([1.6, 1.5, 1.4, 1.35, 1.3])  # arcsec, u g r i z
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # ~ 2.3548
PSF_SIGMA_PX = PSF_FWHM / FWHM_PER_SIGMA / PIXEL_SCALE  # pixels
DEPTH_5SIGMA = np.array([22.0, 22.2, 22.2, 21.3, 20.5])  # mag, point source, 5-sigma
PHOT_FLOOR = 0.02  # mag, calibration floor of the photometric error
POGSON = 2.5 / math.log(10.0)  # 1.0857 mag per unit relative flux error
# Sky sigma per pixel (nanomaggies): a 5-sigma point source at the depth, measured with a
# Gaussian PSF of effective area 4 pi sigma_psf^2, has SNR 5.
SKY_SIGMA_NMGY = (
    10.0 ** (-0.4 * (DEPTH_5SIGMA - ZERO_POINT_MAG))
    / 5.0
    / np.sqrt(4.0 * math.pi * PSF_SIGMA_PX**2)
)  # ~ u 0.052, g 0.047, r 0.050, i 0.118, z 0.255
RENDER_BLOCK_ROWS = 512  # galaxies rendered at once (bounds temporary memory)

log_module = logging.getLogger(__name__)


def _distance_tables() -> tuple[np.ndarray, np.ndarray]:
    """Redshift grid and comoving distance (Mpc) of flat LCDM on it."""
    z = np.linspace(0.0, DIST_GRID_Z_MAX, DIST_GRID_POINTS)
    inv_e = 1.0 / np.sqrt(OMEGA_M * (1.0 + z) ** 3 + (1.0 - OMEGA_M))
    steps = 0.5 * (inv_e[1:] + inv_e[:-1]) * np.diff(z)
    comoving = C_KM_S / H0 * np.concatenate([[0.0], np.cumsum(steps)])
    return z, comoving


_GRID_Z, _GRID_DC = _distance_tables()


def comoving_distance(z: np.ndarray) -> np.ndarray:
    """Line-of-sight comoving distance in Mpc (flat LCDM, interpolated)."""
    return np.interp(z, _GRID_Z, _GRID_DC)


def luminosity_distance(z: np.ndarray) -> np.ndarray:
    """Luminosity distance in Mpc."""
    return (1.0 + z) * comoving_distance(z)


def angular_diameter_distance(z: np.ndarray) -> np.ndarray:
    """Angular-diameter distance in Mpc."""
    return comoving_distance(z) / (1.0 + z)


def distance_modulus(z: np.ndarray) -> np.ndarray:
    """Distance modulus 5 log10(D_L / 10 pc) in mag."""
    return 5.0 * np.log10(luminosity_distance(z) * PC_PER_MPC / 10.0)


def _ndtr(x: np.ndarray) -> np.ndarray:
    return torch.special.ndtr(torch.from_numpy(np.asarray(x, np.float64))).numpy()


def _ndtri(p: np.ndarray) -> np.ndarray:
    return torch.special.ndtri(torch.from_numpy(np.asarray(p, np.float64))).numpy()


def truncated_normal(
    u: np.ndarray, mean: np.ndarray, sd: float, low: np.ndarray, high: np.ndarray
) -> np.ndarray:
    """Map uniforms ``u`` in [0, 1) to Normal(mean, sd) truncated to [low, high].

    Inverse-CDF draw, done in the lower tail (by symmetry) for accuracy far from the
    mean; needs no rejection loop.
    """
    a = (low - mean) / sd
    b = (high - mean) / sd
    flip = a > 0.0  # interval in the upper tail: draw -x from [-b, -a] instead
    lo = np.where(flip, -b, a)
    hi = np.where(flip, -a, b)
    p_lo, p_hi = _ndtr(lo), _ndtr(hi)
    x = np.clip(_ndtri(p_lo + u * (p_hi - p_lo)), lo, hi)
    return mean + sd * np.where(flip, -x, x)


def _draw_redshift(n: int, rng: np.random.Generator) -> np.ndarray:
    z = Z_C * rng.gamma(2.0, size=n) ** (1.0 / 1.5)
    for _ in range(Z_REDRAW_ROUNDS):
        bad = np.flatnonzero((z <= Z_MIN) | (z >= Z_MAX))
        if bad.size == 0:
            break
        z[bad] = Z_C * rng.gamma(2.0, size=bad.size) ** (1.0 / 1.5)
    return np.clip(z, Z_MIN, Z_MAX)


@dataclass
class Catalogue:
    """Per-galaxy quantities of the model (float64 unless stated).

    Attributes:
        redshift: true redshift.
        galaxy_type: t in [0, 1], 0 red/early, 1 blue/late.
        bulge_to_total: r-band bulge-to-total flux ratio B/T.
        abs_mag_r: absolute r magnitude.
        true_mags: [n, 5] noise-free apparent magnitudes u, g, r, i, z.
        mag_err: [n, 5] photometric 1-sigma errors, mag.
        magnitudes: [n, 5] float32 catalogue magnitudes (true + error draw).
        bulge_fraction: [n, 5] the bulge's share of the flux in each band.
        bulge_sersic_n: Sersic index of the bulge (the disc's is DISC_SERSIC).
        disc_re_kpc: physical half-light radius of the disc, kpc.
        bulge_re_px, disc_re_px: angular half-light radii, pixels (clipped).
        bulge_axis_ratio, disc_axis_ratio: minor/major axis ratios q.
        position_angle: radians, shared by bulge and disc.
        offset_px: [n, 2] sub-pixel centre offset (x, y), pixels.
    """

    redshift: np.ndarray
    galaxy_type: np.ndarray
    bulge_to_total: np.ndarray
    abs_mag_r: np.ndarray
    true_mags: np.ndarray
    mag_err: np.ndarray
    magnitudes: np.ndarray
    bulge_fraction: np.ndarray
    bulge_sersic_n: np.ndarray
    disc_re_kpc: np.ndarray
    bulge_re_px: np.ndarray
    disc_re_px: np.ndarray
    bulge_axis_ratio: np.ndarray
    disc_axis_ratio: np.ndarray
    position_angle: np.ndarray
    offset_px: np.ndarray

    def __len__(self) -> int:
        return len(self.redshift)

    def rows(self, start: int, stop: int) -> Catalogue:
        """Galaxies ``start:stop`` (views, not copies)."""
        return Catalogue(
            **{
                f.name: getattr(self, f.name)[start:stop]
                for f in dataclasses.fields(self)
            }
        )


def _colour_offsets(colours: np.ndarray) -> np.ndarray:
    """[n, 5] magnitudes relative to r from [n, 4] colours u-g, g-r, r-i, i-z."""
    ug, gr, ri, iz = colours.T
    return np.stack([gr + ug, gr, np.zeros_like(gr), -ri, -ri - iz], axis=1)


def draw_catalogue(n: int, rng: np.random.Generator) -> Catalogue:
    """Draw the catalogue quantities (no images) of ``n`` galaxies.

    Args:
        n: number of galaxies.
        rng: the generator; draws happen in a fixed order.

    Returns:
        The Catalogue.
    """
    z = _draw_redshift(n, rng)
    is_red = rng.random(n) < RED_FRACTION
    t = np.where(is_red, rng.beta(*RED_BETA, size=n), rng.beta(*BLUE_BETA, size=n))
    u_mag = rng.random(n)
    bt_noise = rng.standard_normal(n)
    bulge_colour_noise = rng.standard_normal((n, 4)) * COLOUR_SCATTER
    disc_colour_noise = rng.standard_normal((n, 4)) * COLOUR_SCATTER
    sersic_noise = rng.standard_normal(n)
    size_noise = rng.standard_normal(n)
    bulge_size_noise = rng.standard_normal(n)
    q_bulge_uniform = rng.random(n)
    q_disc_uniform = rng.random(n)
    position_angle = rng.random(n) * math.pi
    offset_px = rng.random((n, 2)) - 0.5
    phot_noise = rng.standard_normal((n, 5))

    bulge_to_total = np.clip((1.0 - t) ** BT_POWER + BT_SCATTER * bt_noise, 0.0, 1.0)

    # Luminosity: r-band flux limit imposed on M_r by a truncated-normal draw.
    k_r = (K_R_BLUE + K_R_RED_EXTRA * bulge_to_total) * z
    shift = distance_modulus(z) + k_r
    m_mean = M_R_MEAN_RED + (M_R_MEAN_BLUE - M_R_MEAN_RED) * t
    abs_mag_r = truncated_normal(
        u_mag, m_mean, M_R_SD, R_BRIGHT - shift, R_FAINT - shift
    )
    r = np.clip(abs_mag_r + shift, R_BRIGHT, R_FAINT)

    # Colours: each component on its track, the galaxy's from the summed fluxes
    # (relative to the total r flux).
    zz = z[:, None]
    bulge = _colour_offsets(RED_COLOUR_A + RED_COLOUR_B * zz + bulge_colour_noise)
    disc = _colour_offsets(BLUE_COLOUR_A + BLUE_COLOUR_B * zz + disc_colour_noise)
    bt = bulge_to_total[:, None]
    bulge_flux = bt * 10.0 ** (-0.4 * bulge)
    disc_flux = (1.0 - bt) * 10.0 ** (-0.4 * disc)
    total_flux = bulge_flux + disc_flux
    true_mags = r[:, None] - 2.5 * np.log10(total_flux)
    bulge_fraction = bulge_flux / total_flux

    # Structure.
    bulge_sersic_n = np.clip(
        BULGE_SERSIC * 10.0 ** (BULGE_SERSIC_SCATTER_DEX * sersic_noise),
        BULGE_SERSIC_MIN,
        BULGE_SERSIC_MAX,
    )
    disc_re_kpc = RE_KPC_DISC * 10.0 ** (
        RE_LUM_SLOPE * (abs_mag_r + 21.0) + RE_SCATTER_DEX * size_noise
    )
    bulge_re_kpc = (
        BULGE_RE_RATIO * disc_re_kpc * 10.0 ** (BULGE_RE_SCATTER_DEX * bulge_size_noise)
    )
    kpc_to_px = ARCSEC_PER_RAD / (angular_diameter_distance(z) * 1.0e3) / PIXEL_SCALE
    bulge_re_px = np.clip(bulge_re_kpc * kpc_to_px, RE_MIN_PX, RE_MAX_PX)
    disc_re_px = np.clip(disc_re_kpc * kpc_to_px, RE_MIN_PX, RE_MAX_PX)
    bulge_axis_ratio = Q_MIN_BULGE + (1.0 - Q_MIN_BULGE) * q_bulge_uniform
    disc_axis_ratio = Q_MIN_DISC + (1.0 - Q_MIN_DISC) * q_disc_uniform

    # Photometric errors: point-source SNR, reduced for extended sources (the
    # light-weighted half-light radius of the two components in each band).
    re_px = (
        bulge_fraction * bulge_re_px[:, None]
        + (1.0 - bulge_fraction) * disc_re_px[:, None]
    )
    extent = np.sqrt(1.0 + (re_px / PSF_SIGMA_PX) ** 2)
    snr = 5.0 * 10.0 ** (-0.4 * (true_mags - DEPTH_5SIGMA)) / extent
    mag_err = np.sqrt(PHOT_FLOOR**2 + (POGSON / snr) ** 2)
    magnitudes = (true_mags + mag_err * phot_noise).astype(np.float32)

    return Catalogue(
        redshift=z,
        galaxy_type=t,
        bulge_to_total=bulge_to_total,
        abs_mag_r=abs_mag_r,
        true_mags=true_mags,
        mag_err=mag_err,
        magnitudes=magnitudes,
        bulge_fraction=bulge_fraction,
        bulge_sersic_n=bulge_sersic_n,
        disc_re_kpc=disc_re_kpc,
        bulge_re_px=bulge_re_px,
        disc_re_px=disc_re_px,
        bulge_axis_ratio=bulge_axis_ratio,
        disc_axis_ratio=disc_axis_ratio,
        position_angle=position_angle,
        offset_px=offset_px,
    )


def _psf_kernels() -> np.ndarray:
    """[5, 32, 32] Toeplitz Gaussian kernels K, so that K @ img @ K.T blurs img."""
    d = np.arange(STAMP)[:, None] - np.arange(STAMP)[None, :]
    sigma = PSF_SIGMA_PX[:, None, None]
    kernels = np.exp(-0.5 * (d / sigma) ** 2) / (math.sqrt(2.0 * math.pi) * sigma)
    return kernels.astype(np.float32)


_PSF_KERNELS = _psf_kernels()
# Sub-pixel sample positions along one axis, in pixels (pixel centres at 0 .. 31).
_SUB = ((np.arange(STAMP * OVERSAMPLE) + 0.5) / OVERSAMPLE - 0.5).astype(np.float32)
_STAMP_CENTRE = (STAMP - 1) / 2.0  # 15.5 px


def _sersic_profiles(
    cat: Catalogue, re_px: np.ndarray, axis_ratio: np.ndarray, sersic_n: np.ndarray
) -> np.ndarray:
    """[n, 32, 32] float32 PSF-free Sersic profiles (arbitrary normalisation) at the
    catalogue's centres and position angles, with the given radii, axis ratios and
    indices."""
    n = len(cat)
    f32 = np.float32
    cx = (_STAMP_CENTRE + cat.offset_px[:, 0]).astype(f32)[:, None, None]
    cy = (_STAMP_CENTRE + cat.offset_px[:, 1]).astype(f32)[:, None, None]
    cos = np.cos(cat.position_angle).astype(f32)[:, None, None]
    sin = np.sin(cat.position_angle).astype(f32)[:, None, None]
    q = axis_ratio.astype(f32)[:, None, None]
    dx = _SUB[None, None, :] - cx  # [n, 1, S]
    dy = _SUB[None, :, None] - cy  # [n, S, 1]
    major = dx * cos + dy * sin
    minor = dy * cos - dx * sin
    # Circularised radius over R_e, squared: (q x'^2 + y'^2 / q) / R_e^2.
    inv_re2 = (1.0 / re_px**2).astype(f32)[:, None, None]
    rho2 = (major * major * q + minor * minor / q) * inv_re2
    sn = np.broadcast_to(sersic_n, (n,))
    b_n = (2.0 * sn - 1.0 / 3.0 + 4.0 / (405.0 * sn)).astype(f32)[:, None, None]
    half_inv_n = (0.5 / sn).astype(f32)[:, None, None]
    # exp(-b_n (rho^(1/n) - 1)) without the constant exp(b_n); rho^(1/n) via logs.
    np.maximum(rho2, f32(1e-12), out=rho2)
    np.log(rho2, out=rho2)
    rho2 *= half_inv_n
    np.exp(rho2, out=rho2)
    rho2 *= -b_n
    np.exp(rho2, out=rho2)
    s = OVERSAMPLE
    return rho2.reshape(n, STAMP, s, STAMP, s).sum(axis=(2, 4))


def _blurred_unit(profile: np.ndarray) -> np.ndarray:
    """[n, 5, 32, 32] PSF-convolved copies of [n, 32, 32] profiles, each band
    normalised to a sum of 1 over the stamp."""
    blurred = np.matmul(
        np.matmul(_PSF_KERNELS, profile[:, None]), _PSF_KERNELS.transpose(0, 2, 1)
    )
    blurred /= blurred.sum(axis=(2, 3), keepdims=True)
    return blurred


def render_images(cat: Catalogue, rng: np.random.Generator | None) -> np.ndarray:
    """Render the [n, 5, 32, 32] float32 images of a catalogue, in nanomaggies.

    Each band is the bulge and the disc, each PSF-convolved and normalised, mixed
    by the band's bulge fraction; each noise-free band sums to 10**(-0.4 (m - 22.5))
    for the catalogue magnitude m.

    Args:
        cat: the galaxies.
        rng: draws the sky noise (one standard normal per pixel, after everything
            else); None renders noise-free images.

    Returns:
        The images, band order u, g, r, i, z.
    """
    n = len(cat)
    images = np.empty((n, *IMAGE_SHAPE), np.float32)
    flux = 10.0 ** (-0.4 * (cat.magnitudes.astype(np.float64) - ZERO_POINT_MAG))
    for start in range(0, n, RENDER_BLOCK_ROWS):
        stop = min(n, start + RENDER_BLOCK_ROWS)
        rows = cat.rows(start, stop)
        bulge = _blurred_unit(
            _sersic_profiles(
                rows, rows.bulge_re_px, rows.bulge_axis_ratio, rows.bulge_sersic_n
            )
        )
        disc = _blurred_unit(
            _sersic_profiles(
                rows, rows.disc_re_px, rows.disc_axis_ratio, np.float64(DISC_SERSIC)
            )
        )
        fraction = rows.bulge_fraction.astype(np.float32)[:, :, None, None]
        mixed = disc + fraction * (bulge - disc)  # [b, 5, 32, 32], each band sums to 1
        scale = flux[start:stop].astype(np.float32)[:, :, None, None]
        np.multiply(mixed, scale, out=images[start:stop])
    if rng is not None:
        noise = rng.standard_normal(images.shape, dtype=np.float32)
        noise *= SKY_SIGMA_NMGY.astype(np.float32)[None, :, None, None]
        images += noise
    return images


def simulate_chunk(
    n: int, seed: int, chunk_index: int, first_object_id: int, *, sky_noise: bool = True
) -> GalaxyBatch:
    """Generate rows ``chunk_index * SIM_CHUNK_ROWS`` onwards of a data set.

    The catalogue is always drawn for SIM_CHUNK_ROWS galaxies and cut to ``n``, so
    the result does not depend on ``n`` beyond its length.

    Args:
        n: galaxies to return, 0 <= n <= SIM_CHUNK_ROWS.
        seed: the data set's seed.
        chunk_index: which chunk of SIM_CHUNK_ROWS rows.
        first_object_id: object_id of row 0 of the data set (not of the chunk).
        sky_noise: add the per-pixel sky noise (False gives noise-free images with
            otherwise identical arrays).

    Returns:
        A GalaxyBatch of ``n`` galaxies.
    """
    if not 0 <= n <= SIM_CHUNK_ROWS:
        raise ValueError(f"n must be in [0, {SIM_CHUNK_ROWS}], got {n}")
    if chunk_index < 0:
        raise ValueError(f"chunk_index must be >= 0, got {chunk_index}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, chunk_index]))
    cat = draw_catalogue(SIM_CHUNK_ROWS, rng).rows(0, n)
    images = render_images(cat, rng if sky_noise else None)
    first_row = chunk_index * SIM_CHUNK_ROWS
    return GalaxyBatch(
        object_id=np.arange(n, dtype=np.int64) + (first_object_id + first_row),
        image=images,
        magnitudes=cat.magnitudes,
        redshift=cat.redshift.astype(np.float32),
    )


def simulate(
    path: str | os.PathLike,
    n_galaxies: int,
    seed: int,
    first_object_id: int = 1,
    log: logging.Logger | None = None,
) -> dict[str, Any]:
    """Write a synthetic data set of ``n_galaxies`` to the galaxy file ``path``.

    Args:
        path: the HDF5 file to write (atomically).
        n_galaxies: rows to write.
        seed: the random seed; same arguments give identical arrays.
        first_object_id: object_id of the first row; row i gets this + i.
        log: logger for progress; defaults to this module's.

    Returns:
        ``{"rows", "seconds", "galaxies_per_s", "bytes", "path"}``.
    """
    log = log or log_module
    if n_galaxies < 0:
        raise ValueError(f"n_galaxies must be >= 0, got {n_galaxies}")
    provenance = {
        "generator": "cai.sky.simulate",
        "model_version": MODEL_VERSION,
        "n_galaxies": n_galaxies,
        "seed": seed,
        "first_object_id": first_object_id,
        "sim_chunk_rows": SIM_CHUNK_ROWS,
        "zero_point_mag": ZERO_POINT_MAG,
        "bands": "".join(BANDS),
    }
    start = time.perf_counter()
    with GalaxyWriter(path, n_galaxies, provenance) as writer:
        for chunk_index, first in enumerate(range(0, n_galaxies, SIM_CHUNK_ROWS)):
            t0 = time.perf_counter()
            rows = min(SIM_CHUNK_ROWS, n_galaxies - first)
            writer.append(simulate_chunk(rows, seed, chunk_index, first_object_id))
            log.debug(
                "simulate: chunk %d, rows %d-%d, %.2f s",
                chunk_index,
                first,
                first + rows,
                time.perf_counter() - t0,
            )
    seconds = time.perf_counter() - start
    size = Path(path).stat().st_size
    rate = n_galaxies / seconds if seconds > 0 else float("inf")
    log.info(
        "simulate: %d galaxies, %.1f MB, %.1f s (%.0f galaxies/s) -> %s",
        n_galaxies,
        size / 1e6,
        seconds,
        rate,
        path,
    )
    return {
        "rows": n_galaxies,
        "seconds": seconds,
        "galaxies_per_s": rate,
        "bytes": size,
        "path": str(path),
    }


def magnitudes_from_image(image: np.ndarray) -> np.ndarray:
    """Magnitudes from summed pixel fluxes, the inverse of the rendering.

    Args:
        image: [..., 5, H, W] images in nanomaggies.

    Returns:
        [..., 5] float64 magnitudes, 22.5 - 2.5 log10(sum); NaN where the sum is not
        positive (faint galaxies in noisy bands).
    """
    flux = np.asarray(image).sum(axis=(-2, -1), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mags = ZERO_POINT_MAG - 2.5 * np.log10(flux)
    return np.where(flux > 0.0, mags, np.nan)
