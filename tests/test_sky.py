"""Tests of the synthetic sky: determinism, physics sanity and the file it writes."""

from __future__ import annotations

import numpy as np
import pytest

from cai import sky
from cai.formats import IMAGE_SHAPE, GalaxyFile

SEED = 1234
N_SMALL = 300  # galaxies per rendered test chunk
N_CATALOGUE = 20_000  # galaxies in catalogue-only statistics


@pytest.fixture(scope="module")
def catalogue() -> sky.Catalogue:
    return sky.draw_catalogue(N_CATALOGUE, np.random.default_rng(SEED))


@pytest.fixture(scope="module")
def chunk():
    return sky.simulate_chunk(N_SMALL, SEED, 0, 1)


def test_same_seed_same_arrays_other_seed_differs(chunk) -> None:
    again = sky.simulate_chunk(N_SMALL, SEED, 0, 1)
    other = sky.simulate_chunk(N_SMALL, SEED + 1, 0, 1)
    for name in ("object_id", "image", "magnitudes", "redshift"):
        np.testing.assert_array_equal(getattr(chunk, name), getattr(again, name))
    assert not np.array_equal(chunk.redshift, other.redshift)
    assert not np.array_equal(chunk.image, other.image)


def test_shorter_chunk_is_a_prefix(chunk) -> None:
    short = sky.simulate_chunk(50, SEED, 0, 1)
    np.testing.assert_array_equal(short.image, chunk.image[:50])
    np.testing.assert_array_equal(short.magnitudes, chunk.magnitudes[:50])


def test_shapes_dtypes_finite(chunk) -> None:
    chunk.check("test")
    assert chunk.image.shape == (N_SMALL, *IMAGE_SHAPE)
    assert chunk.image.dtype == np.float32
    assert np.isfinite(chunk.image).all()
    assert np.isfinite(chunk.magnitudes).all()
    np.testing.assert_array_equal(chunk.object_id, np.arange(1, N_SMALL + 1))
    later = sky.simulate_chunk(3, SEED, 2, 100)
    first = 100 + 2 * sky.SIM_CHUNK_ROWS
    np.testing.assert_array_equal(later.object_id, [first, first + 1, first + 2])


def test_redshift_range_and_mode(catalogue) -> None:
    z = catalogue.redshift
    assert z.min() > 0.005 and z.max() < 0.4
    counts, edges = np.histogram(z, bins=40, range=(0.0, 0.4))
    peak = 0.5 * (edges[counts.argmax()] + edges[counts.argmax() + 1])
    assert 0.05 < peak < 0.15


def test_r_within_flux_limits_before_noise(catalogue) -> None:
    r = catalogue.true_mags[:, 2]
    assert r.min() >= sky.R_BRIGHT - 1e-9
    assert r.max() <= sky.R_FAINT + 1e-9


def test_colours_redden_with_redshift(catalogue) -> None:
    g_r = catalogue.magnitudes[:, 1] - catalogue.magnitudes[:, 2]
    assert np.corrcoef(g_r, catalogue.redshift)[0, 1] > 0.3


def test_photometric_error_in_r_near_two_hundredths(catalogue) -> None:
    median_err = np.median(catalogue.mag_err[:, 2])
    assert 0.018 < median_err < 0.03
    scatter = np.std(catalogue.magnitudes[:, 2] - catalogue.true_mags[:, 2])
    assert 0.015 < scatter < 0.035


def test_noise_free_image_sums_to_magnitudes(chunk) -> None:
    clean = sky.simulate_chunk(N_SMALL, SEED, 0, 1, sky_noise=False)
    np.testing.assert_array_equal(clean.magnitudes, chunk.magnitudes)
    mags = sky.magnitudes_from_image(clean.image)
    np.testing.assert_allclose(mags, clean.magnitudes, atol=1e-4, rtol=0)


def test_noisy_image_agrees_within_pixel_noise(chunk) -> None:
    dm = sky.magnitudes_from_image(chunk.image)[:, 2] - chunk.magnitudes[:, 2]
    flux = 10.0 ** (-0.4 * (chunk.magnitudes[:, 2] - sky.ZERO_POINT_MAG))
    sigma_dm = sky.POGSON * sky.SKY_SIGMA_NMGY[2] * np.sqrt(32 * 32) / flux
    assert np.all(np.abs(dm) < 5.0 * sigma_dm)
    assert np.median(np.abs(dm)) < 0.05


def test_magnitudes_from_image_nan_for_non_positive_flux() -> None:
    image = np.zeros((2, *IMAGE_SHAPE), np.float32)
    image[0] = 1.0 / (32 * 32)  # 1 nanomaggy per band
    mags = sky.magnitudes_from_image(image)
    np.testing.assert_allclose(mags[0], sky.ZERO_POINT_MAG, atol=1e-6)
    assert np.isnan(mags[1]).all()


def test_truncated_normal_stays_in_far_tails() -> None:
    u = np.linspace(0.0, 0.999, 7)
    x = sky.truncated_normal(u, np.zeros(7), 1.0, np.full(7, 9.0), np.full(7, 9.5))
    assert np.isfinite(x).all() and (x >= 9.0).all() and (x <= 9.5).all()


def test_simulate_writes_readable_file(tmp_path) -> None:
    path = tmp_path / "sky.h5"
    summary = sky.simulate(path, 120, SEED, first_object_id=7)
    assert summary["rows"] == 120 and summary["bytes"] == path.stat().st_size
    with GalaxyFile(path) as f:
        assert len(f) == 120
        batch = f.read(0, 120)
        assert f.provenance["seed"] == SEED
    np.testing.assert_array_equal(batch.object_id, np.arange(7, 127))
    expected = sky.simulate_chunk(120, SEED, 0, 7)
    np.testing.assert_array_equal(batch.image, expected.image)
    np.testing.assert_array_equal(batch.redshift, expected.redshift)


def test_simulate_rejects_negative_rows(tmp_path) -> None:
    with pytest.raises(ValueError, match="n_galaxies"):
        sky.simulate(tmp_path / "x.h5", -1, SEED)
