"""Draw the training metrics: $LOG_DIR/metrics.csv (written by train.py) becomes
$LOG_DIR/training_metrics.png with four panels: loss, HellaSwag accuracy, learning rate, speed.

    uv run plot_metrics.py                 # LOG_DIR defaults to log
"""

import os

import matplotlib

matplotlib.use("Agg")  # files only: works without a display
import matplotlib.pyplot as plt
import metrics
import settings
from env import cli

def plot(frame, out_path):
    """Draw the four panels of these metrics into the image file out_path."""
    fig, ((loss_ax, hellaswag_ax), (lr_ax, speed_ax)) = plt.subplots(2, 2, figsize=(12, 8))
    steps = frame["step"]

    # the per-step training loss is noisy: draw it faintly with a running mean on top
    window = max(1, len(frame) // 50)
    loss_ax.plot(steps, frame["loss"], color="tab:blue", alpha=0.3 if window > 1 else 1.0,
                 label="train" if window == 1 else None)
    if window > 1:
        loss_ax.plot(steps, frame["loss"].rolling(window, min_periods=1).mean(), color="tab:blue",
                     label=f"train (mean of {window} steps)")
    val = frame.dropna(subset=["val_loss"])
    loss_ax.plot(val["step"], val["val_loss"], "o-", color="tab:orange", label="validation")
    loss_ax.set(title="Loss", xlabel="step", ylabel="cross-entropy (nats)")
    loss_ax.legend()

    hellaswag = frame.dropna(subset=["hellaswag_acc"])
    if len(hellaswag):
        hellaswag_ax.plot(hellaswag["step"], hellaswag["hellaswag_acc"], "o-", color="tab:green", label="acc_norm")
        hellaswag_ax.axhline(0.25, color="gray", linestyle="--", label="chance (0.25)")
        hellaswag_ax.legend()
    else:
        hellaswag_ax.text(0.5, 0.5, "no HellaSwag evaluations\n(HELLASWAG_LIMIT=-1, or no data)",
                          ha="center", va="center", transform=hellaswag_ax.transAxes, color="gray")
        hellaswag_ax.set_xlim(steps.min(), max(steps.max(), steps.min() + 1))
    hellaswag_ax.set(title="HellaSwag accuracy", xlabel="step", ylabel="accuracy")

    lr_ax.plot(steps, frame["lr"], color="tab:purple")
    lr_ax.set(title="Learning rate", xlabel="step", ylabel="lr")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    speed_ax.plot(steps, frame["tok_per_sec"], color="tab:red")
    speed_ax.set(title="Training speed", xlabel="step", ylabel="tokens/s")
    mfu = frame.dropna(subset=["mfu"])
    if len(mfu):
        mfu_ax = speed_ax.twinx()
        mfu_ax.plot(mfu["step"], mfu["mfu"] * 100, color="tab:gray", alpha=0.6)
        mfu_ax.set_ylabel("MFU (%)")

    fig.suptitle(f"Training metrics ({len(frame)} steps)")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


@cli
def main():
    log_dir = settings.shared("log_dir")
    frame = metrics.read(os.path.join(log_dir, "metrics.csv"))
    out_path = os.path.join(log_dir, "training_metrics.png")
    plot(frame, out_path)
    print(f"saved {out_path}")


if __name__ == "__main__":
    main()
