"""AstroMAE: architecture, checkpoints and seeded weights."""

import math
import re
from pathlib import Path

import pytest
import torch
from reference_astromae import reference_forward
from safetensors.torch import save_file

from cai.errors import CheckpointError
from cai.model import (
    AstroMAE,
    ModelConfig,
    count_parameters,
    create_model,
    save_checkpoint,
)

TSV = Path(__file__).parent / "data" / "astromae-state-dict.tsv"
SHARED = ("inception_model.conv2d_init.", "inception_model.vis_inception.0.")


def tsv_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with the original implementation's names and shapes (depth 12).

    BatchNorm statistics are random too (variance positive), so a model that skipped
    or misplaced a BatchNorm would not match the reference.
    """
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for line in TSV.read_text().splitlines():
        if line.startswith("#") or line.startswith("key\t"):
            continue
        key, shape_text, dtype = line.split("\t")
        shape = () if shape_text == "scalar" else tuple(map(int, shape_text.split("x")))
        if dtype == "int64":
            state[key] = torch.tensor(7, dtype=torch.int64)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 16
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    for name in ("weight", "bias"):
        state[SHARED[1] + name] = state[SHARED[0] + name].clone()
    return state


def inputs(batch: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 5, 32, 32, generator=gen)
    magnitudes = 17 + torch.randn(batch, 5, generator=gen)
    return image, magnitudes


def test_tsv_state_dict_loads_strictly_and_matches_reference(tmp_path):
    state = tsv_state_dict()
    path = tmp_path / "astromae.pt"
    torch.save(state, path)
    model, weights = create_model(ModelConfig(depth=12, num_heads=8), path)
    assert weights == "checkpoint astromae.pt"
    image, magnitudes = inputs()
    with torch.inference_mode():
        ours = model(image, magnitudes)
        reference = reference_forward(state, image, magnitudes, heads=8)
    assert ours.shape == (4,)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_module_prefix_of_data_parallel_checkpoints_is_accepted(tmp_path):
    state = tsv_state_dict()
    path = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    model, _ = create_model(ModelConfig(), path)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_parameter_count_and_names_match_the_original():
    model = AstroMAE(ModelConfig(depth=12, num_heads=8))
    expected = {
        line.split("\t")[0]: line.split("\t")[1]
        for line in TSV.read_text().splitlines()
        if not line.startswith(("#", "key\t"))
    }
    shapes = {
        k: "x".join(map(str, v.shape)) or "scalar"
        for k, v in model.state_dict().items()
    }
    assert shapes == expected
    assert count_parameters(model) == pytest.approx(47.7e6, rel=0.01)


@pytest.mark.parametrize(("depth", "heads"), [(1, 1), (2, 4), (3, 8), (12, 8)])
def test_forward_shape_and_finite_for_each_config(depth, heads):
    model, _ = create_model(ModelConfig(depth=depth, num_heads=heads), seed=3)
    image, magnitudes = inputs(batch=3)
    with torch.inference_mode():
        z = model(image, magnitudes)
    assert z.shape == (3,)
    assert torch.isfinite(z).all()


def test_heads_change_the_output_for_the_same_weights():
    state = tsv_state_dict()
    image, magnitudes = inputs()
    outputs = []
    for heads in (4, 8):
        model = AstroMAE(ModelConfig(depth=12, num_heads=heads)).eval()
        model.load_state_dict(state)
        with torch.inference_mode():
            outputs.append(model(image, magnitudes))
        torch.testing.assert_close(
            outputs[-1],
            reference_forward(state, image, magnitudes, heads),
            rtol=1e-5,
            atol=1e-5,
        )
    assert not torch.allclose(outputs[0], outputs[1])


def test_seeded_weights_are_deterministic_and_leave_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first, weights = create_model(ModelConfig(depth=2), seed=5)
    after = torch.rand(1)
    second, _ = create_model(ModelConfig(depth=2), seed=5)
    other, _ = create_model(ModelConfig(depth=2), seed=6)
    assert weights == "untrained weights (seed 5)"
    assert torch.equal(before, after)
    a, b, c = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])


def test_untrained_weights_warn(caplog):
    with caplog.at_level("WARNING"):
        create_model(ModelConfig(depth=1))
    assert "untrained weights" in caplog.text


def test_half_precision_checkpoint_loads_as_fp32(tmp_path):
    state = tsv_state_dict()
    path = tmp_path / "half.pt"
    torch.save(
        {k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path
    )
    model, _ = create_model(ModelConfig(), path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    image, magnitudes = inputs()
    with torch.inference_mode():
        assert torch.isfinite(model(image, magnitudes)).all()


def test_safetensors_round_trip(tmp_path):
    model, _ = create_model(ModelConfig(depth=2, num_heads=4), seed=9)
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path)
    loaded, weights = create_model(ModelConfig(depth=2, num_heads=4), path)
    assert weights == "checkpoint m.safetensors"
    image, magnitudes = inputs()
    with torch.inference_mode():
        torch.testing.assert_close(
            loaded(image, magnitudes), model(image, magnitudes), rtol=0, atol=0
        )


def test_missing_extra_and_misshaped_keys_are_named(tmp_path):
    state = tsv_state_dict()
    del state["head.bias"]
    state["head.extra"] = torch.zeros(3)
    state["vit_block.0.weight"] = torch.zeros(10, 192)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        create_model(ModelConfig(), path)
    message = str(err.value)
    assert str(path) in message
    assert "1 missing keys (head.bias)" in message
    assert "1 unexpected keys (head.extra)" in message
    assert "vit_block.0.weight: (10, 192), expected (1096, 192)" in message


def test_depth_and_heads_disagreements_are_refused(tmp_path):
    path = tmp_path / "d12.pt"
    torch.save(tsv_state_dict(), path)
    with pytest.raises(
        CheckpointError, match=re.escape("holds 12 encoder blocks but model.depth is 6")
    ):
        create_model(ModelConfig(depth=6), path)
    model, _ = create_model(ModelConfig(depth=1, num_heads=8))
    sft = tmp_path / "h8.safetensors"
    save_checkpoint(model, sft)
    with pytest.raises(
        CheckpointError, match=re.escape("num_heads=8 but model.num_heads is 4")
    ):
        create_model(ModelConfig(depth=1, num_heads=4), sft)


def test_diverging_copies_of_the_shared_inception_stem_are_refused(tmp_path):
    state = tsv_state_dict()
    state[SHARED[1] + "bias"] = state[SHARED[1] + "bias"] + 1
    path = tmp_path / "shared.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="must hold the same values"):
        create_model(ModelConfig(), path)


def test_unreadable_and_pickled_code_checkpoints_are_refused(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=re.escape("garbage.safetensors")):
        create_model(ModelConfig(), garbage)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"x": Payload(str(marker))}, evil)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        create_model(ModelConfig(), evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="not found"):
        create_model(ModelConfig(), tmp_path / "missing.pt")


class Payload:
    """Unpickling this would create a file: a stand-in for malicious code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_invalid_config_values_are_refused():
    with pytest.raises(ValueError, match="num_heads must divide"):
        ModelConfig(num_heads=5)
    with pytest.raises(ValueError, match="depth must be >= 1"):
        ModelConfig(depth=0)
