"""Snakemake script of rule `dispatch`: the plan's jobs as Lambda invocations.

The `aws` and `prices` sections are read from the config here, not given as rule
params: a changed price or concurrency must not make Snakemake redo a finished run
(whose invocations would then all be skipped as done, and its times lost).
"""

from pathlib import Path

from cai.lambda_run import dispatch_run
from cai.workflow import run_step

wildcards = snakemake.wildcards
run_step(
    snakemake,
    lambda: dispatch_run(
        snakemake.input.receipt,
        snakemake.params.jobs,
        snakemake.params.logical,
        snakemake.config["aws"],
        snakemake.params.model,
        int(wildcards.batch),
        wildcards.backend,
        snakemake.config["prices"],
        snakemake.output.results,
        snakemake.output.records,
        snakemake.output.summary,
        snakemake.params.failed_records,
        Path(snakemake.scriptdir).parent / "lambda/statemachine.asl.json",
        snakemake.params.precision,
        f"{wildcards.data}/{wildcards.size}MB-b{wildcards.batch}/r{wildcards.repeat}",
    ),
)
