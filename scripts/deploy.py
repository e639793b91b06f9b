"""Snakemake script of rule `deploy`: create or update the Lambda function."""

from cai.lambda_run import deploy_from_config
from cai.workflow import run_step

run_step(
    snakemake,
    lambda: deploy_from_config(snakemake.params.aws, snakemake.output[0]),
)
