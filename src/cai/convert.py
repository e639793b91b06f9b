"""Convert the original AstroMAE whole-model pickle into a safetensors checkpoint.

The original fine-tuned model was saved with ``torch.save(model)``: a pickle of a
``torch.nn.DataParallel`` around ``blocks.model_vit_inception.ViT_Astro``. Unpickling
such a file runs whatever code the file names, so this module refuses unless the caller
says the file is trusted. Even then it narrows the risk: a restricted unpickler resolves
only torch's own modules and tensor rebuilders, plain containers, and stand-ins for the
original classes (modules ``NormalCell``, ``blocks.photoz``,
``blocks.model_vit_inception`` and timm 0.4.12's ``PatchEmbed``); any other name in the
file stops the conversion. The stand-ins hold state only, so no original code is needed.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
import types
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from cai.errors import CheckpointError
from cai.model import AstroMAE, ModelConfig, check_state_dict, depth_of, save_checkpoint
from cai.model import strip_prefix as _strip_prefix

_logger = logging.getLogger(__name__)

# Modules whose classes the original pickle names; each becomes a state-only stand-in.
ORIGINAL_MODULES = (
    "NormalCell",
    "blocks.photoz",
    "blocks.model_vit_inception",
    "timm.models.layers",
    "timm.layers",
)
# Harmless non-module globals a torch.save pickle of a model refers to.
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("copyreg", "_reconstructor"),
    ("builtins", "object"),
    ("functools", "partial"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "float32"),
    ("torch", "int64"),
}

PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _StandIn(nn.Module):
    """A module restored from pickled state only; it has no forward pass.

    It also stands in for small helper values of the original code (an enum member,
    say), so it takes and ignores constructor arguments.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()

    def forward(self, *args: Any) -> Any:  # pragma: no cover - never called
        raise RuntimeError(f"{type(self).__qualname__} is a stand-in without a forward")


def _stand_in(module: str, name: str) -> type:
    return type(name, (_StandIn,), {"__module__": f"cai.convert.original.{module}"})


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; anything else raises CheckpointError."""

    _stand_ins: ClassVar[dict[tuple[str, str], type]] = {}

    def find_class(self, module: str, name: str) -> Any:
        # torch.save writes pickle protocol 2, which spells some modules the Python 2 way.
        module = PY2_MODULES.get(module, module)
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module.startswith(ORIGINAL_MODULES) and name.isidentifier():
            key = (module, name)
            if key not in self._stand_ins:
                self._stand_ins[key] = _stand_in(module, name)
            return self._stand_ins[key]
        allowed_torch = module.startswith(("torch.nn.modules", "torch.nn.parameter"))
        allowed_torch |= module == "torch.nn.parallel.data_parallel"
        allowed_torch |= module == "torch._utils" and name.startswith("_rebuild_")
        allowed_torch |= module in ("torch", "torch.storage") and name.endswith(
            "Storage"
        )
        if allowed_torch:
            return super().find_class(module, name)
        raise CheckpointError(
            f"the pickle refers to {module}.{name}, which is not part of the original "
            "AstroMAE model; refusing to load it"
        )


restricted_pickle = types.SimpleNamespace(
    Unpickler=RestrictedUnpickler, load=pickle.load, __name__="restricted_pickle"
)


def load_original_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Unpickle the original model file with the restricted unpickler; its state_dict."""
    try:
        obj = torch.load(
            path,
            map_location="cpu",
            weights_only=False,
            pickle_module=restricted_pickle,
        )
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file not found") from None
    except Exception as err:
        raise CheckpointError(
            f"{path}: cannot be read as a pickled model ({type(err).__name__}: {err})"
        ) from None
    if isinstance(obj, nn.Module):
        state = obj.state_dict()
    elif isinstance(obj, dict) and all(
        isinstance(v, torch.Tensor) for v in obj.values()
    ):
        state = obj
    else:
        raise CheckpointError(
            f"{path}: holds {type(obj).__name__}; expected the pickled AstroMAE model"
        )
    return _strip_prefix(state)


def convert_checkpoint(
    source: str | os.PathLike,
    out: str | os.PathLike,
    trust_pickle: bool,
    num_heads: int = 8,
) -> dict[str, Any]:
    """Convert ``source`` to safetensors at ``out`` (strictly checked); return a summary.

    Raises:
        CheckpointError: without ``trust_pickle``, or when the tensors do not fit.
    """
    if not trust_pickle:
        raise CheckpointError(
            f"{source}: converting a pickled model runs code stored in the file. Only if "
            "you trust where it came from, run again with --trust-pickle"
        )
    started = time.perf_counter()
    state = load_original_state_dict(source)
    config = ModelConfig(depth=depth_of(state) or 12, num_heads=num_heads)
    model = AstroMAE(config)
    check_state_dict(state, model, str(source))
    model.load_state_dict(state, strict=True)
    save_checkpoint(model, out, {"source": Path(source).name, "converted_by": "cai"})
    seconds = time.perf_counter() - started
    _logger.info(
        "convert-checkpoint: %d tensors, depth %d, %d heads, %.1f s -> %s",
        len(state),
        config.depth,
        config.num_heads,
        seconds,
        out,
    )
    return {"tensors": len(state), "depth": config.depth, "seconds": seconds}
