"""Human-readable outputs of a run: the results table and the training-curve plot."""

from __future__ import annotations

from pathlib import Path

from recsys.metrics import DEFAULT_KS


def results_table(rows: dict[str, dict[str, float]], ks: tuple[int, ...] = DEFAULT_KS) -> str:
    """Markdown table, one row per entry (e.g. {"valid": {...}, "test": {...}})."""
    names = [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks]
    lines = ["| split | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, metrics in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{metrics[n]:.4f}" for n in names) + " |")
    return "\n".join(lines)


def plot_training_curve(history: list[dict], path: str | Path, select_metric: str, valid_users: int = 0) -> Path:
    """Train loss and validation metrics per epoch, with the selected epoch marked.
    ``valid_users > 0``: validation ran on a fixed sample of that many users (said in the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], color="tab:blue", label="loss")
    parts = [k for k in history[0] if k.startswith("train_") and k != "train_loss"] if history else []
    if len(parts) > 1:  # a single part is the loss itself
        for key in parts:
            ax_loss.plot(epochs, [h.get(key, float("nan")) for h in history], linestyle=":", label=key[len("train_"):])
        ax_loss.legend(fontsize=8)
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="training loss (and its parts)")
    validated = [h for h in history if f"valid_{select_metric}" in h]
    for name in dict.fromkeys(("recall@10", "ndcg@10", select_metric)):  # ordered, no repeats
        key = f"valid_{name}"
        if any(key in h for h in validated):
            ax_metric.plot([h["epoch"] for h in validated], [h[key] for h in validated], label=name, marker=".")
    if validated:
        best = max(validated, key=lambda h: h[f"valid_{select_metric}"])
        ax_metric.axvline(best["epoch"], color="grey", linestyle="--", label=f"selected (epoch {best['epoch']})")
    else:  # a refit (trainer.selection.refit) trains on the validation targets and never validates
        ax_metric.text(0.5, 0.5, "no validation", ha="center", va="center", transform=ax_metric.transAxes)
    sample = f", {valid_users:,}-user sample" if valid_users else ""
    ax_metric.set(xlabel="epoch", ylabel="validation", title=f"validation (full ranking{sample})")
    if validated:
        ax_metric.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
