# %% [markdown]
# # 04 · Opening the black box: fixed points, horizons and attributions
#
# *Why did my RNN do that?* A recurrent cell is a map of its state,
# `h_t = F(h_{t-1}, x_t)`, and dynamical-systems tools answer the question by looking at
# that map. `rj.inspect` packages them for every rnnjax cell, written with JAX
# transformations:
#
# - `fixed_points`: states with `F(h*, x) = h*` under a constant input, found by minimising
#   `q(h) = ½‖F(h, x) − h‖²` from many states of real trajectories (Sussillo & Barak 2013),
#   with each point's Jacobian, eigenvalues and stability;
# - `lyapunov_exponents`: how fast nearby trajectories converge or diverge (QR method);
# - `jacobian_horizon`: `‖∂h_{T−1}/∂h_t‖` and `‖∂y_{T−1}/∂x_t‖` for every step from one
#   reverse pass (the vanishing-gradient picture of Bengio et al. 1994, Pascanu et al. 2013);
# - `integrated_gradients`: which input steps an output is owed to (Sundararajan et al. 2017;
#   not used in this notebook).
#
# The task is Sussillo & Barak's **3-bit flip-flop**: three input channels carry rare
# pulses of +1 or −1; each output channel must hold the sign of the last pulse on its
# channel. A network that solves it must store 2³ = 8 memories, and Sussillo & Barak found
# them as 8 stable fixed points, with saddles between them that route the transitions. We
# train a GRU and check whether it built the same machine, then compare how five cells
# (Elman, LSTM, GRU, minGRU, LRU) trained on the same task propagate information in time.

# %%
import functools
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import rnnjax as rj

# One JAX device: rj.distributed.use_cpu_cores() would make every CPU core a device, so that
# mesh="local" splits each batch over them, but on jax 0.10.2 XLA:CPU sometimes hangs running
# a program on two CPU devices at once (benchmarks/lab/two_device_hang.py).

start_notebook = time.perf_counter()
BITS, WIDTH, T, BATCH, STEPS = 3, 24, 64, 64, 600
PULSE_PROBABILITY = 0.05

# %% [markdown]
# ## The task
#
# Every channel gets a pulse at step 0 (so every target is defined from the start) and then
# one with probability 0.05 per step; a pulse's sign is random. The target of channel `i` at
# step `t` is the sign of the last pulse on channel `i` up to `t`.

# %%
@functools.partial(jax.jit, static_argnames=("batch", "steps"))
def flipflop(key, batch=BATCH, steps=T):
    """inputs (batch, steps, 3) in {-1, 0, +1}; targets (batch, steps, 3) in {-1, +1}."""
    k_pulse, k_sign = jax.random.split(key)
    signs = jnp.where(jax.random.bernoulli(k_sign, 0.5, (batch, steps, BITS)), 1.0, -1.0)
    pulses = jax.random.bernoulli(k_pulse, PULSE_PROBABILITY, (batch, steps, BITS)).at[:, 0].set(True)
    inputs = jnp.where(pulses, signs, 0.0)

    def hold(last, x):
        last = jnp.where(x != 0, x, last)
        return last, last

    _, targets = jax.lax.scan(hold, jnp.zeros((batch, BITS)), jnp.swapaxes(inputs, 0, 1))
    return {"xs": inputs, "ys": jnp.swapaxes(targets, 0, 1)}


test = flipflop(jax.random.key(99), batch=256)
fig, axes = plt.subplots(BITS, 1, figsize=(8, 3), sharex=True)
for i, ax in enumerate(axes):
    ax.step(np.arange(T), test["ys"][0, :, i], where="post", color="tab:blue", label="target")
    hits = np.nonzero(test["xs"][0, :, i])[0]
    ax.plot(hits, test["xs"][0, hits, i], "k|", ms=10, mew=2, label="pulse")
    ax.set(ylim=(-1.5, 1.5), yticks=[-1, 1], ylabel=f"bit {i}")
