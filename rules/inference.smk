# Inference jobs of the local and SLURM backends: each predicts a group of partitions.
# Under an executor profile (profiles/slurm) every rule is submitted as a job, except
# local rules: `infer_local`, the same job for backends of kind local, stays on this
# machine, so one DAG can compare a local run with SLURM and Lambda runs.


rule infer:
    input:
        PARTITIONS,
        after=after_previous_run,
        model=model_input(),
    output:
        predictions=RUN + "/jobs/job-{job}.parquet",
        metrics=RUN + "/jobs/job-{job}.json",
    log:
        LOGS + "/infer-job-{job}.log",
    wildcard_constraints:
        backend="|".join(
            b for b, e in config["backends"].items() if e["kind"] == "slurm"
        )
        or "(?!)",
    retries: config["cluster"]["retries"]
    threads: lambda wildcards: settings_of(wildcards.backend)["threads"]
    resources:
        **cluster_resources("infer"),
    params:
        partitions=get_job_partitions,
        logical=lambda wildcards: plan_of(wildcards).logical,
        physical=lambda wildcards: plan_of(wildcards).physical,
        kind=lambda wildcards: settings_of(wildcards.backend)["kind"],
        device=lambda wildcards: settings_of(wildcards.backend)["device"],
        model=model_settings(),
        verify_checksum=config["inference"]["verify_checksum"],
        precision=config["inference"]["precision"],
    script:
        "../scripts/infer.py"


use rule infer as infer_local with:
    wildcard_constraints:
        backend="|".join(
            b for b, e in config["backends"].items() if e["kind"] == "local"
        )
        or "(?!)",
