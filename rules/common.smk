# Shared names, the plan and input functions. The plan (partitions and inference jobs)
# is computed from the config before anything runs, so --dry-run shows every job.

import functools

from cai.workflow import run_plan

DATASET = {
    "synthetic": "results/data/synthetic.h5",
    "pt": "results/data/imported.h5",
}[config["data"]["source"]]
PARTITIONS = "results/partitions/{size}MB"
RUN = "results/{backend}/{size}MB-b{batch}"
LOGS = "results/logs/{backend}/{size}MB-b{batch}"


wildcard_constraints:
    size=r"\d+(\.\d+)?",
    batch=r"\d+",
    job=r"\d{5}",
    backend=r"[a-z0-9][a-z0-9-]*",


localrules:
    all,
    accuracy,
    plot_redshift,
    plot_partitions,


def size_label(size_mb):
    """Folder label of a partition size: 25 -> '25', 12.5 -> '12.5'."""
    return f"{float(size_mb):g}"


def run_dir():
    """The folder of the configured run: results/<backend>/<size>MB-b<batch>."""
    return RUN.format(
        backend=config["inference"]["backend"],
        size=size_label(config["partition"]["size_mb"]),
        batch=config["inference"]["batch_size"],
    )


@functools.cache
def plan_of(size):
    """The plan (partitions, jobs) of a run at partition size `size`; computed once per
    size, as every inference job's params ask for it (and `pt` data is counted by
    opening its files)."""
    return run_plan(config, float(size))


def get_job_partitions(wildcards):
    """Logical partition indices that inference job `wildcards.job` predicts."""
    return list(plan_of(wildcards.size).job_partitions(int(wildcards.job)))


def get_plan_jobs(wildcards):
    """Logical partition indices of every job of a run (Lambda: one per invocation)."""
    plan = plan_of(wildcards.size)
    return [list(plan.job_partitions(job)) for job in range(plan.jobs)]


def deploy_receipt():
    """The deploy rule's output when aws.deploy is set, so dispatch waits for it."""
    if not config["aws"]["deploy"]:
        return []
    return f"results/lambda/deploy/{config['aws']['function_name']}.json"


def get_job_outputs(kind):
    """Input function: every inference job's predictions or metrics of a run; for the
    Lambda backend, the folder where rule dispatch puts them."""

    def inputs(wildcards):
        if wildcards.backend == "lambda":
            return [RUN.format(**wildcards) + "/lambda/results"]
        return expand(
            RUN + "/jobs/job-{job}.{ext}",
            backend=wildcards.backend,
            size=wildcards.size,
            batch=wildcards.batch,
            job=[f"{job:05d}" for job in range(plan_of(wildcards.size).jobs)],
            ext={"predictions": "parquet", "metrics": "json"}[kind],
        )

    return inputs


def cluster_resources(rule, gpus=True):
    """SLURM resources of a rule from config `cluster`; memory and runtime double with
    each retry (Snakemake's `attempt`). GPUs only for `infer`, unless `gpus` is False.
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
    if rule == "infer" and gpus and cluster["gpus"]:
        optional.update(gpu=cluster["gpus"], gpu_model=cluster["gpu_model"])
    resources.update({k: v for k, v in optional.items() if v is not None})
    return resources


def final_targets():
    run = run_dir()
    return [
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
