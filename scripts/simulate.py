"""Snakemake script of rule `simulate`: a synthetic SDSS-like galaxy file."""

from cai.sky import simulate
from cai.workflow import run_step

run_step(
    snakemake,
    lambda: simulate(
        snakemake.output[0],
        snakemake.params.n_galaxies,
        snakemake.params.seed,
        snakemake.params.first_object_id,
    ),
)
