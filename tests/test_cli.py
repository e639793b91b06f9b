"""The `cai` command: each step end to end, and one-line errors with exit status 2."""

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from cai.cli import FINETUNE_OPTIONS, main
from cai.finetune import FinetuneSettings

COMMANDS = (
    "simulate",
    "import-pt",
    "partition",
    "infer",
    "aggregate",
    "metrics",
    "split",
    "finetune",
    "baseline-knn",
    "convert-checkpoint",
)


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


def test_steps_chain_from_simulation_to_accuracy(tmp_path, capsys):
    data, parts = tmp_path / "sky.h5", tmp_path / "parts"
    assert main(["simulate", "--n", "30", "--seed", "3", "--out", str(data)]) == 0
    assert (
        main(["partition", str(data), "--size-mb", "0.3", "--out-dir", str(parts)]) == 0
    )
    manifest = json.loads((parts / "manifest.json").read_text())
    assert [p["rows"] for p in manifest["partitions"]] == [15, 15]

    outputs = []
    for part in ("part-00000", "part-00001"):
        pred, metrics = tmp_path / f"{part}.parquet", tmp_path / f"{part}.json"
        args = ["infer", "--manifest", str(parts), "--partitions", part]
        args += ["--predictions", str(pred), "--metrics", str(metrics), "--depth", "1"]
        assert main([*args, "--batch-size", "8"]) == 0
        outputs.append((pred, metrics))
    catalogue, table, summary = (tmp_path / n for n in ("c.parquet", "t.tsv", "s.json"))
    args = ["aggregate", "--manifest", str(parts / "manifest.json")]
    args += ["--predictions", *(str(p) for p, _ in outputs)]
    args += ["--metrics", *(str(m) for _, m in outputs)]
    args += ["--catalogue", str(catalogue), "--partition-table", str(table)]
    assert main([*args, "--summary", str(summary)]) == 0
    assert pq.read_table(catalogue).num_rows == 30

    accuracy = tmp_path / "accuracy.tsv"
    args = [
        "metrics",
        str(catalogue),
        "--summary",
        str(summary),
        "--out",
        str(accuracy),
    ]
    assert main(args) == 0
    frame = pd.read_csv(accuracy, sep="\t")
    assert frame.loc[frame["metric"] == "n", "value"].item() == 30
    assert "untrained weights (seed 0)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["partition", "{missing}", "--size-mb", "25", "--out-dir", "{out}"],
            "no such file",
        ),
        (
            ["partition", "{sky}", "--size-mb", "0.01", "--out-dir", "{out}"],
            "--size-mb 0.01",
        ),
        (["convert-checkpoint", "{sky}", "{out}"], "--trust-pickle"),
        (["import-pt", "{sky}", "--out", "{out}"], "cannot be loaded safely"),
        (
            [
                *("infer", "--manifest", "{parts}", "--partitions", "part-09999"),
                *("--predictions", "{out}", "--metrics", "{out}.json"),
            ],
            "part-09999 not in",
        ),
    ],
)
def test_bad_input_is_one_line_with_exit_status_2(tmp_path, capsys, argv, message):
    sky, parts = tmp_path / "sky.h5", tmp_path / "parts"
    main(["simulate", "--n", "5", "--out", str(sky)])
    main(["partition", str(sky), "--size-mb", "1", "--out-dir", str(parts)])
    capsys.readouterr()
    names = {
        "missing": tmp_path / "nope.h5",
        "sky": sky,
        "out": tmp_path / "out",
        "parts": parts,
    }
    code = main([arg.format(**names) for arg in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_finetune_defaults_are_the_settings_and_the_configs():
    """`cai finetune`, FinetuneSettings and config/config.yaml agree on every default."""
    settings = dataclasses.asdict(FinetuneSettings())
    config = yaml.safe_load(
        (Path(__file__).parents[1] / "config/config.yaml").read_text()
    )["finetune"]
    for field, (default, _) in FINETUNE_OPTIONS.items():
        assert default == settings[field] == config[field], field
    assert (
        settings["seed"] == config["seed"] and settings["augment"] == config["augment"]
    )
