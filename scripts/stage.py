"""Snakemake script of rule `stage`: partitions, manifest and model to S3."""

from cai.lambda_run import stage_run
from cai.workflow import run_step

run_step(
    snakemake,
    lambda: stage_run(
        snakemake.input[0],
        snakemake.params.aws,
        snakemake.params.model,
        snakemake.output[0],
    ),
)
