"""AstroMAE fine-tuning model: redshift from a 5-band galaxy image and its magnitudes.

AstroMAE: Redshift Prediction Using a Masked Autoencoder with a Novel Fine-Tuning
Architecture (Fathkouhi et al., 2024, https://arxiv.org/abs/2409.01825), as used by
Scalable Cosmic AI Inference using Cloud Serverless Computing (Staylor et al., 2025).

Three branches meet in a small regression head:
  * a ViT encoder pretrained as a masked autoencoder, whose blocks are ViTAE "normal
    cells" (Xu et al., 2021, https://arxiv.org/abs/2106.03348): attention plus a parallel
    convolution module (PCM) on the 4x4 patch map, class-token variant;
  * an Inception branch on the image (after Pasquet et al., 2019,
    https://arxiv.org/abs/1806.06607);
  * a fully connected block on the five magnitudes.

Parameter names follow the original implementation's state_dict, so that its checkpoints
load with strict key matching (with or without the ``module.`` prefix that
``nn.DataParallel`` adds). The original's whole-model pickle is converted to safetensors
by :mod:`cai.convert`, never unpickled here.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from timm.layers import Attention, Mlp, PatchEmbed, trunc_normal_
from torch import nn

from cai.errors import CheckpointError

_logger = logging.getLogger(__name__)

IMG_SIZE = 32
IN_CHANS = 5
PATCH_SIZE = 8
EMBED_DIM = 192
MLP_DIM = 768  # hidden width of both the MLP and the PCM (ratio 4)
BRANCH_DIM = 1096  # width of the ViT and Inception branch outputs
MAGNITUDE_DIM = 1024
HEAD_DIM = 1024
SAFETENSORS_FORMAT = "cai-astromae"


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the encoder; every other width is fixed by the architecture.

    Attributes:
        depth: Number of encoder blocks (12 in the paper's checkpoint).
        num_heads: Attention heads. The weights cannot tell it, the output depends on it.
    """

    depth: int = 12
    num_heads: int = 8

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"model depth must be >= 1, got {self.depth}")
        if self.num_heads < 1 or EMBED_DIM % self.num_heads:
            raise ValueError(
                f"num_heads must divide the embedding width {EMBED_DIM}, "
                f"got {self.num_heads}"
            )


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


