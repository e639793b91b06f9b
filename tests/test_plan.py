"""The plan of a run: partitions, cyclic reuse beyond the stored data, job grouping."""

import pytest

from cai.errors import ConfigError
from cai.partition import planned_partitions
from cai.plan import Plan, logical_partitions, make_plan
from cai.workflow import (
    backend_settings,
    check_backend_placement,
    coerce_cli_values,
    run_plan,
)


def test_stored_data_once_is_one_logical_partition_per_file():
    plan = make_plan(physical=4, size_mb=25, size_gb=None, per_job=1, max_jobs=1000)
    assert plan == Plan(physical=4, logical=4, per_job=1)
    assert plan.jobs == 4 and not plan.storage_shared
    assert list(plan.job_partitions(3)) == [3]


def test_the_papers_1_tb_plans():
    # 1024 GiB / 100 MiB = 10,485.76 -> 10,486 partitions; / 25 MiB = 41,943.04 -> 41,944
    assert logical_partitions(1024, 100) == 10_486
    assert logical_partitions(1024, 25) == 41_944
    # the paper's 12.6 GB at 25 MB: 516.1 -> 517 partitions (517 Lambdas)
    assert logical_partitions(12.6, 25) == 517
    plan = make_plan(physical=4, size_mb=100, size_gb=1024, per_job=1, max_jobs=1000)
    assert plan.storage_shared
    assert plan.per_job == 11  # ceil(10,486 / 1000)
    assert plan.jobs == 954  # ceil(10,486 / 11)
    covered = [i for job in range(plan.jobs) for i in plan.job_partitions(job)]
    assert covered == list(range(10_486))


def test_smaller_size_predicts_the_first_partitions():
    plan = make_plan(physical=10, size_mb=25, size_gb=0.05, per_job=2, max_jobs=1000)
    assert plan.logical == 3 and plan.jobs == 2
    assert list(plan.job_partitions(1)) == [2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"physical": 0}, "no partition"),
        ({"per_job": 0}, "must be >= 1"),
        ({"size_gb": -1.0}, "must be > 0"),
    ],
)
def test_bad_plans_are_refused(kwargs, message):
    args = {"physical": 2, "size_mb": 25, "size_gb": None, "per_job": 1, "max_jobs": 10}
    with pytest.raises(ValueError, match=message):
        make_plan(**{**args, **kwargs})


def test_job_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        Plan(2, 2, 1).job_partitions(2)


def manifest(n):
    entries = [
        {"id": f"part-{i:05d}", "path": f"/p/{i}.h5", "rows": 10 + i, "sha256": str(i)}
        for i in range(n)
    ]
    return {"partitions": entries}


def test_cyclic_reuse_reads_physical_partitions_in_turn():
    refs = planned_partitions(manifest(3), logical=7)
    assert [r.id for r in refs] == [f"part-{i:05d}" for i in range(7)]
    assert [r.path for r in refs] == [f"/p/{i % 3}.h5" for i in range(7)]
    assert [r.rows for r in refs] == [10 + i % 3 for i in range(7)]
    assert [r.source for r in refs] == [f"part-{i % 3:05d}" for i in range(7)]
    assert planned_partitions(manifest(3))[2].source is None
    assert [r.id for r in planned_partitions(manifest(3), [5, 6], logical=7)] == [
        "part-00005",
        "part-00006",
    ]


def test_run_plan_from_config_names_the_keys_on_error():
    config = {
        "data": {
            "source": "synthetic",
            "synthetic": {"n_galaxies": 5000},
            "size_gb": None,
        },
        "partition": {"size_mb": 25},
        "inference": {
            "backend": "local",
            "device": "cpu",
            "threads": 2,
            "partitions_per_job": 1,
            "max_jobs": 1000,
        },
        "cluster": {"gpus": 0},
        "backends": {
            "local": {"kind": "local"},
            "lambda": {"kind": "lambda", "max_jobs": 100000},
        },
    }
    assert run_plan(config).logical == 4  # 5,000 galaxies of 1,278 a partition
    with pytest.raises(ConfigError, match=r"partition\.size_mb"):
        run_plan(config, size_mb=0.001)
    # 1 TB at 100 MB: 954 local jobs of up to 11 partitions, one invocation each on
    # the Lambda backend (its max_jobs).
    assert run_plan(config, 100, 1024).jobs == 954
    assert run_plan(config, 100, 1024, "lambda").jobs == 10486
    with pytest.raises(ConfigError, match=r"backend 'slurm' is not configured"):
        run_plan(config, backend="slurm")


def test_backend_settings_override_the_inference_defaults():
    config = {
        "inference": {
            "device": "cpu",
            "threads": 2,
            "partitions_per_job": 1,
            "max_jobs": 1000,
        },
        "cluster": {"gpus": 0},
        "backends": {
            "gpu": {"kind": "slurm", "device": "cuda", "gpus": 1, "threads": 4},
            "laptop": {"kind": "local", "gpus": 2},
        },
    }
    gpu = backend_settings(config, "gpu")
    assert gpu == {
        "device": "cuda",
        "threads": 4,
        "partitions_per_job": 1,
        "max_jobs": 1000,
        "gpus": 1,
        "kind": "slurm",
        "name": "gpu",
    }
    assert backend_settings(config, "laptop")["gpus"] == 0  # GPUs only on SLURM


def test_slurm_backend_outside_slurm_is_refused(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(ConfigError, match=r"'slurm-cpu' is a SLURM backend.*profiles"):
        check_backend_placement("slurm", "slurm-cpu")
    check_backend_placement("local", "local")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    check_backend_placement("slurm", "slurm-cpu")


def test_cli_strings_get_the_types_the_schema_expects():
    schema = {
        "properties": {
            "data": {
                "properties": {
                    "size_gb": {"type": ["number", "null"]},
                    "source": {"enum": ["synthetic", "pt"]},
                }
            },
            "inference": {
                "properties": {
                    "batch_size": {"type": "integer"},
                    "verify_checksum": {"type": "boolean"},
                    "backend": {"type": "string"},
                    "threads": {"type": "integer"},
                }
            },
        }
    }
    config = {
        "data": {"size_gb": "1024", "source": "pt"},
        "inference": {
            "batch_size": "64",
            "verify_checksum": "false",
            "backend": "123",
            "threads": "two",
        },
    }
    coerce_cli_values(config, schema)
    assert config["data"] == {"size_gb": 1024, "source": "pt"}
    assert config["inference"]["batch_size"] == 64
    assert config["inference"]["verify_checksum"] is False
    assert config["inference"]["backend"] == "123"  # strings stay strings
    assert config["inference"]["threads"] == "two"  # left for the schema to refuse
