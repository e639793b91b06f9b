"""Snakemake script of rule `partition`: partition files and their manifest."""

from cai.partition import partition_dataset
from cai.workflow import run_step

run_step(
    snakemake,
    lambda: partition_dataset(
        snakemake.input[0], snakemake.output[0], float(snakemake.wildcards.size)
    ),
)
