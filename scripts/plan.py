"""Snakemake script of rule `plan`: predicted time and cost of the planner's data sizes
on every measured backend, partition size and Lambda memory size, and the option
recommended for each within the configured budget."""

import logging

from cai.atomic import atomic_path
from cai.cost import Prices
from cai.experiment import read_runs
from cai.planner import (
    BUDGET_KEYS,
    Assumptions,
    calibrate,
    describe_recommendation,
    plan_table,
    recommendations,
    write_table,
)
from cai.workflow import run_step


def plan():
    planner = dict(snakemake.params.planner)
    budgets = {key: planner.pop(key) for key in BUDGET_KEYS}
    assumptions = Assumptions.from_config(planner)
    table = plan_table(
        calibrate(read_runs(snakemake.input[0]), assumptions),
        assumptions,
        Prices.from_config(snakemake.params.prices),
        planner["data_gb"],
    )
    best = recommendations(table, planner["data_gb"], **budgets)
    for _, row in best.iterrows():
        logging.getLogger("cai.planner").info(
            "recommended: %s", describe_recommendation(row)
        )
    write_table(table, snakemake.output.table)
    with atomic_path(snakemake.output.recommended) as tmp:
        best.to_csv(tmp, sep="\t", index=False)


run_step(snakemake, plan)
