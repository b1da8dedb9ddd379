# %% [markdown]
# # 03 · vmap, jit and grad with rnnjax
#
# rnnjax cells are pure functions of `(params, carry, x)`, so JAX's transformations apply to
# them directly. This notebook shows four patterns that are awkward in object-oriented RNN
# libraries and one line each here:
#
# 1. **vmap over a batch of sequences**: write the model for one sequence, vmap it.
# 2. **Per-example gradients** with `vmap(grad(...))`.
# 3. **An ensemble of models** trained at once with `vmap` over the parameters.
# 4. **Streaming inference** one step (or one chunk) at a time, carrying the state.
#
# Everything runs on the CPU in a few seconds; the data are generated.

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import rnnjax as rj

print("jax", jax.__version__, "on", jax.devices()[0])

# %% [markdown]
# ## Data: noisy sine waves of different lengths
#
# Each sequence is a sine wave with its own frequency and phase, observed with noise; the
# task is to predict the next value. Sequences have different lengths, padded to `T`.

# %%
T, B = 64, 16
key = jax.random.key(0)
k_freq, k_phase, k_noise, k_len = jax.random.split(key, 4)
freqs = jax.random.uniform(k_freq, (B, 1), minval=0.05, maxval=0.3)
phases = jax.random.uniform(k_phase, (B, 1), maxval=2 * jnp.pi)
clean = jnp.sin(freqs * jnp.arange(T + 1) + phases)
signal = clean + 0.05 * jax.random.normal(k_noise, clean.shape)
xs, targets = signal[:, :-1, None], clean[:, 1:, None]        # (B, T, 1) each
lengths = jax.random.randint(k_len, (B,), T // 2, T + 1)        # (B,)
print("xs", xs.shape, "lengths", lengths)

# %% [markdown]
# ## 1 · Write it for one sequence, `vmap` it over the batch
#
# The model is a GRU followed by a linear readout. `predict` takes **one** sequence
# `(T, 1)`; `jax.vmap` turns it into a batched function. rnnjax's drivers accept any number
# of leading batch axes, so the batched call `rj.scan(cell, params, xs)` on `(B, T, 1)`
# exists too — and gives the same numbers.

# %%
cell = rj.GRU(hidden_size=32)


def init(key):
    k_cell, k_out = jax.random.split(key)
    return {"cell": cell.init(k_cell, input_size=1), "w_out": 0.1 * jax.random.normal(k_out, (32, 1)), "b_out": jnp.zeros(1)}


def predict(params, xs, length):
    """xs: (T, 1) one sequence -> (T, 1) predictions (zeros past `length`)."""
    hs, _ = rj.scan(cell, params["cell"], xs, lengths=length)
    return hs @ params["w_out"] + params["b_out"]


params = init(jax.random.key(1))
batched = jax.jit(jax.vmap(predict, in_axes=(None, 0, 0)))
vmapped_preds = batched(params, xs, lengths)

hs, _ = rj.scan(cell, params["cell"], xs, lengths=lengths)        # the batched driver directly
direct_preds = hs @ params["w_out"] + params["b_out"]
print("vmap of one-sequence model:", vmapped_preds.shape)
print("max |vmap - batched driver| =", float(jnp.abs(vmapped_preds - direct_preds).max()))
np.testing.assert_allclose(vmapped_preds, direct_preds, atol=1e-6)

# %% [markdown]
# ## 2 · Per-example gradients: `vmap(grad(loss))`
#
# The loss of one sequence is the mean squared error over its real steps. `jax.grad` of
# it, vmapped over the batch, gives one gradient per sequence — for gradient-noise
# studies, influence estimates or differentially private training. Their mean is the
# gradient of the mean loss, which we check.

# %%
def sequence_loss(params, xs, target, length):
    mask = (jnp.arange(T) < length)[:, None]
    err = jnp.where(mask, predict(params, xs, length) - target, 0.0)
    return jnp.sum(err**2) / length


per_example_grads = jax.jit(jax.vmap(jax.grad(sequence_loss), in_axes=(None, 0, 0, 0)))
grads = per_example_grads(params, xs, targets, lengths)
print("per-example gradient of w_h:", grads["cell"].w_h.shape)   # (B, 32, 96): one per sequence

mean_loss = lambda p: jnp.mean(jax.vmap(sequence_loss, in_axes=(None, 0, 0, 0))(p, xs, targets, lengths))
full_grad = jax.grad(mean_loss)(params)
mean_of_per_example = jax.tree.map(lambda g: g.mean(0), grads)
gap = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(full_grad), jax.tree.leaves(mean_of_per_example)))
print(f"max |mean of per-example grads - grad of mean loss| = {gap:.2e}")
assert gap < 1e-6

