rule infer:
    input:
        PARTITIONS,
    output:
        predictions=RUN + "/jobs/job-{job}.parquet",
        metrics=RUN + "/jobs/job-{job}.json",
    log:
        LOGS + "/infer-job-{job}.log",
    threads: config["inference"]["threads"]
    resources:
        mem_mb=config["inference"]["mem_mb"],
    params:
        partitions=get_job_partitions,
        model=config["model"],
        device=config["inference"]["device"],
        verify_checksum=config["inference"]["verify_checksum"],
    script:
        "../scripts/infer.py"
