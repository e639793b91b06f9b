"""Snakemake script of rule `split`: the labelled galaxies into train, validation and
test."""

from cai.split import write_split
from cai.workflow import run_step

params = snakemake.params
run_step(
    snakemake,
    lambda: write_split(
        list(snakemake.input),
        snakemake.output[0],
        params.seed,
        params.fractions,
        params.min_validation,
    ),
)
