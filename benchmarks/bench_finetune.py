"""Fine-tuning throughput with and without the cached encoder features, in one run.

The frozen encoder's output for a galaxy never changes, so ``cai.finetune`` computes it
once per galaxy and an epoch runs only the trained layers. This benchmark trains the
same model on the same galaxies for the same epochs twice with the production training
loop (``cai.finetune._train_epoch``): once reading the cached features, once with the
features computed from the images at every step (what a loop without the cache does:
the encoder forward pass, without gradients, on each batch). It prints galaxies/s per
epoch of both, their ratio, and what the cache itself cost. Not a test: ratios measured
in one run on one machine.

    .venv/bin/python benchmarks/bench_finetune.py [--galaxies 1024] [--epochs 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cai.finetune import (
    FinetuneSettings,
    Standardisation,
    TrainingData,
    _optimizer,
    _train_epoch,
    encoder_features,
    training_form,
)
from cai.model import ModelConfig, create_model
from cai.sky import simulate_chunk


class EncoderOnTheFly:
    """Stands in for the cached features: indexing runs the frozen encoder (the same
    seeded weights as the trainee's) on the images of those rows, as training without
    a cache must at every step."""

    def __init__(self, model: torch.nn.Module, images: np.ndarray):
        self.model, self.images = model, images
        self.shape = (len(images), 192)

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            image = torch.from_numpy(np.ascontiguousarray(self.images[rows]))
            return self.model.forward_encoder(image).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--galaxies", type=int, default=1024, help="training galaxies")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each variant")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = simulate_chunk(args.galaxies, 2024, 0, 1)
    rows = np.arange(args.galaxies)
    settings = FinetuneSettings(max_epochs=args.epochs, threads=args.threads)
    scaling = Standardisation.fit(batch.image, batch.magnitudes, batch.redshift, rows)

    print(
        f"fine-tuning AstroMAE (depth 12, encoder frozen), {args.galaxies:,} galaxies, "
        f"batch {settings.batch_size}, {args.epochs} epochs per variant, "
        f"{args.threads} threads"
    )
    model, _ = create_model(ModelConfig(), None, 0, warn_untrained=False)
    tick = time.perf_counter()
    features = encoder_features(model, batch.image, torch.device("cpu"))
    cache_s = time.perf_counter() - tick
    print(
        f"  encoder cache, computed once: {cache_s:.1f} s "
        f"({args.galaxies / cache_s:.1f} galaxies/s)"
    )

    rates = {}
    for variant, source in (
        ("cached features", features),
        ("encoder every step", EncoderOnTheFly(model, batch.image)),
    ):
        trainee, _ = create_model(ModelConfig(), None, 0, warn_untrained=False)
        training_form(trainee, scaling)
        data = TrainingData(
            images=batch.image,
            magnitudes=batch.magnitudes,
            redshift=batch.redshift,
            features=source,
            train=rows,
            validation=rows[:0],
        )
        optimizer = _optimizer(trainee, settings)
        epoch_rates = []
        for epoch in range(1, args.epochs + 1):
            tick = time.perf_counter()
            _train_epoch(
                trainee, optimizer, data, scaling, settings, epoch, torch.device("cpu")
            )
            epoch_rates.append(args.galaxies / (time.perf_counter() - tick))
        rates[variant] = float(np.median(epoch_rates))
        print(
            f"  {variant:>18}: {rates[variant]:7.1f} galaxies/s per epoch "
            f"(epochs: {', '.join(f'{r:.1f}' for r in epoch_rates)})"
        )
    ratio = rates["cached features"] / rates["encoder every step"]
    epochs_to_pay = cache_s / (
        args.galaxies / rates["encoder every step"]
        - args.galaxies / rates["cached features"]
    )
    print(
        f"  cached / every step: {ratio:.2f}x the galaxies/s; the cache costs "
        f"{cache_s:.1f} s, repaid after {epochs_to_pay:.2f} epochs"
    )


if __name__ == "__main__":
    main()
