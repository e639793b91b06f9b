rule infer:
    input:
        PARTITIONS,
    output:
        predictions=RUN + "/jobs/job-{job}.parquet",
        metrics=RUN + "/jobs/job-{job}.json",
    log:
        LOGS + "/infer-job-{job}.log",
    retries: config["cluster"]["retries"]
    threads: config["inference"]["threads"]
    resources:
        **cluster_resources("infer"),
    params:
        partitions=get_job_partitions,
        logical=lambda wildcards: plan_of(wildcards.size).logical,
        physical=lambda wildcards: plan_of(wildcards.size).physical,
        model=config["model"],
        device=config["inference"]["device"],
        verify_checksum=config["inference"]["verify_checksum"],
        precision=config["inference"]["precision"],
    script:
        "../scripts/infer.py"