axes[0].legend(loc="upper right", fontsize=8, ncol=2)
axes[-1].set_xlabel("step")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Five cells, one model, one budget
#
# Each model is a linear encoder (3 → 24, no bias, so "no pulse" is the input 0), the cell,
# and a linear readout to the 3 outputs, trained with a squared error for 600 Adam steps
# on fresh batches. The models differ only in the cell.

# %%
CELLS = {
    "Elman": rj.Elman(WIDTH),
    "LSTM": rj.LSTM(WIDTH),
    "GRU": rj.GRU(WIDTH),
    "minGRU": rj.MinGRU(WIDTH),
    "LRU": rj.LRU(WIDTH),
}


def init_model(cell, key):
    k_enc, k_cell, k_out = jax.random.split(key, 3)
    hidden = cell.output_size(WIDTH)
    return {
        "enc": jax.random.normal(k_enc, (BITS, WIDTH)) / np.sqrt(BITS),
        "cell": cell.init(k_cell, input_size=WIDTH),
        "out": jax.random.normal(k_out, (hidden, BITS)) / np.sqrt(hidden),
        "b_out": jnp.zeros(BITS),
    }


def apply_model(cell, params, inputs):
    hs, _ = rj.scan(cell, params["cell"], inputs @ params["enc"])
    return hs @ params["out"] + params["b_out"]


def train(cell, seed=0):
    loss_fn = lambda p, batch: jnp.mean((apply_model(cell, p, batch["xs"]) - batch["ys"]) ** 2)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(optax.cosine_decay_schedule(1e-2, STEPS, 0.05)))
    step = rj.train.make_train_step(loss_fn, optimizer, mesh="local")
    state = rj.train.TrainState.create(init_model(cell, jax.random.key(seed)), optimizer)
    batches = (flipflop(k) for k in jax.random.split(jax.random.key(seed + 1), STEPS))
    state, history = rj.train.fit(step, state, batches, steps=STEPS, progress=False)
    return state.params, np.asarray(history["loss"])


models, results = {}, {}
for name, cell in CELLS.items():
    t0 = time.perf_counter()
    models[name], losses = train(cell)
    prediction = apply_model(cell, models[name], test["xs"])
    results[name] = {
        "mse": float(jnp.mean((prediction - test["ys"]) ** 2)),
        "bits correct": float(jnp.mean(jnp.sign(prediction) == test["ys"])),
        "losses": losses,
    }
    print(f"{name:6s}: test MSE {results[name]['mse']:.4f}, bits correct {results[name]['bits correct']:.4f}"
          f"  [{time.perf_counter() - t0:.1f} s]")
print("(always answering 0: MSE 1; keeping the sign of the first pulse: bits correct ~"
      f"{float(jnp.mean(test['ys'] == test['ys'][:, :1])):.2f})")

# %% [markdown]
# The nonlinear recurrences (Elman, LSTM, GRU) solve the task; minGRU and LRU do not.
# Their state is *linear* in the previous state, `h_t = a(x_t) ⊙ h_{t−1} + b(x_t)`, so
# with no pulse the state follows an affine map, which has one fixed point (or a
# continuum), never 8 separate attractors. For the LRU, `a` is a constant and the whole
# model is affine in its input, so no amount of training solves the task: a flip-flop is
# not linear (two +1 pulses must give what one gives). The minGRU's input-dependent gates
# let it keep the sign for a while (most bits right) but not cleanly (its MSE). These
# cells are meant to be stacked with nonlinearities between layers.

# %% [markdown]
# ## The GRU's fixed points
#
# With no pulse the GRU runs autonomously: `h ← F(h, 0)`. We sample 512 states from the
# GRU's trajectories on test sequences, add a little noise, and minimise `q` from each
# (2000 Adam steps, then 5 Newton steps; one compiled call, vmapped over the 512 starts).
# Candidates that do not reach `q < 1e-8` are slow points and are dropped; the rest are
# merged when closer than 0.01.

# %%
gru, gru_params = CELLS["GRU"], models["GRU"]
encoded = test["xs"] @ gru_params["enc"]
states = rj.inspect.state_trajectory(gru, gru_params["cell"], encoded)      # (256, T, 24)
picks = jax.random.choice(jax.random.key(3), states.shape[0] * states.shape[1], (512,), replace=False)
starts = states.reshape(-1, WIDTH)[picks] + 0.01 * jax.random.normal(jax.random.key(4), (512, WIDTH))

