rule partition:
    input:
        DATASET,
    output:
        directory(PARTITIONS),
    log:
        "results/logs/partition-{size}MB.log",
    resources:
        **cluster_resources("partition"),
    script:
        "../scripts/partition.py"
