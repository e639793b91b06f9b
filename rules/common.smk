# Shared names, the plan and input functions. The plan (partitions and inference jobs)
# is computed from the config before anything runs, so --dry-run shows every job.
#
# A run is one inference pass: a backend (an entry of config `backends`), a data size
# ("dataset": the stored data once, or "<x>GB"), a partition size, a batch size and a
# repeat. The default target builds the run the config describes; the experiment
# (rules/experiment.smk) builds many.

import functools

from cai.experiment import RunKey, experiment_runs, parse_data_label
from cai.workflow import backend_settings, check_finetune_plan, run_plan

DATASET = {
    "synthetic": "results/data/synthetic.h5",
    "pt": "results/data/imported.h5",
}[config["data"]["source"]]
PARTITIONS = "results/partitions/{size}MB"
RUN = "results/{backend}/{data}/{size}MB-b{batch}/r{repeat}"
LOGS = "results/logs/{backend}/{data}/{size}MB-b{batch}/r{repeat}"
FINETUNE = "results/finetune"
FINETUNED = FINETUNE + "/astromae-finetuned.safetensors"


wildcard_constraints:
    size=r"\d+(\.\d+)?",
    batch=r"\d+",
    job=r"\d{5}",
    backend=r"[a-z0-9][a-z0-9-]*",
    data=r"dataset|\d+(\.\d+)?GB",
    repeat=r"\d+",


localrules:
    all,
    accuracy,
    plot_redshift,
    plot_partitions,
    infer_local,


def finetuning():
    """Whether the DAG fine-tunes AstroMAE before predicting (finetune.train; auto:
    only when no checkpoint is given)."""
    train = config["finetune"]["train"]
    if train == "auto":
        return config["model"]["checkpoint"] is None
    return bool(train)


# Bad split fractions, or too few galaxies to split, stop the plan here, before
# anything runs.
check_finetune_plan(config, finetuning())


def model_settings():
    """The model section that every rule predicting with AstroMAE gets: with
    fine-tuning, its checkpoint is the fine-tuned one."""
    if finetuning():
        return {**config["model"], "checkpoint": FINETUNED}
    return config["model"]


def model_input():
    """Input of the rules that load the model: its checkpoint file (so they wait for
    fine-tuning, and rerun when it changes), or nothing for seeded weights."""
    return model_settings()["checkpoint"] or []


def evaluation_inputs():
    """What accuracy and its plot read besides the catalogue when the DAG fine-tunes:
    the split (only its test galaxies count) and the kNN baseline on them."""
    if not finetuning():
        return {}
    return {
        "split": FINETUNE + "/split.parquet",
        "baseline": FINETUNE + "/baseline_knn.parquet",
    }


def finetune_params():
    """The settings that decide the fine-tuned weights (threads come from the rule's
    threads and do not make Snakemake retrain)."""
    return {
        k: v for k, v in config["finetune"].items() if k not in ("train", "threads")
    }


def size_label(size_mb):
    """Folder label of a partition size: 25 -> '25', 12.5 -> '12.5'."""
    return f"{float(size_mb):g}"


def configured_run():
    """The run the config describes (inference.backend, data.size_gb, ...)."""
    return RunKey(
        backend=config["inference"]["backend"],
        data_gb=config["data"]["size_gb"],
        partition_mb=float(config["partition"]["size_mb"]),
        batch_size=config["inference"]["batch_size"],
        repeat=1,
    )


def run_dir():
    """The folder of the configured run."""
    return configured_run().path()


@functools.cache
def settings_of(backend):
    """Settings of a backend: its `backends` entry over the inference defaults."""
    return backend_settings(config, backend)


@functools.cache
def _plan(size, data, backend):
    return run_plan(config, float(size), parse_data_label(data), backend)


def run_key(wildcards):
    """The run a job belongs to."""
    return RunKey(
        wildcards.backend,
        parse_data_label(wildcards.data),
        float(wildcards.size),
        int(wildcards.batch),
        int(wildcards.repeat),
    )


@functools.cache
def experiment_keys():
    """The experiment's runs in the order they run, planned from config."""
    return tuple(experiment_runs(config))


@functools.cache
def _previous_runs():
    runs = experiment_keys()
    return dict(zip(runs[1:], runs[:-1]))


