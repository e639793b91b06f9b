"""Snakemake script of rule `experiment_table`: one row per run of the experiment."""

from cai.experiment import runs_table
from cai.workflow import run_step

params = snakemake.params
run_step(
    snakemake,
    lambda: runs_table(
        params.runs,
        snakemake.input.summaries,
        params.dispatches,
        params.backends,
        params.prices,
        experiment=params.name,
        lambda_memory_mb=params.memory_mb,
        csv_out=snakemake.output.csv,
        parquet_out=snakemake.output.parquet,
    ),
)
