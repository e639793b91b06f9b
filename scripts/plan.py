"""Snakemake script of rule `plan`: predicted time and cost of the planner's data sizes
on every measured backend, partition size and Lambda memory size."""

from cai.cost import Prices
from cai.experiment import read_runs
from cai.planner import Assumptions, calibrate, plan_table, write_table
from cai.workflow import run_step


def plan():
    assumptions = Assumptions.from_config(snakemake.params.planner)
    calibration = calibrate(read_runs(snakemake.input[0]), assumptions)
    table = plan_table(
        calibration,
        assumptions,
        Prices.from_config(snakemake.params.prices),
        snakemake.params.planner["data_gb"],
    )
    write_table(table, snakemake.output[0])
    return table


run_step(snakemake, plan)
