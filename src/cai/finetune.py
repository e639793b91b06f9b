"""Fine-tuning AstroMAE the paper's way: the encoder frozen, the layers after it trained.

AstroMAE (Fathkouhi et al., 2024, https://arxiv.org/abs/2409.01825) is trained in two
phases: a ViT encoder pretrained as a masked autoencoder on unlabelled images, then a
fine-tuning phase in which the encoder is frozen and everything after it is trained on
labelled galaxies: the ViT head (``fc_norm``, ``head``, ``vit_block``), the Inception
branch on the image, the magnitude block and the regression head, about 10.4 M of the
model's 47.7 M parameters. This module is the second phase, for the synthetic sky or a
survey's own labelled galaxies:

* The split (70 / 10 / 20 % train, validation, test, :mod:`cai.split`) is read from
  its table; only train and validation galaxies are read here.
* The frozen encoder's output for a galaxy never changes, so it is computed once per
  galaxy (the 192 pooled patch tokens, before ``fc_norm``, which is trained) and cached
  on disk; an epoch then runs only the trained layers, an order of magnitude less
  arithmetic than the whole model (``benchmarks/bench_finetune.py`` measures it).
* MSE loss on the redshift, AdamW (no decay on biases and norms), a linear warm-up then
  cosine decay of the learning rate, early stopping on the validation NMAD; the
  checkpoint keeps the weights of the best validation epoch.
* Training sees standardised inputs and target (magnitudes per band, images by a scale
  per band, the redshift by its mean and spread), which makes one learning rate fit any
  survey's units. The standardisation is an exact reparametrisation of the first
  magnitude layer, the first image convolution and the last layer, folded back into
  them before saving: the checkpoint is a plain AstroMAE that takes raw images and
  magnitudes and predicts z, loaded by ``infer`` like any other.
* The Inception branch sees each galaxy turned by a random multiple of 90 degrees and
  mirrored at random (a redshift does not depend on orientation); the cached encoder
  features are those of the stored orientation, as at inference.
* Every epoch ends with its state (trained weights, optimiser, best epoch so far,
  history) saved atomically, so a run killed at any point resumes after its last
  finished epoch with the same result as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cai import __version__
from cai import model as model_module
from cai.atomic import atomic_path, sha256_file, write_json
from cai.engine import usable_threads
from cai.errors import ConfigError, DataFormatError
from cai.formats import IMAGE_SHAPE, GalaxyFile, check_finite
from cai.metrics import FINETUNED_MARK, redshift_metrics
from cai.model import EMBED_DIM, AstroMAE, ModelConfig, create_model, save_checkpoint
from cai.split import SPLITS, Labels, Split, check_split_sizes, read_labels, read_split

_logger = logging.getLogger(__name__)

# The parts of AstroMAE that fine-tuning trains; the rest (patch embedding, class
# token, position embedding, blocks) is the frozen encoder.
TRAINED_MODULES = ("fc_norm", "head", "vit_block", "inception_model", "concat_block")
TRAIN, VALIDATION = SPLITS.index("train"), SPLITS.index("validation")
ENCODER_BATCH = 256  # galaxies per encoder pass when caching its features
EVAL_BATCH = 1024  # galaxies per pass when evaluating the validation split
COPY_BLOCK_ROWS = 4096  # rows per read when copying the training inputs
PROGRESS_FRACTION = 0.1  # log the feature cache's progress every 10 %
DIHEDRAL = 8  # orientations: 4 quarter turns, each mirrored or not
RECORD_FORMAT = "cai-finetune"
RECORD_VERSION = 1
STATE_FILE = "state.pt"
INPUTS_DIR = "inputs"
FEATURES_FILE = "features.npy"
KEY_FILE = "key.json"
STOP_REASONS = {
    "patience": "no better validation NMAD for {patience} epochs",
    "max_epochs": "finetune.max_epochs reached",
}


@dataclass(frozen=True)
class FinetuneSettings:
    """How to fine-tune (config section ``finetune``).

    Attributes:
        seed: Seed of the training order and augmentation (the split has its own).
        max_epochs: Most passes over the training split.
        patience: Epochs without a better validation NMAD before stopping.
        batch_size: Galaxies per optimiser step (at least 2, for batch norm).
        learning_rate: Peak learning rate of AdamW.
        weight_decay: AdamW's decoupled weight decay on weight matrices and kernels.
        warmup_epochs: Epochs of linear warm-up from 0 to the peak learning rate.
        final_lr_fraction: The cosine decay ends at this fraction of the peak.
        augment: Random quarter turns and mirror images for the Inception branch.
        average_decay: Decay per step of the moving average of the weights that is
            validated and kept (0: the weights as trained, no average).
        recentre: Shift the kept model's predictions by the median residual
            z_pred - z_true of the validation split (the NMAD that early stopping
            follows does not see a constant offset; the outlier fraction does).
        min_validation: Fewest validation galaxies accepted (see cai.split).
        threads: CPU threads of torch.
        device: ``cpu`` or ``cuda``.
    """

    seed: int = 0
    max_epochs: int = 20
    patience: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    final_lr_fraction: float = 0.01
    augment: bool = True
    average_decay: float = 0.99
    recentre: bool = True
    min_validation: int = 100
    threads: int = 2
    device: str = "cpu"

    def __post_init__(self) -> None:
        checks = {
            "max_epochs": self.max_epochs >= 1,
            "patience": self.patience >= 1,
            "batch_size": self.batch_size >= 2,
            "learning_rate": self.learning_rate > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup_epochs": self.warmup_epochs >= 0,
            "final_lr_fraction": 0 <= self.final_lr_fraction <= 1,
            "average_decay": 0 <= self.average_decay < 1,
            "min_validation": self.min_validation >= 1,
            "threads": self.threads >= 1,
            "device": self.device in ("cpu", "cuda"),
        }
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                "finetune: "
                + ", ".join(f"{key} = {getattr(self, key)!r}" for key in bad)
                + " out of range (see config/config.yaml, section finetune)"
            )

    def trajectory(self) -> dict[str, Any]:
        """The settings that decide the trained weights (not threads or device)."""
        fields = dataclasses.asdict(self)
        for key in ("threads", "device", "min_validation"):
            fields.pop(key)
        return fields


# --------------------------------------------------------------------------------------
# Standardisation, folded into the model
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Standardisation:
    """Scales of the inputs and target while training, and their exact folding into
    the first magnitude layer, the first image convolution and the last layer.

    Attributes:
        magnitude_mean, magnitude_std: per band, of the training split.
        image_scale: per band, the spread of the training split's pixels.
        redshift_mean, redshift_std: of the training split.
    """

    magnitude_mean: tuple[float, ...]
    magnitude_std: tuple[float, ...]
    image_scale: tuple[float, ...]
    redshift_mean: float
    redshift_std: float

    @classmethod
    def fit(
        cls,
        images: np.ndarray,
        magnitudes: np.ndarray,
        redshift: np.ndarray,
        rows: np.ndarray,
    ) -> Standardisation:
        """Scales of the galaxies ``rows`` (a constant quantity keeps scale 1)."""
        bands = images.shape[1]
        sums = np.zeros(bands)
        squares = np.zeros(bands)
        for start in range(0, len(rows), COPY_BLOCK_ROWS):
            block = np.asarray(images[np.sort(rows[start : start + COPY_BLOCK_ROWS])])
            block = block.astype(np.float64)
            sums += block.sum(axis=(0, 2, 3))
            squares += (block**2).sum(axis=(0, 2, 3))
        pixels = len(rows) * images.shape[2] * images.shape[3]
        pixel_std = np.sqrt(np.maximum(squares / pixels - (sums / pixels) ** 2, 0.0))
        mags = magnitudes[rows].astype(np.float64)
        z = redshift[rows].astype(np.float64)

        def spread(values: np.ndarray) -> np.ndarray:
            return np.where(values > 0, values, 1.0)

        return cls(
            magnitude_mean=tuple(mags.mean(axis=0).tolist()),
            magnitude_std=tuple(spread(mags.std(axis=0)).tolist()),
            image_scale=tuple(spread(pixel_std).tolist()),
            redshift_mean=float(z.mean()),
            redshift_std=float(spread(np.array([z.std()]))[0]),
        )

    def _tensors(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        def tensor(values: Sequence[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        return (
            tensor(self.magnitude_mean),
            tensor(self.magnitude_std),
            tensor(self.image_scale),
        )

    def inputs(
        self, image: torch.Tensor, magnitudes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised image and magnitudes of a batch."""
        mean, std, scale = self._tensors(image.device)
        return image / scale[None, :, None, None], (magnitudes - mean) / std

    def target(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.redshift_mean) / self.redshift_std

    def redshift(self, standardised: torch.Tensor) -> torch.Tensor:
        return standardised * self.redshift_std + self.redshift_mean

    @staticmethod
    def _layers(model: AstroMAE) -> tuple[nn.Linear, nn.Conv2d, nn.Linear]:
        branch = model.inception_model
        return branch.magnitude_block[0], branch.conv2d_init, model.concat_block[-1]

    @torch.no_grad()
    def unfold(self, model: AstroMAE) -> None:
        """Rewrite a raw-input model's layers, in place, to take standardised inputs
        and predict the standardised redshift, with identical predictions."""
        magnitude, image, last = self._layers(model)
        mean, std, scale = self._tensors(magnitude.weight.device)
        magnitude.bias += magnitude.weight @ mean
        magnitude.weight *= std[None, :]
        image.weight *= scale[None, :, None, None]
        last.weight /= self.redshift_std
        last.bias -= self.redshift_mean
        last.bias /= self.redshift_std

    @torch.no_grad()
    def fold(self, model: AstroMAE) -> None:
        """The inverse of :meth:`unfold`: a model that takes raw inputs and predicts z."""
        magnitude, image, last = self._layers(model)
        mean, std, scale = self._tensors(magnitude.weight.device)
        magnitude.weight /= std[None, :]
        magnitude.bias -= magnitude.weight @ mean
        image.weight /= scale[None, :, None, None]
        last.weight *= self.redshift_std
        last.bias *= self.redshift_std
        last.bias += self.redshift_mean


