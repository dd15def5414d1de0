"""Validation metrics that reduce exactly across workers.

Each worker accumulates additive sufficient statistics (a confusion matrix, or error sums) in one
tensor; summing those tensors over ranks and then finishing gives the metrics of the whole
validation set, not an average of per-worker averages.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

RESIDUAL_SAMPLE_SIZE = 2000
"""At most this many (actual, predicted) pairs of the validation set go into evaluation.json."""


class ClassificationMeter:
    """Loss sum, row count and a confusion matrix (rows: true class, columns: predicted)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.state = torch.zeros(2 + num_classes * num_classes, dtype=torch.float64)

    def update(self, logits: torch.Tensor, target: torch.Tensor, loss_sum: float) -> None:
        predicted = logits.argmax(dim=-1).long().cpu()
        index = target.long().cpu() * self.num_classes + predicted
        counts = torch.bincount(index, minlength=self.num_classes**2).to(torch.float64)
        self.state[0] += loss_sum
        self.state[1] += target.numel()
        self.state[2:] += counts

    def compute(self) -> dict[str, float]:
        """loss, accuracy, and macro precision, recall and F1 (classes absent from both the
        labels and the predictions are left out of the macro averages)."""
        rows = self.state[1].item()
        if rows == 0:
            return {}
        confusion = self.state[2:].view(self.num_classes, self.num_classes)
        true_positive = confusion.diag()
        predicted = confusion.sum(dim=0)
        actual = confusion.sum(dim=1)
        present = (predicted + actual) > 0
        precision = torch.where(predicted > 0, true_positive / predicted.clamp(min=1), 0.0)
        recall = torch.where(actual > 0, true_positive / actual.clamp(min=1), 0.0)
        denom = precision + recall
        f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), 0.0)
        return {
            "loss": self.state[0].item() / rows,
            "accuracy": true_positive.sum().item() / rows,
            "precision": precision[present].mean().item(),
            "recall": recall[present].mean().item(),
            "f1": f1[present].mean().item(),
        }

    def evaluation(self, device: Any = None) -> dict[str, Any]:
        """The confusion matrix and per-class precision, recall, F1 and support (rows of that
        true class), by class index; the registry adds the class labels. Call after the state is
        reduced across workers."""
        rows = int(self.state[1].item())
        if rows == 0:
            return {}
        confusion = self.state[2:].view(self.num_classes, self.num_classes)
        true_positive = confusion.diag()
        predicted, actual = confusion.sum(dim=0), confusion.sum(dim=1)
        per_class = []
        for index in range(self.num_classes):
            tp, pred, act = (float(t[index]) for t in (true_positive, predicted, actual))
            precision = tp / pred if pred > 0 else 0.0
            recall = tp / act if act > 0 else 0.0
            both = precision + recall
            f1 = 2 * precision * recall / both if both > 0 else 0.0
            per_class.append(
                {"precision": precision, "recall": recall, "f1": f1, "support": int(act)}
            )
        return {
            "task": "classification",
            "rows": rows,
            "confusion_matrix": confusion.round().long().tolist(),
            "per_class": per_class,
        }