def after_previous_run(wildcards):
    """Input function of a run's first jobs: with experiment.one_run_at_a_time, an
    experiment's runs start one after the other (each waits for the summary of the run
    before it, and the first for every partition set and upload of the experiment), so
    no run's times include another run's load. `ancient`: a redone run does not make
    the runs after it stale."""
    key = run_key(wildcards)
    if not config["experiment"]["one_run_at_a_time"] or key == configured_run():
        return []
    if key in _previous_runs():
        return [ancient(_previous_runs()[key].path() + "/summary.json")]
    if key not in experiment_keys():
        return []
    sizes = {size_label(run.partition_mb) for run in experiment_keys()}
    staged = any(
        settings_of(run.backend)["kind"] == "lambda" for run in experiment_keys()
    )
    return [ancient(PARTITIONS.format(size=size)) for size in sorted(sizes)] + [
        ancient(f"results/lambda/staged/{size}MB.json") for size in sorted(sizes)
    ] * staged


def plan_of(wildcards):
    """The plan (partitions, jobs) of a run; computed once per partition size, data
    size and backend, as every inference job's params ask for it (and `pt` data is
    counted by opening its files)."""
    return _plan(wildcards.size, wildcards.data, wildcards.backend)


def get_job_partitions(wildcards):
    """Logical partition indices that inference job `wildcards.job` predicts."""
    return list(plan_of(wildcards).job_partitions(int(wildcards.job)))


def get_plan_jobs(wildcards):
    """Logical partition indices of every job of a run (Lambda: one per invocation)."""
    plan = plan_of(wildcards)
    return [list(plan.job_partitions(job)) for job in range(plan.jobs)]


def deploy_receipt():
    """The deploy rule's output when aws.deploy is set, so dispatch waits for it."""
    if not config["aws"]["deploy"]:
        return []
    return f"results/lambda/deploy/{config['aws']['function_name']}.json"


def get_job_outputs(kind):
    """Input function: every inference job's predictions or metrics of a run; for the
    Lambda backends, the folder where rule dispatch puts them."""

    def inputs(wildcards):
        if settings_of(wildcards.backend)["kind"] == "lambda":
            return [RUN.format(**wildcards) + "/lambda/results"]
        return expand(
            RUN + "/jobs/job-{job}.{ext}",
            **wildcards,
            job=[f"{job:05d}" for job in range(plan_of(wildcards).jobs)],
            ext={"predictions": "parquet", "metrics": "json"}[kind],
        )

    return inputs


def cluster_resources(rule, gpus=True):
    """SLURM resources of a rule from config `cluster`; memory and runtime double with
    each retry (Snakemake's `attempt`). GPUs only for `infer` of a backend that asks
    for them (its `gpus`), unless `gpus` is False.
    """
    cluster = config["cluster"]
    mem_mb, runtime = cluster["mem_mb"][rule], cluster["runtime"][rule]
    resources = {
        "mem_mb": lambda wildcards, attempt: mem_mb * 2 ** (attempt - 1),
        "runtime": lambda wildcards, attempt: runtime * 2 ** (attempt - 1),
    }
    optional = {
        "slurm_partition": cluster["partition"],
        "slurm_account": cluster["account"],
        "constraint": cluster["constraint"],
    }
    if rule == "finetune" and config["finetune"]["device"] == "cuda":
        optional["gpu"] = 1
    if rule == "infer" and gpus:
        if any(settings_of(b)["gpus"] for b in config["backends"]):
            optional["gpu"] = lambda wildcards: settings_of(wildcards.backend)["gpus"]
        if cluster["gpu_model"]:
            optional["gpu_model"] = lambda wildcards: (
                cluster["gpu_model"] if settings_of(wildcards.backend)["gpus"] else ""
            )
    resources.update({k: v for k, v in optional.items() if v is not None})
    return resources


def final_targets():
    run = run_dir()
    trained = [FINETUNE + "/training.json", FINETUNE + "/training.png"]
    return trained * finetuning() + [
        f"{run}/catalogue.parquet",
        f"{run}/partition_metrics.tsv",
        f"{run}/summary.json",
        f"{run}/accuracy.tsv",
        f"{run}/plots/redshift_density.png",
        f"{run}/plots/partition_times.png",
        f"{run}/plots/partition_throughput.png",
        "results/precision/{size}MB-b{batch}/precision_gate.tsv".format(
            size=size_label(config["partition"]["size_mb"]),
            batch=config["inference"]["batch_size"],
        ),
    ]
