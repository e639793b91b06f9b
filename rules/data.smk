rule simulate:
    output:
        "results/data/synthetic.h5",
    log:
        "results/logs/simulate.log",
    resources:
        **cluster_resources("simulate"),
    params:
        n_galaxies=config["data"]["synthetic"]["n_galaxies"],
        seed=config["data"]["synthetic"]["seed"],
        first_object_id=config["data"]["first_object_id"],
    script:
        "../scripts/simulate.py"


rule import_pt:
    input:
        config["data"]["pt_files"],
    output:
        "results/data/imported.h5",
    log:
        "results/logs/import_pt.log",
    resources:
        **cluster_resources("simulate"),
    params:
        first_object_id=config["data"]["first_object_id"],
    script:
        "../scripts/import_pt.py"
