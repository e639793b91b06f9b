"""Snakemake script of rule `dispatch`: the plan's jobs as Lambda invocations."""

from cai.lambda_run import dispatch_run
from cai.workflow import run_step

run_step(
    snakemake,
    lambda: dispatch_run(
        snakemake.input.receipt,
        snakemake.params.jobs,
        snakemake.params.logical,
        snakemake.params.aws,
        snakemake.params.model,
        int(snakemake.wildcards.batch),
        snakemake.wildcards.backend,
        snakemake.params.prices,
        snakemake.output.results,
        snakemake.output.records,
        snakemake.output.summary,
        snakemake.params.failed_records,
        snakemake.params.definition,
        snakemake.params.precision,
        int(snakemake.wildcards.repeat),
    ),
)
