rule partition:
    input:
        DATASET,
    output:
        directory(PARTITIONS),
    log:
        "results/logs/partition-{size}MB.log",
    script:
        "../scripts/partition.py"