t0 = time.perf_counter()
fp = rj.inspect.fixed_points(gru, gru_params["cell"], jnp.zeros(WIDTH), starts)
fp_seconds = time.perf_counter() - t0
print(f"{fp.num_candidates} starts -> {len(fp.points)} fixed points ({fp.num_dropped} slow points dropped, "
      f"{fp.num_merged} duplicates merged) in {fp_seconds:.1f} s; largest q {fp.q.max():.1e}")
print("stability:", fp.counts())

readout = lambda h: h @ np.asarray(gru_params["out"]) + np.asarray(gru_params["b_out"])
stable = fp.stability == "stable"
memories = np.sign(readout(fp.points[stable])).astype(int)
for point_readout, eig in zip(readout(fp.points[stable]), fp.eigenvalues[stable]):
    print(f"stable: readout {np.array2string(point_readout, precision=2, sign=' ')}  max |λ| = {abs(eig[0]):.3f}")
for kind in ("saddle", "unstable"):
    for eig in fp.eigenvalues[fp.stability == kind]:
        print(f"{kind}: {int(np.sum(np.abs(eig) > 1))} unstable direction(s), max |λ| = {abs(eig[0]):.3f}")

# The claims of this section, checked: 8 attractors, one per memory, each a clean readout.
assert fp.counts()["stable"] == 8
assert {tuple(m) for m in memories} == {(a, b, c) for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)}
assert np.all(np.abs(readout(fp.points[stable])) > 0.8)
unstable_directions = np.sum(np.abs(fp.eigenvalues[fp.stability == "saddle"]) > 1, axis=-1)
assert np.mean(unstable_directions == 1) > 0.5  # most saddles: one unstable direction

# %% [markdown]
# Eight stable fixed points, one for each of the 8 memories, exactly as Sussillo & Barak
# found in their networks: reading out each attractor gives one of the 8 sign patterns.
# Most of the saddles have a single unstable direction, like those Sussillo & Barak found on
# the boundaries between two memories' basins. In the top three principal components of the
# hidden states the attractors form a cube, and trajectories (blue) jump between its
# corners:

# %%
ax = rj.inspect.plot_pca_trajectories(states[:30], fp, n_components=3, lw=0.6, alpha=0.5)
ax.set_title("GRU on the 3-bit flip-flop: trajectories and fixed points (zero input)")
plt.tight_layout()
plt.show()

# %% [markdown]
# The Lyapunov exponents say the same from another side. Started on an attractor with no
# input, the trajectory stays there and the exponents equal the log-moduli of that fixed
# point's Jacobian eigenvalues to about 1e-3 (a cross-check of the two tools). Driven by test
# inputs, the largest exponent stays negative: nearby trajectories converge, so the
# network is contracting, not chaotic — small perturbations are forgotten, memories are not.

# %%
corner = rj.inspect.carry_from_vector(jnp.asarray(fp.points[stable][0]), gru.init_carry())
at_rest = rj.inspect.lyapunov_exponents(gru, gru_params["cell"], jnp.zeros((400, WIDTH)), k=4, carry=corner, burn_in=100)
expected = np.sort(np.log(np.abs(fp.eigenvalues[stable][0])))[::-1][:4]
print("at an attractor:       ", np.round(np.asarray(at_rest), 4))
print("log|eig| of its Jacobian:", np.round(expected, 4))
driven = rj.inspect.lyapunov_exponents(gru, gru_params["cell"], encoded[:32], k=4)
print(f"driven by test inputs: largest exponent {float(driven[:, 0].mean()):.3f} ± {float(driven[:, 0].std()):.3f} per step")
assert np.allclose(at_rest, expected, atol=5e-3)
assert float(driven[:, 0].max()) < 0

