"""Lower-precision inference (bf16, int8) and the accuracy gate that decides its use.

In fp32, AstroMAE at batch 512 already runs near a CPU's fp32 matrix-multiply rate
(about 1.24 GFLOP a galaxy, 57% of the time in convolutions, 19% in linear layers), so
what is left to gain is in lower precision:

* ``bf16``: weights converted to bfloat16 and activations in bfloat16 (channels-last
  memory for the convolutions). CPUs with AVX-512 BF16 (and AMX) run these through
  oneDNN at about twice the fp32 rate; outputs are returned as fp32.
* ``int8``: static post-training quantization with PyTorch's FX graph mode on the
  ``x86`` backend: every convolution and linear layer (batch norms folded in) with
  int8 weights (per channel) and int8 activations whose ranges are calibrated on a
  fixed set of synthetic galaxies (:data:`CALIBRATION_SEED`), so every job of a run
  quantizes the same way. CPU only.

Neither is free: :func:`gate` compares each precision's predictions with fp32's on
labelled galaxies with the same weights (max and p99 |delta z_pred|, the change in
NMAD and in outlier fraction) and marks a precision failing when its NMAD moves by more
than ``max_nmad_change`` of fp32's or any prediction by more than ``max_abs_dz``.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cai.errors import ConfigError
from cai.metrics import redshift_metrics
from cai.model import ModelConfig

_logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8")
CALIBRATION_SEED = 20_260_000  # synthetic galaxies that calibrate int8 activations
CALIBRATION_GALAXIES = 256
CALIBRATION_BATCH = 128
WARMUP_GALAXIES = 32  # untimed galaxies each precision predicts before it is timed
QUANTIZED_ENGINE = "x86"  # fbgemm + oneDNN kernels of PyTorch's x86 backend


def input_dtype(precision: str) -> torch.dtype:
    """The dtype of the model's inputs at ``precision`` (int8 models take fp32)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def check_precision(precision: str, device: str) -> None:
    """Raise for an unknown precision or one the device cannot run."""
    if precision not in PRECISIONS:
        raise ConfigError(
            f"inference.precision is {precision!r}; expected one of {PRECISIONS}"
        )
    if precision == "int8" and device != "cpu":
        raise ConfigError(
            "inference.precision int8 runs on the CPU only (PyTorch's x86 quantized "
            "kernels); use bf16 on a GPU"
        )


def native_bf16() -> bool | None:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX); None when
    torch cannot tell. Without it oneDNN emulates bf16, slower than fp32."""
    try:
        return bool(
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        )
    except AttributeError:  # a torch without these probes
        return None


def calibration_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed synthetic galaxies that calibrate int8 activation ranges."""
    from cai.sky import simulate_chunk

    batch = simulate_chunk(CALIBRATION_GALAXIES, CALIBRATION_SEED, 0, 1)
    return torch.from_numpy(batch.image), torch.from_numpy(batch.magnitudes)


def quantize_int8(model: nn.Module) -> nn.Module:
    """An int8 copy of ``model``: FX static quantization, calibrated (see module doc)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if QUANTIZED_ENGINE not in torch.backends.quantized.supported_engines:
        raise ConfigError(
            f"this PyTorch build has no {QUANTIZED_ENGINE!r} quantized engine "
            f"(it has {torch.backends.quantized.supported_engines}); use bf16"
        )
    torch.backends.quantized.engine = QUANTIZED_ENGINE
    image, magnitudes = calibration_inputs()
    with warnings.catch_warnings():
        # torch.ao's eager/FX quantization warns that it moves to torchao; it is still
        # PyTorch's own CPU int8 path for convolutions.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        # torch.cat joins the class token with the patch tokens: quantized, its inputs
        # would need one scale (PyTorch warns of large errors otherwise); kept float.
        mapping = get_default_qconfig_mapping(QUANTIZED_ENGINE).set_object_type(
            torch.cat, None
        )
        prepared = prepare_fx(
            copy.deepcopy(model).eval(),
            mapping,
            example_inputs=(image[:2], magnitudes[:2]),
        )
        with torch.inference_mode():
            for start in range(0, len(image), CALIBRATION_BATCH):
                stop = start + CALIBRATION_BATCH
                prepared(image[start:stop], magnitudes[start:stop])
        return convert_fx(prepared)


def prepare_model(model: nn.Module, precision: str) -> nn.Module:
    """The model to run at ``precision`` (fp32: ``model`` itself)."""
    if precision == "fp32":
        return model
    tick = time.perf_counter()
    if precision == "bf16":
        prepared = copy.deepcopy(model).to(
            dtype=torch.bfloat16, memory_format=torch.channels_last
        )
    else:
        prepared = quantize_int8(model)
    _logger.info(
        "precision %s: model converted in %.2f s", precision, time.perf_counter() - tick
    )
    return prepared


def to_model_input(
    image: torch.Tensor, magnitudes: torch.Tensor, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast a batch to what the model at ``precision`` takes."""
    if precision != "bf16":
        return image, magnitudes
    image = image.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    return image, magnitudes.to(torch.bfloat16)


