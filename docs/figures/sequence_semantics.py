"""Draw docs/figures/sequence_semantics.png: what ``lengths``, ``resets`` and ``reverse`` do.

The numbers in the picture are computed by ``rj.scan`` itself, with a cell that counts the
steps since its carry was last (re-)initialised, so the figure cannot drift from the library:

    .venv/bin/python docs/figures/sequence_semantics.py
"""

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import rnnjax as rj  # noqa: E402

OUT = Path(__file__).with_suffix(".png")
T = 10
LENGTHS = jnp.array([10, 7, 4])
RESETS = jnp.zeros((3, T), bool).at[0, 6].set(True).at[1, 3].set(True)


class CounterParams(NamedTuple):
    w: jax.Array  # (input_size, 1), unused: the count ignores the input


@dataclass(frozen=True)
class Counter(rj.Cell):
    """Carry and output: the number of steps since the carry was last (re-)initialised."""

    params_type = CounterParams

    def init(self, key, input_size, dtype=jnp.float32):
        return CounterParams(jnp.zeros((input_size, 1), dtype))

    def init_carry(self, batch_shape=(), dtype=jnp.float32):
        return jnp.zeros((*batch_shape, 1), dtype)

    def step(self, params, carry, x):
        h = carry + 1.0
        return h, h

    def output_size(self, input_size):
        return 1

    def input_size(self, params):
        return params.w.shape[0]


def panel(ax, ys, last, lengths, resets, reverse, title):
    ys, last = np.asarray(ys[..., 0]), np.asarray(last[..., 0])
    for b in range(ys.shape[0]):
        for t in range(T):
            real = t < int(lengths[b])
            ax.add_patch(plt.Rectangle((t, -b - 0.42), 0.95, 0.78, color="#cfe3f7" if real else "#eeeeee"))
            ax.text(t + 0.47, -b - 0.03, f"{ys[b, t]:.0f}", ha="center", va="center",
                    fontsize=10, color="black" if real else "#999999")
            if resets is not None and real and bool(resets[b, t]):
                ax.plot([t - 0.025, t - 0.025], [-b - 0.47, -b + 0.41], color="#d62728", lw=3)
        ax.text(T + 0.3, -b - 0.03, f"{last[b]:.0f}", ha="center", va="center", fontsize=10, weight="bold")
        n = int(lengths[b])
        if n:
            start, end = (n - 0.1, 0.1) if reverse else (0.1, n - 0.1)
            ax.annotate("", xy=(end, -b + 0.47), xytext=(start, -b + 0.47),
                        arrowprops=dict(arrowstyle="->", color="#1f77b4", lw=1.2))
    ax.set_xlim(-0.1, T + 0.6)
    ax.set_ylim(-ys.shape[0] + 0.3, 0.8)
    ax.set_yticks([-b for b in range(ys.shape[0])], [f"seq {b}: length {int(n)}" for b, n in enumerate(lengths)])
    ax.set_xticks([*(np.arange(T) + 0.47), T + 0.3], [*(str(t) for t in range(T)), "last"])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(title, fontsize=10, loc="left")


def main():
    cell = Counter()
    params = cell.init(jax.random.key(0), input_size=1)
    xs = jnp.zeros((3, T, 1))
    cases = [
        (False, None, "lengths=[10, 7, 4]: steps past a length output 0, the carry stays"),
        (True, None, "lengths, reverse=True: each sequence backwards over its own valid part"),
        (False, RESETS, "lengths, resets (red: re-initialise before that step)"),
        (True, RESETS, "lengths, resets, reverse=True: the same boundaries, walked backwards"),
    ]
    fig, axes = plt.subplots(len(cases), 1, figsize=(7.5, 7.2))
    for ax, (reverse, resets, title) in zip(axes, cases):
        ys, last = rj.scan(cell, params, xs, lengths=LENGTHS, resets=resets, reverse=reverse)
        panel(ax, ys, last, LENGTHS, resets, reverse, title)
    axes[-1].set_xlabel("time step t (outputs stay aligned with their inputs); last: the final carry")
    fig.suptitle("rj.scan with a cell that counts steps since its carry was (re-)initialised", fontsize=11)
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