# --------------------------------------------------------------------------------------
# Inputs and the encoder cache
# --------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """The train and validation galaxies, copied once into the work folder.

    Attributes:
        images, magnitudes, redshift: memory-mapped arrays, one row per galaxy.
        features: [rows, 192] the frozen encoder's pooled tokens of each galaxy.
        train, validation: row indices of each split.
    """

    images: np.ndarray
    magnitudes: np.ndarray
    redshift: np.ndarray
    features: np.ndarray
    train: np.ndarray
    validation: np.ndarray

    def batch(self, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Image, magnitudes, encoder features and redshift of ``rows`` (sorted)."""
        return tuple(
            torch.from_numpy(np.ascontiguousarray(array[rows])).to(device)
            for array in (self.images, self.magnitudes, self.features, self.redshift)
        )


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _read_key(folder: Path) -> str | None:
    try:
        return json.loads((folder / KEY_FILE).read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def _stage_inputs(
    files: Sequence[str | os.PathLike],
    codes: Sequence[np.ndarray],
    folder: Path,
    key: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Copy the train and validation galaxies of ``files`` into ``folder`` (unless a
    copy with ``key`` is there); return images, magnitudes, redshift, split codes
    (memory-mapped) and the seconds the copy took."""
    tick = time.perf_counter()
    if _read_key(folder) != key:
        rows = sum(int((c != SPLITS.index("test")).sum()) for c in codes)
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)

        def array(name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
            return np.lib.format.open_memmap(
                partial / f"{name}.npy", mode="w+", dtype=dtype, shape=(rows, *shape)
            )

        out = {
            "images": array("images", IMAGE_SHAPE, "float32"),
            "magnitudes": array("magnitudes", (IMAGE_SHAPE[0],), "float32"),
            "redshift": array("redshift", (), "float32"),
            "split": array("split", (), "int8"),
        }
        filled = 0
        for path, file_codes in zip(files, codes, strict=True):
            with GalaxyFile(path) as galaxies:
                for start, batch in galaxies.iter_batches(COPY_BLOCK_ROWS):
                    check_finite(batch, str(path), first_row=start)
                    block = file_codes[start : start + len(batch)]
                    keep = block != SPLITS.index("test")
                    stop = filled + int(keep.sum())
                    out["images"][filled:stop] = batch.image[keep]
                    out["magnitudes"][filled:stop] = batch.magnitudes[keep]
                    out["redshift"][filled:stop] = batch.redshift[keep]
                    out["split"][filled:stop] = block[keep]
                    filled = stop
        for mapped in out.values():
            mapped.flush()
        del out
        (partial / KEY_FILE).write_text(json.dumps({"key": key, "rows": rows}))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
        _logger.info(
            "training inputs: %s train and validation galaxies copied in %.1f s "
            "(%.1f MB) -> %s",
            f"{rows:,}",
            time.perf_counter() - tick,
            sum(f.stat().st_size for f in folder.glob("*.npy")) / 1e6,
            folder,
        )
    arrays = tuple(
        np.load(folder / f"{name}.npy", mmap_mode="r")
        for name in ("images", "magnitudes", "redshift", "split")
    )
    return (*arrays, time.perf_counter() - tick)


@torch.no_grad()
def encoder_features(
    model: AstroMAE,
    images: np.ndarray,
    device: torch.device,
    batch_size: int = ENCODER_BATCH,
) -> np.ndarray:
    """[n, 192] float32 pooled patch tokens of the frozen encoder (``forward_encoder``)
    for every image, in batches; progress is logged every 10 %."""
    model.eval()
    out = np.empty((len(images), EMBED_DIM), dtype=np.float32)
    tick = time.perf_counter()
    step = max(1, math.ceil(PROGRESS_FRACTION * len(images)))
    next_report = step
    for start in range(0, len(images), batch_size):
        stop = min(len(images), start + batch_size)
        image = torch.from_numpy(np.array(images[start:stop])).to(device)
        out[start:stop] = model.forward_encoder(image).float().cpu().numpy()
        if next_report <= stop < len(images):
            _logger.info(
                "encoder features: %s of %s galaxies, %.1f s",
                f"{stop:,}",
                f"{len(images):,}",
                time.perf_counter() - tick,
            )
            next_report += step * math.ceil((stop - next_report + 1) / step)
    return out


def _cached_features(
    model: AstroMAE, images: np.ndarray, folder: Path, key: str, device: torch.device
) -> tuple[np.ndarray, float, bool]:
    """The encoder features of ``images``, from ``folder`` when cached under ``key``;
    returns them, the seconds spent and whether they came from the cache."""
    tick = time.perf_counter()
    path = folder / FEATURES_FILE
    if _read_key(folder) == key and path.exists():
        features = np.load(path, mmap_mode="r")
        if features.shape == (len(images), EMBED_DIM):
            _logger.info(
                "encoder features: %s galaxies from the cache %s",
                f"{len(images):,}",
                path,
            )
            return features, time.perf_counter() - tick, True
    features = encoder_features(model, images, device)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / KEY_FILE).unlink(missing_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, features)
    (folder / KEY_FILE).write_text(json.dumps({"key": key}))
    seconds = time.perf_counter() - tick
    _logger.info(
        "encoder features: %s galaxies in %.1f s (%.1f galaxies/s), computed once and "
        "cached -> %s (%.1f MB)",
        f"{len(images):,}",
        seconds,
        len(images) / seconds if seconds else float("inf"),
        path,
        path.stat().st_size / 1e6,
    )
    return np.load(path, mmap_mode="r"), seconds, False


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def trained_parameters(model: AstroMAE) -> list[nn.Parameter]:
    """The parameters fine-tuning trains (the shared Inception stem once)."""
    seen: dict[int, nn.Parameter] = {}
    for name in TRAINED_MODULES:
        for parameter in getattr(model, name).parameters():
            seen.setdefault(id(parameter), parameter)
    return list(seen.values())


def _head_state(model: AstroMAE) -> dict[str, torch.Tensor]:
    """Trained weights and batch-norm statistics, copied (for the best epoch and the
    saved state)."""
    return {
        key: value.detach().clone()
        for key, value in model.state_dict().items()
        if key.split(".", 1)[0] in TRAINED_MODULES
    }


class WeightAverage:
    """A moving average of the trained weights and batch-norm statistics, updated after
    every step (Polyak averaging, with the usual warm-up of the decay): it smooths out
    the last steps' noise, and it is what is validated and kept.

    Args:
        model: The model in training; its trained tensors are read in place.
        decay: Weight of the average against each new step, at most.
        state: A saved average (and ``steps`` its age) to go on from.
    """

    def __init__(
        self,
        model: AstroMAE,
        decay: float,
        state: dict[str, torch.Tensor] | None = None,
        steps: int = 0,
    ):
        self.decay, self.steps = decay, steps
        self.live = {
            key: value
            for key, value in model.state_dict().items()
            if key.split(".", 1)[0] in TRAINED_MODULES
        }
        if state is None:
            state = _head_state(model)
        self.state = {
            key: state[key].to(live.device) for key, live in self.live.items()
        }

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for key, live in self.live.items():
            average = self.state[key]
            if average.is_floating_point():
                average.lerp_(live, 1.0 - decay)
            else:
                average.copy_(live)

    @contextlib.contextmanager
    def applied(self, model: AstroMAE) -> Iterator[None]:
        """Within the block, the model holds the averaged weights."""
        trained = _head_state(model)
        model.load_state_dict(self.state, strict=False)
        try:
            yield
        finally:
            model.load_state_dict(trained, strict=False)


def _dihedral(images: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Each image turned by ``code % 4`` quarter turns, then mirrored if code >= 4."""
    out = torch.empty_like(images)
    for code in range(DIHEDRAL):
        rows = (codes == code).nonzero().squeeze(1)
        if len(rows):
            turned = torch.rot90(images[rows], code % 4, dims=(2, 3))
            out[rows] = turned.flip(3) if code >= 4 else turned
    return out


def _learning_rate(
    settings: FinetuneSettings, step: int, steps_per_epoch: int
) -> float:
    """Linear warm-up to the peak, then cosine decay to final_lr_fraction of it."""
    peak = settings.learning_rate
    warmup = settings.warmup_epochs * steps_per_epoch
    if step < warmup:
        return peak * (step + 1) / warmup
    total = settings.max_epochs * steps_per_epoch
    progress = min(1.0, (step - warmup) / max(1.0, total - warmup - 1))
    floor = peak * settings.final_lr_fraction
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's order and augmentation: the same on a resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


@torch.no_grad()
def _predict(
    model: AstroMAE,
    data: TrainingData,
    rows: np.ndarray,
    scaling: Standardisation,
    device: torch.device,
) -> np.ndarray:
    """Redshifts the model in training form predicts for ``rows`` (eval mode)."""
    model.eval()
    out = []
    for start in range(0, len(rows), EVAL_BATCH):
        image, mags, features, _ = data.batch(rows[start : start + EVAL_BATCH], device)
        image, mags = scaling.inputs(image, mags)
        image = image.contiguous(memory_format=torch.channels_last)
        standardised = model.forward_head(model.fc_norm(features), image, mags)
        out.append(scaling.redshift(standardised).float().cpu().numpy())
    for name in TRAINED_MODULES:
        getattr(model, name).train()
    return np.concatenate(out) if out else np.empty(0, np.float32)


def _evaluate(
    model: AstroMAE,
    data: TrainingData,
    scaling: Standardisation,
    device: torch.device,
) -> dict[str, float]:
    """Validation loss (MSE of z), NMAD, outlier fraction and bias."""
    z_pred = _predict(model, data, data.validation, scaling, device)
    z_true = np.asarray(data.redshift[data.validation], dtype=np.float64)
    metrics = redshift_metrics(z_pred, z_true)
    return {
        "validation_loss": metrics["mse"],
        "validation_nmad": metrics["nmad"],
        "validation_outlier_fraction": metrics["outlier_fraction"],
        "validation_bias": metrics["bias"],
    }


@torch.no_grad()
def _recentre(
    model: AstroMAE,
    data: TrainingData,
    scaling: Standardisation,
    device: torch.device,
) -> float:
    """Remove the median validation residual (z_pred - z_true) from the model's
    predictions through the last layer's bias, in place; returns the shift in z."""
    z_pred = _predict(model, data, data.validation, scaling, device)
    residual = z_pred - np.asarray(data.redshift[data.validation], dtype=np.float64)
    shift = float(np.median(residual))
    model.concat_block[-1].bias -= shift / scaling.redshift_std
    return shift


def _train_epoch(
    model: AstroMAE,
    optimizer: torch.optim.Optimizer,
    data: TrainingData,
    scaling: Standardisation,
    settings: FinetuneSettings,
    epoch: int,
    device: torch.device,
    average: WeightAverage | None = None,
) -> float:
    """One pass over the training split in a seeded order (updating ``average`` after
    every step); returns its mean loss (MSE of z, over the galaxies stepped on)."""
    generator = _epoch_generator(settings.seed, epoch)
    order = data.train[torch.randperm(len(data.train), generator=generator).numpy()]
    steps = math.ceil(len(order) / settings.batch_size)
    total, seen = 0.0, 0
    for number in range(steps):
        rows = np.sort(order[number * settings.batch_size :][: settings.batch_size])
        turns = torch.randint(DIHEDRAL, (len(rows),), generator=generator)
        if len(rows) < 2:  # batch norm needs two galaxies
            continue
        image, mags, features, z = data.batch(rows, device)
        image, mags = scaling.inputs(image, mags)
        if settings.augment:
            image = _dihedral(image, turns.to(device))
        image = image.contiguous(memory_format=torch.channels_last)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(settings, (epoch - 1) * steps + number, steps)
        predicted = model.forward_head(model.fc_norm(features), image, mags)
        loss = nn.functional.mse_loss(predicted, scaling.target(z))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if average is not None:
            average.update()
        total += loss.item() * len(rows)
        seen += len(rows)
    return total / max(seen, 1) * scaling.redshift_std**2


def _optimizer(model: AstroMAE, settings: FinetuneSettings) -> torch.optim.AdamW:
    """AdamW over the trained parameters; weight decay on matrices and kernels only."""
    parameters = trained_parameters(model)
    return torch.optim.AdamW(
        [
            {"params": [p for p in parameters if p.ndim > 1]},
            {"params": [p for p in parameters if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=settings.learning_rate,
        weight_decay=settings.weight_decay,
    )


def _save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path, key: str) -> dict[str, Any] | None:
    """The saved training state if it belongs to this training (``key``), else None."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: start again, say so
        _logger.warning(
            "%s: unreadable (%s); fine-tuning starts again from epoch 1", path, err
        )
        return None
    if state.get("key") != key:
        _logger.warning(
            "%s: saved by a fine-tuning with other data or settings; it is not resumed "
            "and fine-tuning starts again from epoch 1",
            path,
        )
        return None
    return state


def _encoder_identity(
    checkpoint: str | os.PathLike | None, seed: int, config: ModelConfig
) -> dict[str, Any]:
    """What the frozen encoder is, for the caches' keys and the record: its weights
    (checkpoint or seed) and shape, and the code that computes it (cai's version and
    the model module's sha256), so a changed model never reuses stale features."""
    shape = {
        "depth": config.depth,
        "num_heads": config.num_heads,
        "cai": __version__,
        "model_code": sha256_file(model_module.__file__),
    }
    if checkpoint is None:
        return {"source": "seeded", "seed": seed, "torch": torch.__version__, **shape}
    return {
        "source": "checkpoint",
        "path": str(checkpoint),
        "sha256": sha256_file(checkpoint),
        **shape,
    }


def _split_codes(
    galaxy_files: Sequence[str | os.PathLike],
    split_path: str | os.PathLike,
    min_validation: int,
) -> tuple[Labels, Split, list[np.ndarray], dict[str, int]]:
    """The labelled galaxies, the split, each file's split codes and the counts,
    checked: every galaxy labelled and in the split, the validation part big enough."""
    split = read_split(split_path)
    labels = read_labels(galaxy_files)
    codes, start = [], 0
    for entry in labels.files:
        ids = labels.object_id[start : start + entry["rows"]]
        codes.append(split.codes_of(ids, entry["path"]))
        start += entry["rows"]
    every = np.concatenate(codes)
    counts = {name: int((every == i).sum()) for i, name in enumerate(SPLITS)}
    check_split_sizes(counts, split.meta["fractions"], min_validation)
    return labels, split, codes, counts


def training_form(model: AstroMAE, scaling: Standardisation) -> None:
    """The model as it trains, in place: the encoder frozen, the rest trainable on
    standardised inputs, the Inception branch channels-last (its convolutions run
    faster so) and in train mode."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    scaling.unfold(model)
    for parameter in trained_parameters(model):
        parameter.requires_grad_(True)
    model.inception_model.to(memory_format=torch.channels_last)
    for name in TRAINED_MODULES:
        getattr(model, name).train()


@dataclass
class _Training:
    """What one fine-tuning works with."""

    model: AstroMAE
    optimizer: torch.optim.Optimizer
    data: TrainingData
    scaling: Standardisation
    settings: FinetuneSettings
    device: torch.device
    state_path: Path
    key: str  # of the data, encoder, settings and scaling: a saved state must match

    def evaluate(self) -> dict[str, float]:
        return _evaluate(self.model, self.data, self.scaling, self.device)


@dataclass
class _Progress:
    """Where a fine-tuning stands: saved after every epoch, restored on a resume."""

    history: list[dict[str, Any]]
    best: dict[str, Any]
    first_epoch: int
    resumed_from: int | None
    elapsed_s: float
    average: WeightAverage | None


def _start_or_resume(run: _Training) -> _Progress:
    """A fresh start (with the validation of the untrained head as epoch 0), or the
    saved state of this training loaded into the model and optimiser."""
    model, settings = run.model, run.settings
    state = _load_state(run.state_path, run.key)
    if state is None:
        before = {"epoch": 0, "train_loss": None, **run.evaluate()}
        average = None
        if settings.average_decay:
            average = WeightAverage(model, settings.average_decay)
        best = {
            "epoch": 0,
            "nmad": before["validation_nmad"],
            "model": _head_state(model),
        }
        return _Progress([before], best, 1, None, 0.0, average)
    model.load_state_dict(state["model"], strict=False)
    run.optimizer.load_state_dict(state["optimizer"])
    average = None
    if settings.average_decay:
        average = WeightAverage(
            model, settings.average_decay, state["average"], state["average_steps"]
        )
    progress = _Progress(
        history=list(state["history"]),
        best=dict(state["best"]),
        first_epoch=int(state["epoch"]) + 1,
        resumed_from=int(state["epoch"]),
        elapsed_s=float(state["elapsed_s"]),
        average=average,
    )
    _logger.info(
        "resuming after epoch %d of %d (best validation NMAD %.4f at epoch %d) from %s",
        progress.resumed_from,
        settings.max_epochs,
        progress.best["nmad"],
        progress.best["epoch"],
        run.state_path,
    )
    return progress


def _train(run: _Training, progress: _Progress) -> str:
    """Epochs until max_epochs or patience runs out, each one validated, logged and
    saved; returns why training stopped (a key of STOP_REASONS)."""
    model, settings, average = run.model, run.settings, progress.average
    for epoch in range(progress.first_epoch, settings.max_epochs + 1):
        if epoch - progress.best["epoch"] > settings.patience:
            return "patience"
        tick = time.perf_counter()
        train_loss = _train_epoch(
            model,
            run.optimizer,
            run.data,
            run.scaling,
            settings,
            epoch,
            run.device,
            average,
        )
        train_s = time.perf_counter() - tick
        tock = time.perf_counter()
        # What is validated, and kept when best: the averaged weights, if averaging.
        with average.applied(model) if average else contextlib.nullcontext():
            validation = run.evaluate()
            validated = _head_state(model)
        entry = {
            "epoch": epoch,
            "train_loss": train_loss,
            **validation,
            "learning_rate": run.optimizer.param_groups[0]["lr"],
            "train_s": train_s,
            "validation_s": time.perf_counter() - tock,
            "train_galaxies_per_s": len(run.data.train) / train_s,
        }
        progress.history.append(entry)
        best = progress.best
        if validation["validation_nmad"] < best["nmad"]:
            best = {
                "epoch": epoch,
                "nmad": entry["validation_nmad"],
                "model": validated,
            }
            progress.best = best
        progress.elapsed_s += time.perf_counter() - tick
        saved = {
            "key": run.key,
            "epoch": epoch,
            "model": _head_state(model),
            "optimizer": run.optimizer.state_dict(),
            "best": best,
            "history": progress.history,
            "elapsed_s": progress.elapsed_s,
        }
        if average:
            saved.update(average=average.state, average_steps=average.steps)
        _save_state(run.state_path, saved)
        _logger.info(
            "epoch %d/%d: train loss %.3e, validation loss %.3e, NMAD %.4f, outliers "
            "%.1f%% (best %.4f at epoch %d), lr %.1e, %.1f s (%.0f galaxies/s)",
            epoch,
            settings.max_epochs,
            train_loss,
            entry["validation_loss"],
            entry["validation_nmad"],
            100 * entry["validation_outlier_fraction"],
            best["nmad"],
            best["epoch"],
            entry["learning_rate"],
            train_s + entry["validation_s"],
            entry["train_galaxies_per_s"],
        )
    return "max_epochs"


def finetune(
    galaxy_files: Sequence[str | os.PathLike],
    split_path: str | os.PathLike,
    out: str | os.PathLike,
    record_path: str | os.PathLike,
    settings: FinetuneSettings | None = None,
    model_config: ModelConfig | None = None,
    checkpoint: str | os.PathLike | None = None,
    model_seed: int = 0,
    work_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Fine-tune AstroMAE on the labelled galaxies of ``galaxy_files``.

    Args:
        galaxy_files: CAI galaxy files (a data set or its partitions), all labelled.
        split_path: The split table of those galaxies (``cai split``).
        out: The safetensors checkpoint to write (the best validation epoch).
        record_path: The training record (JSON) to write beside it.
        settings: How to train.
        model_config: Depth and heads of the model.
        checkpoint: Where the frozen encoder (and the starting head) come from; None:
            seeded untrained weights (``model_seed``), which the record says.
        model_seed: Seed of those weights.
        work_dir: Folder for the copied inputs, the encoder cache and the per-epoch
            state (default: ``<out>.work``); the cache is kept for later runs.

    Returns:
        The training record.
    """
    started = time.perf_counter()
    settings = settings or FinetuneSettings()
    model_config = model_config or ModelConfig()
    out, record_path = Path(out), Path(record_path)
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".work")
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "finetune.device is 'cuda' but torch sees no CUDA device; use device: cpu"
        )
    device = torch.device(settings.device)
    threads = usable_threads(settings.threads)
    torch.set_num_threads(threads)
    labels, split, codes, counts = _split_codes(
        galaxy_files, split_path, settings.min_validation
    )

    model, encoder = create_model(
        model_config, checkpoint, model_seed, warn_untrained=False
    )
    if checkpoint is None:
        _logger.warning(
            "frozen encoder: untrained weights (seed %d), as no pretrained AstroMAE "
            "is given; the images still reach the trained head through the Inception "
            "branch, but the encoder's features are random projections: set "
            "model.checkpoint to a pretrained AstroMAE for the paper's set-up",
            model_seed,
        )
    identity = _encoder_identity(checkpoint, model_seed, model_config)
    inputs_key = _digest(
        {
            "files": [sha256_file(path) for path in galaxy_files],
            "split": sha256_file(split_path),
        }
    )
    images, magnitudes, redshift, split_codes, inputs_s = _stage_inputs(
        galaxy_files, codes, work / INPUTS_DIR, inputs_key
    )
    model.to(device)
    features_key = _digest({"inputs": inputs_key, "encoder": identity})
    features, features_s, features_cached = _cached_features(
        model, images, work, features_key, device
    )
    data = TrainingData(
        images=images,
        magnitudes=magnitudes,
        redshift=redshift,
        features=features,
        train=np.flatnonzero(split_codes == TRAIN),
        validation=np.flatnonzero(split_codes == VALIDATION),
    )
    scaling = Standardisation.fit(images, magnitudes, redshift, data.train)
    training_form(model, scaling)
    optimizer = _optimizer(model, settings)
    n_trained = sum(p.numel() for p in trained_parameters(model))
    n_frozen = sum(p.numel() for p in model.parameters()) - n_trained
    key = _digest(
        {
            "features": features_key,
            "settings": settings.trajectory(),
            "scaling": dataclasses.asdict(scaling),
        }
    )
    state_path = work / STATE_FILE
    run = _Training(model, optimizer, data, scaling, settings, device, state_path, key)
    progress = _start_or_resume(run)
    _logger.info(
        "fine-tuning: %s trained parameters (%s frozen in the encoder), %s train and "
        "%s validation galaxies, batch %d, AdamW lr %.1e, weight decay %g, weight "
        "average decay %g, up to %d epochs (patience %d), %d threads on %s; before "
        "training: validation loss %.3e, NMAD %.4f",
        f"{n_trained:,}",
        f"{n_frozen:,}",
        f"{len(data.train):,}",
        f"{len(data.validation):,}",
        settings.batch_size,
        settings.learning_rate,
        settings.weight_decay,
        settings.average_decay,
        settings.max_epochs,
        settings.patience,
        threads,
        settings.device,
        progress.history[0]["validation_loss"],
        progress.history[0]["validation_nmad"],
    )
    stopped = _train(run, progress)

    # The best epoch's weights, recentred on the validation split, folded back into a
    # plain AstroMAE.
    best, history = progress.best, progress.history
    model.load_state_dict(best["model"], strict=False)
    shift = _recentre(model, data, scaling, device) if settings.recentre else 0.0
    kept = run.evaluate()
    if settings.recentre:
        _logger.info(
            "recentred: predictions shifted by %+.4f in z (the median validation "
            "residual); validation bias %+.4f -> %+.4f, outliers %.1f%% -> %.1f%%",
            -shift,
            history[best["epoch"]]["validation_bias"],
            kept["validation_bias"],
            100 * history[best["epoch"]]["validation_outlier_fraction"],
            100 * kept["validation_outlier_fraction"],
        )
    scaling.fold(model)
    model.eval().requires_grad_(False)
    source = "synthetic " if labels.synthetic else ""
    weights = (
        f"{out.name}: {FINETUNED_MARK} {len(data.train):,} {source}galaxies "
        f"(epoch {best['epoch']}), frozen encoder "
        + (f"untrained (seed {model_seed})" if checkpoint is None else encoder)
    )
    trained = history[1:]
    record = {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "tool": f"cai {__version__}",
        "checkpoint": out.name,
        "weights": weights,
        "model": {"depth": model_config.depth, "num_heads": model_config.num_heads},
        "encoder": {**identity, "description": encoder},
        "trained_modules": list(TRAINED_MODULES),
        "trained_parameters": n_trained,
        "frozen_parameters": n_frozen,
        "data": {
            "files": labels.files,
            "synthetic": labels.synthetic,
            "split": {
                "path": str(split_path),
                "seed": split.meta["seed"],
                "fractions": split.meta["fractions"],
                "counts": counts,
            },
        },
        "settings": dataclasses.asdict(settings),
        "threads": threads,
        "standardisation": dataclasses.asdict(scaling),
        "epochs_run": len(trained),
        "best_epoch": best["epoch"],
        "best_validation": {
            k: v for k, v in history[best["epoch"]].items() if "validation" in k
        },
        "recentre_shift": -shift,
        "validation": kept,
        "before_training": {k: v for k, v in history[0].items() if "validation" in k},
        "stopped": stopped,
        "resumed_after_epoch": progress.resumed_from,
        "timing": {
            "inputs_s": inputs_s,
            "features_s": features_s,
            "features_from_cache": features_cached,
            "train_s": sum(h["train_s"] for h in trained),
            "train_galaxies_per_s": (
                float(np.median([h["train_galaxies_per_s"] for h in trained]))
                if trained
                else None
            ),
            "wall_s": time.perf_counter() - started,
        },
        "history": history,
    }
    # The record first, the checkpoint last: a checkpoint in place has its record.
    write_json(record_path, record)
    save_checkpoint(
        model.to("cpu").to(memory_format=torch.contiguous_format),
        out,
        {"weights": weights, "finetune": json.dumps(record["data"]["split"])},
    )
    # The per-epoch state and the copied inputs have served; the encoder cache stays
    # for a later fine-tuning of the same galaxies with other settings.
    state_path.unlink(missing_ok=True)
    shutil.rmtree(work / INPUTS_DIR, ignore_errors=True)
    _logger.info(
        "fine-tuned in %.1f s: best validation NMAD %.4f at epoch %d of %d (%s; "
        "before training %.4f), %s -> %s",
        record["timing"]["wall_s"],
        best["nmad"],
        best["epoch"],
        len(trained),
        STOP_REASONS[stopped].format(patience=settings.patience),
        history[0]["validation_nmad"],
        weights,
        out,
    )
    return record


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """A training record written by :func:`finetune`."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise DataFormatError(
            f"{path}: not a readable training record ({err})"
        ) from None
    if record.get("format") != RECORD_FORMAT:
        raise DataFormatError(
            f"{path}: format {record.get('format')!r}; expected {RECORD_FORMAT!r}"
        )
    return record