norms = jnp.sqrt(sum(jnp.sum(g.reshape(B, -1) ** 2, axis=1) for g in jax.tree.leaves(grads)))
plt.figure(figsize=(5, 3))
plt.scatter(np.asarray(freqs[:, 0]), np.asarray(norms), c=np.asarray(lengths), cmap="viridis")
plt.colorbar(label="sequence length")
plt.xlabel("sine frequency")
plt.ylabel("per-example gradient norm")
plt.title("One gradient per sequence (untrained model)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3 · An ensemble trained at once: `vmap` over the parameters
#
# Eight models with different initialisations: `vmap` the initialiser over keys, and the
# whole Optax training step over the stacked parameters and optimiser states. One
# compiled program trains the ensemble; the spread of its predictions is a cheap
# uncertainty estimate.

# %%
n_models = 8
optimizer = optax.adam(1e-2)
ensemble = jax.vmap(init)(jax.random.split(jax.random.key(2), n_models))
opt_states = jax.vmap(optimizer.init)(ensemble)
print("stacked w_h:", ensemble["cell"].w_h.shape)                  # (8, 32, 96)


def train_step(params, opt_state):
    loss, grads = jax.value_and_grad(mean_loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


ensemble_step = jax.jit(jax.vmap(train_step))
losses = []
start = time.perf_counter()
for _ in range(150):
    ensemble, opt_states, loss = ensemble_step(ensemble, opt_states)
    losses.append(loss)
losses = np.stack(jax.device_get(losses))                            # (steps, n_models)
print(f"trained {n_models} models x 150 steps in {time.perf_counter() - start:.1f} s")
print("final loss per model:", np.round(losses[-1], 4))
assert (losses[-1] < 0.5 * losses[0]).all()

# Predictions of every member on sequence 0: vmap over the parameters only.
member_preds = jax.vmap(predict, in_axes=(0, None, None))(ensemble, xs[0], lengths[0])[:, :, 0]
n0 = int(lengths[0])
mean, std = member_preds.mean(0)[:n0], member_preds.std(0)[:n0]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3))
ax1.semilogy(losses)
ax1.set(xlabel="step", ylabel="training MSE", title="each ensemble member")
ax2.plot(np.asarray(targets[0, :n0, 0]), "k", label="target")
ax2.plot(np.asarray(mean), label="ensemble mean")
ax2.fill_between(np.arange(n0), np.asarray(mean - 2 * std), np.asarray(mean + 2 * std), alpha=0.3, label="±2 std")
ax2.set(xlabel="t", title="next-value prediction, sequence 0")
ax2.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4 · Streaming inference: one step, or one chunk, at a time
#
# Deployed RNNs see their input as it arrives. `cell.step` advances the state by one
# step; jit it once and call it in a loop. Feeding a sequence in chunks through `rj.scan`
# with the carry handed over gives the same state as one long scan — the equality the
# notebook checks.

# %%
member0 = jax.tree.map(lambda a: a[0], ensemble)                      # one trained model
readout = lambda p, h: h @ p["w_out"] + p["b_out"]
step = jax.jit(lambda p, h, x: cell.step(p["cell"], h, x))

h = cell.init_carry(batch_shape=())                                   # one stream, no batch axis
online = []
for t in range(T):
    h, y = step(member0, h, xs[0, t])
    online.append(readout(member0, y))
online = jnp.stack(online)

full, h_full = rj.scan(cell, member0["cell"], xs[0])
np.testing.assert_allclose(online, readout(member0, full), atol=1e-5)

carry, chunks = None, []
for chunk in jnp.split(xs[0], 4):                                     # four chunks of 16 steps
    ys, carry = rj.scan(cell, member0["cell"], chunk, carry)
    chunks.append(ys)
np.testing.assert_allclose(jnp.concatenate(chunks), full, atol=1e-5)
np.testing.assert_allclose(carry, h_full, atol=1e-5)
print("step-by-step == chunked == one scan: OK")

plt.figure(figsize=(6, 3))
plt.plot(np.asarray(xs[0, :, 0]), ".", color="gray", label="noisy input")
plt.plot(np.asarray(online[:, 0]), label="online prediction of the next value")
plt.xlabel("t")
plt.legend(fontsize=8)
plt.tight_layout()
plt.show()
