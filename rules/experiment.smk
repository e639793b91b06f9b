# The scaling experiment (config `experiment`): every run of its sweeps, then one table
# of all runs, the comparison figures, the planner's predictions and its check against
# held-out runs. `snakemake experiment` builds it all; a run's folder builds one run.

EXPERIMENT = "results/experiments/" + config["experiment"]["name"]
EXPERIMENT_LOGS = "results/logs/experiments/" + config["experiment"]["name"]
FIGURES = [
    "time_vs_data_size",
    "throughput_vs_batch_size",
    "lambda_time_vs_data_size",
    "throughput_vs_data_size",
    "invocations_vs_data_size",
    "cost_vs_data_size",
    "extension",
]


localrules:
    experiment,
    experiment_table,
    experiment_figures,
    plan,
    planner_check,


def experiment_dispatches():
    """Lambda runs of the experiment and their dispatch summaries."""
    return {
        key: key.path() + "/lambda/dispatch.json"
        for key in experiment_keys()
        if settings_of(key.backend)["kind"] == "lambda"
    }


rule experiment:
    input:
        EXPERIMENT + "/runs.csv",
        expand(
            EXPERIMENT + "/figures/{figure}.{ext}", figure=FIGURES, ext=["png", "pdf"]
        ),
        EXPERIMENT + "/plan.tsv",
        # The planner's check needs the data sizes to hold out (experiment.planner_check).
        [EXPERIMENT + "/planner_check.tsv"]
        * bool(config["experiment"].get("planner_check")),


rule experiment_table:
    input:
        summaries=[key.path() + "/summary.json" for key in experiment_keys()],
        dispatches=list(experiment_dispatches().values()),
    output:
        csv=report(
            EXPERIMENT + "/runs.csv",
            caption="captions/runs.rst",
            category="Experiment",
        ),
        parquet=EXPERIMENT + "/runs.parquet",
    log:
        EXPERIMENT_LOGS + "/experiment_table.log",
    params:
        runs=experiment_keys(),
        dispatches=experiment_dispatches(),
        backends={name: settings_of(name) for name in config["backends"]},
        prices=config["prices"],
        name=config["experiment"]["name"],
        memory_mb=config["aws"]["memory_mb"],
    script:
        "../scripts/experiment_table.py"


rule experiment_figures:
    input:
        EXPERIMENT + "/runs.parquet",
    output:
        **{
            f"{figure}_{ext}": (
                report(
                    f"{EXPERIMENT}/figures/{figure}.{ext}",
                    caption=f"captions/{figure}.rst",
                    category="Experiment",
                    subcategory="Figures",
                )
                if ext == "png"
                else f"{EXPERIMENT}/figures/{figure}.{ext}"
            )
            for figure in FIGURES
            for ext in ("png", "pdf")
        },
        index=EXPERIMENT + "/figures/figures.json",
    log:
        EXPERIMENT_LOGS + "/experiment_figures.log",
    script:
        "../scripts/experiment_figures.py"


rule plan:
    input:
        EXPERIMENT + "/runs.parquet",
    output:
        table=report(
            EXPERIMENT + "/plan.tsv",
            caption="captions/plan.rst",
            category="Experiment",
        ),
        recommended=report(
            EXPERIMENT + "/plan_recommended.tsv",
            caption="captions/plan_recommended.rst",
            category="Experiment",
        ),
    log:
        EXPERIMENT_LOGS + "/plan.log",
    params:
        planner=config["planner"],
        prices=config["prices"],
    script:
        "../scripts/plan.py"


rule planner_check:
    input:
        EXPERIMENT + "/runs.parquet",
    output:
        report(
            EXPERIMENT + "/planner_check.tsv",
            caption="captions/planner_check.rst",
            category="Experiment",
        ),
    log:
        EXPERIMENT_LOGS + "/planner_check.log",
    params:
        check=config["experiment"].get("planner_check"),
        planner=config["planner"],
        prices=config["prices"],
    script:
        "../scripts/planner_check.py"
