# Shared names and input functions. The plan (partitions and inference jobs) is
# computed from the config before anything runs, so --dry-run shows every job.

from cai.workflow import job_count, job_partition_indices, partition_total

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


def jobs_of(size):
    """Inference job ids for a partition size."""
    per_job = config["inference"]["partitions_per_job"]
    total = partition_total({**config, "partition": {"size_mb": float(size)}})
    return [f"{job:05d}" for job in range(job_count(total, per_job))]


def get_job_partitions(wildcards):
    """Partition indices that inference job `wildcards.job` predicts."""
    total = partition_total({**config, "partition": {"size_mb": float(wildcards.size)}})
    per_job = config["inference"]["partitions_per_job"]
    return list(job_partition_indices(int(wildcards.job), per_job, total))


def get_job_outputs(kind):
    """Input function: every inference job's predictions or metrics of a run."""

    def inputs(wildcards):
        return expand(
            RUN + "/jobs/job-{job}.{ext}",
            backend=wildcards.backend,
            size=wildcards.size,
            batch=wildcards.batch,
            job=jobs_of(wildcards.size),
            ext={"predictions": "parquet", "metrics": "json"}[kind],
        )

    return inputs


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
    ]