@dataclass(frozen=True)
class GateLimits:
    """Tolerances of the accuracy gate.

    Attributes:
        max_nmad_change: Largest |NMAD - NMAD_fp32| as a fraction of NMAD_fp32.
        max_abs_dz: Largest |z_pred - z_pred_fp32| of any galaxy.
    """

    max_nmad_change: float = 0.01
    max_abs_dz: float = 1e-3


def gate(
    predictions: Mapping[str, np.ndarray],
    z_true: np.ndarray,
    limits: GateLimits,
    rates: Mapping[str, float] | None = None,
) -> list[dict[str, object]]:
    """One row per precision: its accuracy and its change against fp32's predictions.

    ``predictions`` maps precision to z_pred of the same galaxies (fp32 required);
    ``rates`` optionally maps precision to galaxies/s for the speed-up column.
    """
    if "fp32" not in predictions:
        raise ValueError("the gate compares against fp32: its predictions are needed")
    reference = predictions["fp32"].astype(np.float64)
    base = redshift_metrics(reference, z_true)
    rows = []
    for precision, z_pred in predictions.items():
        delta = np.abs(z_pred.astype(np.float64) - reference)
        nonfinite = int((~np.isfinite(delta)).sum())  # e.g. an overflow in bf16
        delta[~np.isfinite(delta)] = np.inf
        values = redshift_metrics(z_pred, z_true)
        nmad_change = values["nmad"] - base["nmad"]
        relative = nmad_change / base["nmad"] if base["nmad"] else float("inf")
        reasons = [f"{nonfinite} non-finite predictions"] if nonfinite else []
        if not abs(relative) <= limits.max_nmad_change:  # NaN fails too
            reasons.append(
                f"NMAD moves {100 * relative:+.2f}%, more than "
                f"{100 * limits.max_nmad_change:g}%"
            )
        if delta.max() > limits.max_abs_dz:
            reasons.append(
                f"max |dz_pred| {delta.max():.2e}, more than {limits.max_abs_dz:g}"
            )
        row = {
            "precision": precision,
            "galaxies": len(z_pred),
            "max_abs_dz_pred": float(delta.max()),
            "p99_abs_dz_pred": float(np.percentile(delta, 99)),
            "nmad": values["nmad"],
            "nmad_change": nmad_change,
            "nmad_change_frac": relative if precision != "fp32" else 0.0,
            "outlier_fraction": values["outlier_fraction"],
            "outlier_change": values["outlier_fraction"] - base["outlier_fraction"],
            "passes": not reasons,
            "reason": "; ".join(reasons) or "within the gate",
        }
        if rates:
            row["samples_per_s"] = rates.get(precision, float("nan"))
            row["speedup_vs_fp32"] = rates.get(precision, float("nan")) / rates["fp32"]
        rows.append(row)
    return rows


def best_passing(rows: Sequence[Mapping[str, object]]) -> str:
    """The fastest precision that passes the gate (fp32 when none is timed)."""
    passing = [r for r in rows if r["passes"]]
    timed = [r for r in passing if r.get("samples_per_s") is not None]
    if not timed:
        return "fp32"
    return str(max(timed, key=lambda r: r["samples_per_s"])["precision"])