# %% [markdown]
# ## How far back does each cell look?
#
# For the five trained models on the same test sequences, `jacobian_horizon` gives, for
# every step `t`, the norm of `∂h_{T−1}/∂h_t` (how much a perturbation of the state after
# step `t` still moves the final state) and of `∂y_{T−1}/∂x_t` (the saliency of the cell's
# input at step `t`, after the encoder, for the cell's last output), all steps at once from
# one reverse pass per sequence. Curves are batch means, relative to their value at
# distance 0.

# %%
horizons = {}
for name, cell in CELLS.items():
    params = models[name]
    horizons[name] = rj.inspect.jacobian_horizon(cell, params["cell"], test["xs"][:64] @ params["enc"])

fig, (ax_state, ax_saliency) = plt.subplots(1, 2, figsize=(12, 3.8))
rj.inspect.plot_horizons({name: h.state for name, h in horizons.items()}, ax=ax_state)
rj.inspect.plot_horizons({name: h.saliency for name, h in horizons.items()}, ax=ax_saliency)
ax_state.set_title("state horizon ‖∂h_{T−1}/∂h_t‖ (relative)")
ax_saliency.set_title("saliency ‖∂y_{T−1}/∂x_t‖ (relative)")
plt.tight_layout()
plt.show()


def relative(curve, distance):
    mean = np.asarray(curve).mean(axis=0)[::-1]
    return mean[distance] / mean[0]


print("relative to distance 0:        state horizon        |        saliency")
print("distance:                 5       20       60  |        5       20       60")
for name, h in horizons.items():
    print(f"{name:6s} (MSE {results[name]['mse']:.3f}): " + " ".join(f"{relative(h.state, d):8.1e}" for d in (5, 20, 60))
          + "  | " + " ".join(f"{relative(h.saliency, d):8.1e}" for d in (5, 20, 60)))
lru_modulus = np.abs(np.asarray(CELLS["LRU"].eigenvalues(models["LRU"]["cell"])))
print(f"trained LRU: |lambda| from {lru_modulus.min():.3f} to {lru_modulus.max():.3f}")
decay20 = {name: relative(h.state, 20) for name, h in horizons.items()}
decay60 = {name: relative(h.state, 60) for name, h in horizons.items()}
assert decay20["Elman"] < 1e-3 * min(v for name, v in decay20.items() if name != "Elman")  # the best solver forgets fastest
assert max(decay60, key=decay60.get) == "minGRU"                                             # the longest horizon fails the task
assert np.abs(fp.eigenvalues[stable][:, 0]).max() > 0.95                                     # the GRU's slow directions
saliency20 = {name: relative(h.saliency, 20) for name, h in horizons.items()}
assert min(saliency20, key=saliency20.get) == "Elman" and max(saliency20, key=saliency20.get) == "minGRU"

# %% [markdown]
# The horizon measures how long a *perturbation* of the state survives, not how long a
# *memory* does. The Elman network, which solves the task best, forgets perturbations
# fastest: after 20 steps one has shrunk about a millionfold. Its bits live in *which*
# attractor the state sits in, and an attractor is exactly a place where small
# perturbations die out; only a pulse, a large input, moves the state to another basin.
# The GRU and LSTM solve the task too but keep slower directions (the GRU's attractors above
# have eigenvalues up to about 0.99); the GRU's horizon is about as long as the LRU's. The
# minGRU keeps perturbations longest of all and fails the task. A long horizon is neither
# necessary nor sufficient here: the task needs attractors, and linear cells cannot form
# them. The saliency of input steps for the last output (right) tells the same story: the
# Elman network's vanishes fastest, the minGRU's slowest.
#
# ## Summary
#
# The GRU trained on the 3-bit flip-flop built the machine Sussillo & Barak describe:
# 8 stable fixed points, one per memory, with saddles (mostly with one unstable direction)
# between them; driven by inputs its largest Lyapunov exponent is negative, so it is
# contracting, not chaotic. Across cells, the Jacobian horizon shows that remembering a
# bit and propagating a perturbation are different things: the Elman network solves the
# task with the shortest horizon of the five, and the cell with the longest (minGRU) fails.

# %%
print(f"notebook ran in {time.perf_counter() - start_notebook:.0f} s")
