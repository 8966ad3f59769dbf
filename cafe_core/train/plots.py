"""The loss curve saved with every run, and PNGs of other figures."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display in a pipeline step
import matplotlib.pyplot as plt  # noqa: E402


def figure_png(draw, size: tuple[float, float]) -> bytes:
    """A PNG of the figure `draw(fig)` fills."""
    fig = plt.figure(figsize=size, dpi=110)
    try:
        draw(fig)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def loss_curve_png(metrics: list[dict]) -> bytes:
    """Loss, loss_lm and loss_con against the step, with held-out top-1 accuracy on a second axis."""

    def draw(fig):
        ax = fig.add_subplot()
        steps = [m["step"] for m in metrics]
        for key in ("loss", "loss_lm", "loss_con"):
            if any(key in m for m in metrics):
                ax.plot(steps, [m.get(key, float("nan")) for m in metrics], label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        evals = [(m["step"], m["heldout/i2t_top1"], m["heldout/chance"]) for m in metrics if "heldout/i2t_top1" in m]
        if evals:
            acc_ax = ax.twinx()
            acc_ax.plot([e[0] for e in evals], [e[1] for e in evals], "o-", color="black", label="held-out i2t top-1")
            acc_ax.axhline(evals[-1][2], color="gray", linestyle=":", label="chance")
            acc_ax.set_ylim(0, 1)
            acc_ax.set_ylabel("accuracy")
            acc_ax.legend(loc="upper right")
        ax.legend(loc="upper left")
        ax.set_title("CAFe training")

    return figure_png(draw, (7, 4))
