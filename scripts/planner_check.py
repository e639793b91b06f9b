"""Snakemake script of rule `planner_check`: the planner calibrated on some data sizes
of the experiment, checked against the runs at the others."""

from cai.cost import Prices
from cai.errors import ConfigError
from cai.experiment import read_runs
from cai.planner import Assumptions, validate, write_table
from cai.workflow import run_step


def check():
    sizes = snakemake.params.check
    if not sizes or not sizes["calibrate_on"] or not sizes["hold_out"]:
        raise ConfigError(
            "experiment.planner_check: give calibrate_on and hold_out, the data sizes "
            "(GiB) to calibrate the planner on and to predict"
        )
    table = validate(
        read_runs(snakemake.input[0]),
        sizes["calibrate_on"],
        sizes["hold_out"],
        Assumptions.from_config(snakemake.params.planner),
        Prices.from_config(snakemake.params.prices),
    )
    write_table(table, snakemake.output[0])
    return table


run_step(snakemake, check)