def run_gate(
    manifest: str | os.PathLike,
    precisions: Sequence[str],
    max_galaxies: int,
    batch_size: int,
    threads: int,
    limits: GateLimits,
    out_tsv: str | os.PathLike,
    model_config: ModelConfig | None = None,
    checkpoint: str | os.PathLike | None = None,
    seed: int = 0,
) -> list[dict[str, object]]:
    """Predict the first ``max_galaxies`` labelled galaxies of a partition set at each
    precision with the same weights; write the gate table (TSV) and return its rows."""
    import pandas as pd

    from cai.atomic import atomic_path
    from cai.engine import usable_threads
    from cai.formats import GalaxyFile
    from cai.model import create_model
    from cai.partition import read_manifest

    torch.set_num_threads(usable_threads(threads))
    images, magnitudes, z_true = [], [], []
    remaining = max_galaxies
    for entry in read_manifest(manifest)["partitions"]:
        if remaining <= 0:
            break
        with GalaxyFile(entry["path"]) as galaxies:
            batch = galaxies.read(0, min(remaining, len(galaxies)))
        images.append(batch.image)
        magnitudes.append(batch.magnitudes)
        z_true.append(batch.redshift)
        remaining -= len(batch)
    image = torch.from_numpy(np.concatenate(images))
    mags = torch.from_numpy(np.concatenate(magnitudes))
    truth = np.concatenate(z_true)
    if np.isnan(truth).any():
        raise ConfigError(
            f"{manifest}: {int(np.isnan(truth).sum())} of the gate's {len(truth)} "
            "galaxies have no redshift; the gate needs labelled galaxies"
        )
    model, weights = create_model(model_config, checkpoint, seed)
    if "bf16" in precisions and native_bf16() is False:
        _logger.warning(
            "this CPU has no native bf16 arithmetic (no AVX-512 BF16, no AMX): bf16 "
            "runs emulated and is expected slower than fp32 here; the gate measures it "
            "all the same (keep inference.precision fp32 on such machines)"
        )
    predictions, rates = {}, {}
    for precision in ["fp32", *[p for p in precisions if p != "fp32"]]:
        check_precision(precision, "cpu")
        prepared = prepare_model(model, precision)
        z_pred = np.empty(len(truth), dtype=np.float32)
        compute_s = 0.0
        with torch.inference_mode():
            # A few untimed galaxies first: thread start-up and first allocations
            # would otherwise weigh on whichever precision runs first. (A whole
            # batch would double the gate's time when it holds one batch.)
            warm = min(batch_size, WARMUP_GALAXIES)
            prepared(*to_model_input(image[:warm], mags[:warm], precision))
            for start in range(0, len(truth), batch_size):
                stop = start + batch_size
                inputs = to_model_input(image[start:stop], mags[start:stop], precision)
                tick = time.perf_counter()
                z_pred[start:stop] = prepared(*inputs).float().numpy()
                compute_s += time.perf_counter() - tick
        predictions[precision] = z_pred
        rates[precision] = len(truth) / compute_s
    rows = gate(predictions, truth, limits, rates)
    for row in rows:
        row["weights"] = weights
        _logger.info(
            "precision %s: %d galaxies at %.1f galaxies/s (%.2fx fp32), max |dz_pred| "
            "%.2e, p99 %.2e, NMAD %.4f (%+.2f%%), outliers %.2f%% (%+.2f points): %s",
            row["precision"],
            row["galaxies"],
            row["samples_per_s"],
            row["speedup_vs_fp32"],
            row["max_abs_dz_pred"],
            row["p99_abs_dz_pred"],
            row["nmad"],
            100 * row["nmad_change_frac"],
            100 * row["outlier_fraction"],
            100 * row["outlier_change"],
            "passes" if row["passes"] else "FAILS the gate",
        )
        if not row["passes"]:
            _logger.warning(
                "precision %s fails the accuracy gate (%s): its predictions differ "
                "from fp32 beyond the tolerance; keep inference.precision at a "
                "precision that passes (fastest passing here: %s) or widen "
                "precision_gate limits knowingly",
                row["precision"],
                row["reason"],
                best_passing(rows),
            )
    with atomic_path(out_tsv) as tmp:
        pd.DataFrame(rows).to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    return rows