class RegressionMeter:
    """Error sums on the original label scale: MSE, MAE and R^2 over all rows."""

    def __init__(
        self,
        label_mean: float = 0.0,
        label_std: float = 1.0,
        *,
        sample_size: int = RESIDUAL_SAMPLE_SIZE,
        seed: int = 0,
    ) -> None:
        self.mean = label_mean
        self.std = label_std
        # loss_sum, n, sum_sq_err, sum_abs_err, sum_y, sum_y_sq
        self.state = torch.zeros(6, dtype=torch.float64)
        # A uniform reservoir of this worker's (actual, predicted) pairs (Vitter's algorithm R).
        self.sample_size = sample_size
        self.sample = torch.zeros(sample_size, 2, dtype=torch.float64)
        self.seen = 0
        self._generator = torch.Generator().manual_seed(seed)

    def update(self, prediction: torch.Tensor, target: torch.Tensor, loss_sum: float) -> None:
        pred = prediction.detach().double().cpu() * self.std + self.mean
        true = target.detach().double().cpu() * self.std + self.mean
        err = pred - true
        self.state += torch.tensor(
            [loss_sum, true.numel(), (err**2).sum(), err.abs().sum(), true.sum(), (true**2).sum()],
            dtype=torch.float64,
        )
        self._keep(torch.stack([true.reshape(-1), pred.reshape(-1)], dim=1))

    def _keep(self, pairs: torch.Tensor) -> None:
        """Reservoir-sample `pairs` (one row per validation row) into `self.sample`."""
        fill = max(0, min(self.sample_size - self.seen, len(pairs)))
        self.sample[self.seen : self.seen + fill] = pairs[:fill]
        rest = pairs[fill:]
        if len(rest):
            # Row i of the stream (0-based) replaces a uniform slot j in [0, i] when j < size.
            index = torch.arange(self.seen + fill, self.seen + len(pairs), dtype=torch.float64)
            draw = torch.rand(len(rest), generator=self._generator, dtype=torch.float64)
            slots = (draw * (index + 1)).long()
            for row in torch.nonzero(slots < self.sample_size).flatten().tolist():
                self.sample[slots[row]] = rest[row]  # in stream order: later rows win
        self.seen += len(pairs)

    def evaluation(self, device: Any = None) -> dict[str, Any]:
        """Error sums and a uniform sample of at most `sample_size` (actual, predicted) pairs
        over every worker's rows. A collective under torch.distributed: every rank calls it,
        after the state is reduced."""
        kept = torch.cat([self.sample, torch.tensor([[float(self.seen), 0.0]])])
        if dist.is_initialized():
            gathered = [torch.zeros_like(kept).to(device) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, kept.to(device))
            parts = [part.cpu() for part in gathered]
        else:
            parts = [kept]
        pairs = _merge_reservoirs(parts, self.sample_size, self._generator)
        _, rows, sse, sae, sum_y, sum_y2 = self.state.tolist()
        if rows == 0:
            return {}
        return {
            "task": "regression",
            "rows": int(rows),
            **{k: v for k, v in self.compute().items() if k != "loss"},
            "sums": {"squared_error": sse, "absolute_error": sae, "y": sum_y, "y_squared": sum_y2},
            "residual_sample": {
                "actual": pairs[:, 0].tolist(),
                "predicted": pairs[:, 1].tolist(),
            },
        }

    def compute(self) -> dict[str, float]:
        """loss (on the standardised target), mse, mae and r2 (on the original scale)."""
        loss_sum, rows, sse, sae, sum_y, sum_y2 = self.state.tolist()
        if rows == 0:
            return {}
        total_variance = sum_y2 - sum_y * sum_y / rows
        r2 = 1.0 - sse / total_variance if total_variance > 0 else 0.0
        return {"loss": loss_sum / rows, "mse": sse / rows, "mae": sae / rows, "r2": r2}


def _merge_reservoirs(
    parts: list[torch.Tensor], size: int, generator: torch.Generator
) -> torch.Tensor:
    """One uniform sample of at most `size` pairs from per-worker reservoirs (each a
    `(size + 1, 2)` tensor whose last row holds the worker's row count): every worker gives a
    share proportional to the rows it saw, picked at random from its reservoir."""
    seen = [int(part[-1, 0].item()) for part in parts]
    total = sum(seen)
    if total == 0:
        return torch.zeros(0, 2, dtype=torch.float64)
    want = min(size, total)
    shares = [min(n, size, math.floor(want * n / total)) for n in seen]
    for index in sorted(range(len(parts)), key=lambda i: -seen[i]):  # rounding leftovers
        if sum(shares) >= want:
            break
        shares[index] += min(want - sum(shares), min(seen[index], size) - shares[index])
    picked = []
    for part, n, share in zip(parts, seen, shares, strict=True):
        held = part[: min(n, size)]
        order = torch.randperm(len(held), generator=generator)[:share]
        picked.append(held[order.sort().values])
    return torch.cat(picked)


class LanguageModelMeter:
    """Summed next-token cross-entropy and target-token count: loss per token and perplexity."""

    def __init__(self) -> None:
        self.state = torch.zeros(2, dtype=torch.float64)

    def update(self, loss_sum: float, tokens: int) -> None:
        self.state[0] += loss_sum
        self.state[1] += tokens

    def compute(self) -> dict[str, float]:
        """loss (nats per token) and perplexity = exp(loss)."""
        loss_sum, tokens = self.state.tolist()
        if tokens == 0:
            return {}
        loss = loss_sum / tokens
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}

    def evaluation(self, device: Any = None) -> dict[str, Any]:
        """Nothing beyond the per-epoch perplexity already in the metrics history."""
        return {}
