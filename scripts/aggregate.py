"""Snakemake script of rule `aggregate`: catalogue, partition table, run summary."""

from cai.aggregate import aggregate
from cai.workflow import run_step

run_step(
    snakemake,
    lambda: aggregate(
        snakemake.input.predictions,
        snakemake.input.metrics,
        snakemake.input.partitions,
        snakemake.output.catalogue,
        snakemake.output.partition_metrics,
        snakemake.output.summary,
        snakemake.params.logical,
    ),
)
