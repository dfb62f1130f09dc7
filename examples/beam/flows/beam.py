"""A small but real beam-physics flow: sample a correlated particle beam, measure it, save it.

It computes the RMS emittance and Twiss parameters of a 2-D phase space (x, px) with numpy,
writes the particles and statistics to an HDF5 file and a human-readable report to a text file,
and returns their File descriptions, which lume-operator records as result locations.
"""

from __future__ import annotations

import numpy as np
from prefect import flow, get_run_logger, task

from lume_operator.results import HDF5File, TextFile, result_path


@task
def sample_beam(
    n_particles: int, sigma_x: float, sigma_px: float, correlation: float, seed: int
) -> dict[str, np.ndarray]:
    """Particles of a Gaussian beam with the given x-px correlation."""
    rng = np.random.default_rng(seed)
    cov = np.array(
        [
            [sigma_x**2, correlation * sigma_x * sigma_px],
            [correlation * sigma_x * sigma_px, sigma_px**2],
        ]
    )
    x, px = rng.multivariate_normal([0.0, 0.0], cov, size=n_particles).T
    return {"x": x, "px": px}


@task
def measure(beam: dict[str, np.ndarray]) -> dict[str, float]:
    """RMS emittance and Twiss parameters of the beam."""
    x = beam["x"] - beam["x"].mean()
    px = beam["px"] - beam["px"].mean()
    xx, pp, xp = float(np.mean(x * x)), float(np.mean(px * px)), float(np.mean(x * px))
    emittance = float(np.sqrt(xx * pp - xp**2))
    return {
        "emittance": emittance,
        "beta": xx / emittance,
        "alpha": -xp / emittance,
        "gamma": pp / emittance,
        "sigma_x": float(np.sqrt(xx)),
        "sigma_px": float(np.sqrt(pp)),
    }


@task
def save_beam(beam: dict[str, np.ndarray], stats: dict[str, float]) -> dict[str, str]:
    file = HDF5File(filename=result_path("beam.h5"))
    file.write({"particles": beam, "stats": stats})
    return file.description()


@task
def save_report(stats: dict[str, float], n_particles: int) -> dict[str, str]:
    lines = [f"particles: {n_particles}"] + [
        f"{name}: {value:.6e}" for name, value in stats.items()
    ]
    file = TextFile(filename=result_path("report.txt"))
    file.write("\n".join(lines) + "\n")
    return file.description()


@flow(name="beam-stats")
def beam_stats(
    n_particles: int = 100_000,
    sigma_x: float = 1e-3,
    sigma_px: float = 1e-4,
    correlation: float = 0.3,
    seed: int = 42,
) -> dict:
    """Sample a beam and record its emittance.

    Args:
        n_particles: Number of macro-particles.
        sigma_x: RMS beam size in m.
        sigma_px: RMS divergence in rad.
        correlation: x-px correlation coefficient, in [-1, 1].
        seed: Random seed, for reproducible runs.
    """
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must be in [-1, 1], got {correlation}")
    logger = get_run_logger()
    beam = sample_beam(n_particles, sigma_x, sigma_px, correlation, seed)
    stats = measure(beam)
    logger.info(
        "emittance %.4e m rad, beta %.4f m, alpha %.4f",
        stats["emittance"],
        stats["beta"],
        stats["alpha"],
    )
    return {
        "beam": save_beam(beam, stats),
        "report": save_report(stats, n_particles),
        "emittance": stats["emittance"],
    }