class NormalCell(nn.Module):
    """ViTAE normal cell, class-token variant.

    The PCM sees the block input's patch tokens as a 4x4 map; its output is added to the
    patch tokens (not the class token) after the attention residual and before the MLP.
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=False)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(in_features=dim, hidden_features=mlp_dim, act_layer=nn.GELU)
        self.PCM = nn.Sequential(
            nn.Conv2d(dim, mlp_dim, kernel_size=3, padding=1),
            nn.BatchNorm2d(mlp_dim),
            nn.SiLU(),
            nn.Conv2d(mlp_dim, dim, kernel_size=3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        side = math.isqrt(tokens - 1)
        patch_map = x[:, 1:].transpose(1, 2).reshape(batch, dim, side, side)
        conv = self.PCM(patch_map).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x))
        x = torch.cat([x[:, :1], x[:, 1:] + conv], dim=1)
        return x + self.mlp(self.norm2(x))


class ConvBlock(nn.Module):
    """Conv2d, BatchNorm, ReLU."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(
            in_chans, out_chans, kernel_size, padding=kernel_size // 2
        )
        self.bn = nn.BatchNorm2d(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class InceptionBlock(nn.Module):
    """Four parallel branches (1x1; 1x1-3x3; 1x1-5x5; maxpool-1x1), concatenated.

    Every branch gives ``width`` channels. With ``use_5x5=False`` the 5x5 branch keeps
    its parameters (they are in the original checkpoint) but is left out of the output.
    """

    def __init__(self, in_chans: int, width: int, use_5x5: bool = True):
        super().__init__()
        self.use_5x5 = use_5x5
        self.branch1 = ConvBlock(in_chans, width, 1)
        self.branch2 = nn.Sequential(
            ConvBlock(in_chans, width, 1), ConvBlock(width, width, 3)
        )
        self.branch3 = nn.Sequential(
            ConvBlock(in_chans, width, 1), ConvBlock(width, width, 5)
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
            ConvBlock(in_chans, width, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch1, self.branch2, self.branch3, self.branch4]
        if not self.use_5x5:
            branches.remove(self.branch3)
        return torch.cat([branch(x) for branch in branches], dim=1)


class InceptionMagnitudeModel(nn.Module):
    """Inception branch on the image and the magnitude block, concatenated (1096 + 1024)."""

    def __init__(self):
        super().__init__()
        # One module, reachable under two names, as in the original state_dict.
        self.conv2d_init = nn.Conv2d(IN_CHANS, 32, kernel_size=1)
        self.vis_inception = nn.Sequential(
            self.conv2d_init,  # 0: 5 -> 32 channels, 32x32
            nn.AvgPool2d(2),  # 1: 16x16
            InceptionBlock(32, 16),  # 2: 64 channels
            InceptionBlock(64, 16),  # 3: 64
            nn.AvgPool2d(2),  # 4: 8x8
            InceptionBlock(64, 8),  # 5: 32
            InceptionBlock(32, 8),  # 6: 32
            nn.AvgPool2d(2),  # 7: 4x4
            InceptionBlock(32, 4, use_5x5=False),  # 8: 12 channels x 16 = 192
            nn.Flatten(),  # 9
            nn.Linear(12 * 4 * 4, BRANCH_DIM),  # 10
            nn.ReLU(),  # 11
            nn.Linear(BRANCH_DIM, BRANCH_DIM),  # 12
        )
        layers: list[nn.Module] = [nn.Linear(IN_CHANS, MAGNITUDE_DIM)]
        for _ in range(4):
            layers += [nn.ReLU(), nn.Linear(MAGNITUDE_DIM, MAGNITUDE_DIM)]
        self.magnitude_block = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [self.vis_inception(image), self.magnitude_block(magnitudes)], 1
        )


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


class AstroMAE(nn.Module):
    """AstroMAE redshift regressor.

    Inputs are ``image`` [B, 5, 32, 32] (bands u, g, r, i, z) and ``magnitudes`` [B, 5];
    the output is the predicted redshift [B].
    """

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config or ModelConfig()
        self.patch_embed = PatchEmbed(
            img_size=IMG_SIZE,
            patch_size=PATCH_SIZE,
            in_chans=IN_CHANS,
            embed_dim=EMBED_DIM,
        )
        num_patches = self.patch_embed.num_patches  # 16, row-major
        self.cls_token = nn.Parameter(torch.zeros(1, 1, EMBED_DIM))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, EMBED_DIM))
        self.blocks = nn.ModuleList(
            NormalCell(EMBED_DIM, self.config.num_heads, MLP_DIM)
            for _ in range(self.config.depth)
        )
        self.fc_norm = nn.LayerNorm(EMBED_DIM, eps=1e-6)
        self.head = nn.Linear(EMBED_DIM, EMBED_DIM)
        self.vit_block = nn.Sequential(
            nn.Linear(EMBED_DIM, BRANCH_DIM),
            nn.ReLU(),
            nn.Linear(BRANCH_DIM, BRANCH_DIM),
        )
        self.inception_model = InceptionMagnitudeModel()
        self.concat_block = nn.Sequential(
            nn.Linear(2 * BRANCH_DIM + MAGNITUDE_DIM, HEAD_DIM),
            nn.ReLU(),
            nn.Linear(HEAD_DIM, 1),
        )

    def init_weights(self) -> None:
        """ViT-style initialisation: truncated normal (std 0.02) for the transformer."""
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in [*self.blocks.modules(), self.head, *self.vit_block.modules()]:
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_encoder(self, image: torch.Tensor) -> torch.Tensor:
        """The encoder proper: mean of its output patch tokens (class token dropped),
        [B, 192]. Frozen in fine-tuning, so :mod:`cai.finetune` caches it."""
        x = self.patch_embed(image)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x[:, 1:].mean(dim=1)

    def forward_features(self, image: torch.Tensor) -> torch.Tensor:
        """Encoder features: the pooled patch tokens, normalised [B, 192]."""
        return self.fc_norm(self.forward_encoder(image))

    def forward_head(
        self, features: torch.Tensor, image: torch.Tensor, magnitudes: torch.Tensor
    ) -> torch.Tensor:
        """Everything after the encoder; the part that fine-tuning trains."""
        vit = self.vit_block(self.head(features))
        branches = torch.cat([vit, self.inception_model(image, magnitudes)], dim=1)
        return self.concat_block(branches).squeeze(1)

    def forward(self, image: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(image), image, magnitudes)


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read tensors from a safetensors file or a ``weights_only`` torch state_dict.

    Returns the state_dict and the file's metadata (safetensors only, else empty).
    Raises CheckpointError if the file is neither, or holds anything but tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    with open(path, "rb") as fh:
        head = fh.read(8)
    is_zip_or_pickle = head[:2] == b"PK" or head[:1] == b"\x80"
    if not is_zip_or_pickle:
        try:
            with safe_open(path, framework="pt") as fh:
                metadata = dict(fh.metadata() or {})
                state = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
            return state, metadata
        except Exception as err:  # safetensors raises its own SafetensorError
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({err}); expected safetensors "
                "or a torch state_dict saved with torch.save"
            ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path}: cannot be read with weights_only=True ({type(err).__name__}: "
            f"{str(err).splitlines()[0]}). A whole pickled model must be converted "
            "first: cai convert-checkpoint --trust-pickle"
        ) from None
    if isinstance(state, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise CheckpointError(f"{path}: expected a mapping of names to tensors")
    return dict(state), {}


def strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix of ``nn.DataParallel`` checkpoints (all keys or none)."""
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):
        return {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def depth_of(state: Mapping[str, torch.Tensor]) -> int:
    """Number of encoder blocks in a state_dict (highest ``blocks.<i>`` index + 1)."""
    indices = [int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))]
    return max(indices) + 1 if indices else 0


def check_state_dict(
    state: Mapping[str, torch.Tensor], model: nn.Module, source: str
) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k}: {tuple(state[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("mis-shaped tensors", misshaped),
    ):
        if items:
            shown = ", ".join(items[:8]) + (
                f", ... ({len(items)} in all)" if len(items) > 8 else ""
            )
            problems.append(f"{len(items)} {label} ({shown})")
    if problems:
        raise CheckpointError(
            f"{source}: does not match AstroMAE(depth={model.config.depth}, "
            f"num_heads={model.config.num_heads}): " + "; ".join(problems)
        )
    shared = ("inception_model.conv2d_init.", "inception_model.vis_inception.0.")
    for name in ("weight", "bias"):
        first, second = (state[prefix + name] for prefix in shared)
        if not torch.equal(first, second):
            raise CheckpointError(
                f"{source}: {shared[0]}{name} and {shared[1]}{name} differ; they are one "
                "module in AstroMAE and must hold the same values"
            )


def save_checkpoint(
    model: AstroMAE, path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Save a model's state_dict as safetensors, with its config in the metadata."""
    from cai.atomic import atomic_path

    # Clone every tensor: the two names of the shared Inception stem would otherwise
    # share storage, which safetensors refuses.
    tensors = {
        k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
    }
    meta = {
        "format": SAFETENSORS_FORMAT,
        **{k: str(v) for k, v in asdict(model.config).items()},
    }
    meta.update(metadata or {})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def create_model(
    config: ModelConfig | None = None,
    checkpoint: str | os.PathLike | None = None,
    seed: int = 0,
    warn_untrained: bool = True,
) -> tuple[AstroMAE, str]:
    """Build AstroMAE in eval mode, from a checkpoint or from seeded weights.

    With a checkpoint, its keys decide the depth (a different configured depth is an
    error); the safetensors metadata, where present, must agree on the heads. Without
    one, the weights are deterministic for ``seed`` and untrained: a warning says so,
    unless ``warn_untrained`` is False (fine-tuning, which trains them, says its own).

    Returns:
        The model and a one-line description of its weights for every report.
    """
    config = config or ModelConfig()
    if checkpoint is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AstroMAE(config)
            model.init_weights()
        if warn_untrained:
            _logger.warning(
                "no checkpoint given: AstroMAE has untrained weights (seed %d), so its "
                "redshifts are not meaningful; set model.checkpoint in config/config.yaml "
                "to a trained safetensors or state_dict file, or let the workflow "
                "fine-tune it (finetune.train)",
                seed,
            )
        return model.eval(), f"untrained weights (seed {seed})"

    state, metadata = read_state_dict(checkpoint)
    state = strip_prefix(state)
    depth = depth_of(state)
    if depth and depth != config.depth:
        raise CheckpointError(
            f"{checkpoint}: holds {depth} encoder blocks but model.depth is "
            f"{config.depth}; set model.depth: {depth}"
        )
    heads = metadata.get("num_heads")
    if heads is not None and int(heads) != config.num_heads:
        raise CheckpointError(
            f"{checkpoint}: was saved with num_heads={heads} but model.num_heads is "
            f"{config.num_heads}; set model.num_heads: {heads}"
        )
    # Built without memory (meta tensors), then given the checkpoint's tensors: no time
    # spent on a random initialisation that the checkpoint would overwrite.
    with torch.device("meta"):
        model = AstroMAE(config)
    check_state_dict(state, model, str(checkpoint))
    # Assigned tensors keep their dtype: a half-precision checkpoint becomes fp32
    # here, as the model is defined (inference.precision chooses the arithmetic).
    expected = model.state_dict()
    state = {
        key: value.to(expected[key].dtype) if value.is_floating_point() else value
        for key, value in state.items()
    }
    model.load_state_dict(state, strict=True, assign=True)
    # A checkpoint CAI saved from seeded weights (to stage them for Lambda) says so.
    return model.eval(), metadata.get(
        "weights"
    ) or f"checkpoint {Path(checkpoint).name}"


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (the shared Inception stem counted once)."""
    return sum(p.numel() for p in model.parameters())
