"""Validation metrics that reduce exactly across workers.

Each worker accumulates additive sufficient statistics (a confusion matrix, or error sums) in one
tensor; summing those tensors over ranks and then finishing gives the metrics of the whole
validation set, not an average of per-worker averages.
"""

from __future__ import annotations

import math

import torch


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


class RegressionMeter:
    """Error sums on the original label scale: MSE, MAE and R^2 over all rows."""

    def __init__(self, label_mean: float = 0.0, label_std: float = 1.0) -> None:
        self.mean = label_mean
        self.std = label_std
        # loss_sum, n, sum_sq_err, sum_abs_err, sum_y, sum_y_sq
        self.state = torch.zeros(6, dtype=torch.float64)

    def update(self, prediction: torch.Tensor, target: torch.Tensor, loss_sum: float) -> None:
        pred = prediction.detach().double().cpu() * self.std + self.mean
        true = target.detach().double().cpu() * self.std + self.mean
        err = pred - true
        self.state += torch.tensor(
            [loss_sum, true.numel(), (err**2).sum(), err.abs().sum(), true.sum(), (true**2).sum()],
            dtype=torch.float64,
        )

    def compute(self) -> dict[str, float]:
        """loss (on the standardised target), mse, mae and r2 (on the original scale)."""
        loss_sum, rows, sse, sae, sum_y, sum_y2 = self.state.tolist()
        if rows == 0:
            return {}
        total_variance = sum_y2 - sum_y * sum_y / rows
        r2 = 1.0 - sse / total_variance if total_variance > 0 else 0.0
        return {"loss": loss_sum / rows, "mse": sse / rows, "mae": sae / rows, "r2": r2}


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
