"""Four flows of a beam study, chained by `pipeline.yaml` into a FlowOfFlows.

make-beam samples a beam and saves it. Two independent steps read that file: beam-envelope
follows the beam size along a drift to find the waist, and emittance-bootstrap estimates the
emittance with its statistical error. beam-report joins both into a text report.
"""

from __future__ import annotations

import numpy as np
from prefect import flow, get_run_logger, task

from lume_operator.results import HDF5File, TextFile, load_file, result_path


@task(persist_result=False)  # arrays stay in memory; only the saved file's description persists
def sample(
    n_particles: int, sigma_x: float, sigma_px: float, correlation: float, seed: int
) -> dict[str, np.ndarray]:
    """Particles of a Gaussian beam; a negative x-px correlation converges to a waist."""
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
def save_particles(beam: dict[str, np.ndarray]) -> dict[str, str]:
    """The particles as an HDF5 file; its description is what later steps receive."""
    return HDF5File(filename=result_path("particles.h5")).write(beam).description()


@flow(name="make-beam")
def make_beam(
    n_particles: int = 200_000,
    sigma_x: float = 1e-3,
    sigma_px: float = 1e-4,
    correlation: float = -0.6,
    seed: int = 7,
) -> dict:
    """Sample a beam and save its particles.

    Args:
        n_particles: Number of macro-particles.
        sigma_x: RMS beam size in m.
        sigma_px: RMS divergence in rad.
        correlation: x-px correlation coefficient, in [-1, 1].
        seed: Random seed.
    """
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must be in [-1, 1], got {correlation}")
    particles = save_particles(sample(n_particles, sigma_x, sigma_px, correlation, seed))
    return {"particles": particles, "n_particles": n_particles}


@flow(name="beam-envelope")
def beam_envelope(particles: dict, length: float = 20.0, n_points: int = 1000) -> dict:
    """The RMS beam size along a drift, and where the waist is.

    Args:
        particles: File description of the particles (x, px).
        length: Drift length in m.
        n_points: Positions along the drift at which the beam size is computed.
    """
    beam = load_file(particles).read()
    x, px = beam["x"], beam["px"]
    s = np.linspace(0.0, length, n_points)
    sigma = np.array([np.std(x + position * px) for position in s])
    waist = int(np.argmin(sigma))
    envelope = HDF5File(filename=result_path("envelope.h5")).write({"s": s, "sigma_x": sigma})
    get_run_logger().info("waist at s = %.3f m, sigma_x = %.3e m", s[waist], sigma[waist])
    return {
        "envelope": envelope.description(),
        "waist_position": float(s[waist]),
        "waist_size": float(sigma[waist]),
    }


def _emittance(x: np.ndarray, px: np.ndarray) -> float:
    x, px = x - x.mean(), px - px.mean()
    return float(np.sqrt(np.mean(x * x) * np.mean(px * px) - np.mean(x * px) ** 2))


@flow(name="emittance-bootstrap")
def emittance_bootstrap(particles: dict, n_resamples: int = 150, seed: int = 0) -> dict:
    """The RMS emittance, and its statistical error from bootstrap resampling.

    Args:
        particles: File description of the particles (x, px).
        n_resamples: Bootstrap resamples.
        seed: Random seed of the resampling.
    """
    beam = load_file(particles).read()
    x, px = beam["x"], beam["px"]
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_resamples):
        pick = rng.integers(0, len(x), len(x))
        samples.append(_emittance(x[pick], px[pick]))
    return {"emittance": _emittance(x, px), "emittance_error": float(np.std(samples))}


@flow(name="beam-report")
def beam_report(envelope: dict, emittance: float, emittance_error: float) -> dict:
    """A text report joining the envelope and the emittance.

    Args:
        envelope: File description of the envelope (s, sigma_x).
        emittance: RMS emittance in m rad.
        emittance_error: Its statistical error.
    """
    data = load_file(envelope).read()
    waist = int(np.argmin(data["sigma_x"]))
    lines = [
        f"emittance: {emittance:.6e} +- {emittance_error:.1e} m rad",
        f"waist: s = {data['s'][waist]:.3f} m, sigma_x = {data['sigma_x'][waist]:.6e} m",
        f"beta at waist: {data['sigma_x'][waist] ** 2 / emittance:.6f} m",
    ]
    report = TextFile(filename=result_path("report.txt")).write("\n".join(lines) + "\n")
    return {
        "report": report.description(),
        "beta_at_waist": data["sigma_x"][waist] ** 2 / emittance,
    }
