"""Training metrics: metrics.jsonl, a progress bar with ETA and tokens/s, and the loss curve.

Used by finetune.train; the progress bar writes to stderr, which `docker logs` streams to the terminal.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

from transformers import TrainerCallback


class MetricsCallback(TrainerCallback):
    """Appends one JSON line per log event: step, loss, eval loss, lr, tokens/s and peak memory."""

    def __init__(self, path: Path):
        self.path = path
        self.progress = TokenProgress()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:  # one writer when several processes train
            return
        line = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm", "train_loss"):
            if logs and key in logs:
                line[key] = logs[key]
        line["tokens_per_s"] = self.progress.tokens_per_s
        line["peak_memory_mb"] = peak_memory_mb()
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on CPU."""
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class TokenProgress(TrainerCallback):
    """A tqdm bar over optimizer steps, with ETA, loss and tokens/s."""

    def __init__(self):
        self.bar = None
        self.tokens_per_s = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if not state.is_world_process_zero:
            return
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                        mininterval=1.0, dynamic_ncols=True)
        self._mark = (time.monotonic(), state.num_input_tokens_seen or 0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is None:
            return
        now, tokens = time.monotonic(), state.num_input_tokens_seen or 0
        then, before = self._mark
        if now - then >= 1.0:
            self.tokens_per_s = round((tokens - before) / (now - then), 1)
            self._mark = (now, tokens)
        postfix = {"tok/s": f"{self.tokens_per_s:.0f}"}
        if state.log_history and "loss" in state.log_history[-1]:
            postfix["loss"] = f"{state.log_history[-1]['loss']:.3f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


def plot_loss(metrics: Path, out: Path, summary: dict) -> None:
    """Training and eval loss against steps, with the base model's eval loss as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in metrics.read_text(encoding="utf-8").splitlines() if x.strip()]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), marker="." if key == "eval_loss" else None, label=label)
    if "eval_loss_base" in summary:
        ax.axhline(summary["eval_loss_base"], linestyle="--", color="gray", label="base model eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, metadata={"Software": None})  # no version/timestamp in the file
    plt.close(fig)
