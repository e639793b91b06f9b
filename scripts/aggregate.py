"""Snakemake script of rule `aggregate`: catalogue, partition table, run summary."""

from cai.aggregate import aggregate
from cai.workflow import job_output_files, run_step

run_step(
    snakemake,
    lambda: aggregate(
        job_output_files(snakemake.input.predictions, ".parquet"),
        job_output_files(snakemake.input.metrics, ".json"),
        snakemake.input.partitions,
        snakemake.output.catalogue,
        snakemake.output.partition_metrics,
        snakemake.output.summary,
        snakemake.params.logical,
    ),
)
