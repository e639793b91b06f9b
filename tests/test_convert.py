"""convert-checkpoint: the original whole-model pickle to safetensors, only on trust."""

import sys
import types

import pytest
import torch
from torch import nn

from cai import model as cai_model
from cai.convert import convert_checkpoint
from cai.errors import CheckpointError
from cai.model import AstroMAE, ModelConfig, create_model

# Our classes and the (module, class) names the original pickle records for them.
ORIGINAL_NAMES = {
    cai_model.AstroMAE: ("blocks.model_vit_inception", "ViT_Astro"),
    cai_model.NormalCell: ("NormalCell", "NormalCell"),
    cai_model.InceptionMagnitudeModel: ("blocks.photoz", "Input_Mix_Model"),
    cai_model.InceptionBlock: ("blocks.photoz", "InceptionBlock"),
    cai_model.ConvBlock: ("blocks.photoz", "ConvBlock"),
}


@pytest.fixture
def original_pickle(tmp_path, monkeypatch):
    """A torch.save(nn.DataParallel(model)) file naming the original classes.

    Each module of a seeded AstroMAE is re-classed to a subclass carrying the original
    module and class name, registered in sys.modules only while the file is written,
    so the pickle refers to exactly the names the real file does.
    """
    model = AstroMAE(ModelConfig(depth=2, num_heads=8))
    model.init_weights()
    timm_names = {
        "PatchEmbed": "timm.models.layers.patch_embed",
        "Attention": "NormalCell",
        "Mlp": "NormalCell",
    }
    made: dict[type, type] = {}
    monkeypatch.setitem(sys.modules, "blocks", types.ModuleType("blocks"))
    for module in model.modules():
        cls = type(module)
        if cls in ORIGINAL_NAMES:
            mod_name, cls_name = ORIGINAL_NAMES[cls]
        elif cls.__name__ in timm_names:
            mod_name, cls_name = timm_names[cls.__name__], cls.__name__
        else:
            continue
        if cls not in made:
            fake_module = sys.modules.get(mod_name) or types.ModuleType(mod_name)
            monkeypatch.setitem(sys.modules, mod_name, fake_module)
            made[cls] = type(cls_name, (cls,), {"__module__": mod_name})
            setattr(fake_module, cls_name, made[cls])
        module.__class__ = made[cls]
    del model.config  # the original class has no such attribute
    path = tmp_path / "original.pth"
    torch.save(nn.DataParallel(model), path)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    return path, expected


def test_refuses_without_trust_and_writes_nothing(original_pickle, tmp_path):
    path, _ = original_pickle
    out = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        convert_checkpoint(path, out, trust_pickle=False)
    assert not out.exists()


def test_converts_the_original_pickle_strictly(original_pickle, tmp_path):
    path, expected = original_pickle
    out = tmp_path / "astromae.safetensors"
    # Forget the original classes: the converter must not need their code.
    for mod_name in (
        "blocks.model_vit_inception",
        "blocks.photoz",
        "NormalCell",
        "blocks",
    ):
        sys.modules.pop(mod_name, None)
    summary = convert_checkpoint(path, out, trust_pickle=True)
    assert summary["depth"] == 2
    model, weights = create_model(ModelConfig(depth=2, num_heads=8), out)
    assert weights == "checkpoint astromae.safetensors"
    state = model.state_dict()
    assert set(state) == set(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


def test_foreign_code_in_a_trusted_pickle_is_still_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"weight": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"posix\.system|os\.system"):
        convert_checkpoint(path, tmp_path / "out.safetensors", trust_pickle=True)
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()
