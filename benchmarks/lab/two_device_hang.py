"""XLA:CPU wedges when two CPU devices run one long-looped program at once (jax 0.10.2).

The program is a plain-JAX copy of ``rj.inspect.fixed_point_candidates``' search: 512 states,
each 2000 Adam steps on ``q(v) = |F(v) - v|^2 / 2`` for a GRU-like ``F`` (24 units), then 5
Newton steps. With ``jax_num_cpu_devices=2`` (what ``rj.distributed.use_cpu_cores()`` sets on
2 cores) and its inputs replicated over both devices (as params are after
``make_train_step(..., mesh="local")``) or sharded over them, a run sometimes never returns:
the main thread waits for the result and every XLA thread is parked idle (gdb), so nothing is
computing. On one device it always returns. Each run is its own process, killed after
``--timeout`` seconds (a normal run takes ~5 s); the table counts the runs that did not finish.
``fixed-points`` runs ``rj.inspect.fixed_points`` itself on replicated params.

    python -m benchmarks.lab.two_device_hang --runs 8
"""

from __future__ import annotations

import argparse
import subprocess
import sys

PLACEMENTS = ("replicated", "sharded", "one-device", "fixed-points")


def run_once(placement: str) -> None:
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    jax.config.update("jax_num_cpu_devices", 2)
    mesh = Mesh(jax.devices(), ("d",))
    replicated = NamedSharding(mesh, PartitionSpec())
    where_w = jax.devices()[0] if placement == "one-device" else replicated
    where_x = {"sharded": NamedSharding(mesh, PartitionSpec("d")), "one-device": jax.devices()[0]}.get(placement, replicated)
    w = jax.device_put(0.2 * jax.random.normal(jax.random.key(0), (24, 72)), where_w)
    x = jax.device_put(jax.random.normal(jax.random.key(1), (512, 24)), where_x)
    if placement == "fixed-points":
        import rnnjax as rj

        gru = rj.GRU(24)
        params = jax.device_put(gru.init(jax.random.key(0), 24), replicated)
        print(rj.inspect.fixed_points(gru, params, jnp.zeros(24), 0.3 * x).counts())
        return

    def step(v):
        z = v @ w
        return jax.nn.sigmoid(z[:24]) * v + (1 - jax.nn.sigmoid(z[24:48])) * jnp.tanh(z[48:])

    optimizer = optax.adam(optax.cosine_decay_schedule(0.1, 2000, alpha=1e-3))
    q = lambda v: 0.5 * jnp.sum((step(v) - v) ** 2)

    def search(v):
        def adam(carry, _):
            v, state = carry
            updates, state = optimizer.update(jax.grad(q)(v), state, v)
            return (optax.apply_updates(v, updates), state), None

        def newton(v, _):
            candidate = v - jnp.linalg.solve(jax.jacfwd(step)(v) - jnp.eye(24), step(v) - v)
            return jnp.where(q(candidate) < q(v), candidate, v), None

        (v, _), _ = jax.lax.scan(adam, (v, optimizer.init(v)), None, length=2000)
        v, _ = jax.lax.scan(newton, v, None, length=5)
        return q(v)

    print(float(jax.jit(jax.vmap(search))(x).max()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--placements", nargs="+", default=list(PLACEMENTS), choices=PLACEMENTS)
    parser.add_argument("--once", choices=PLACEMENTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.once:
        run_once(args.once)
        return
    print("| placement | runs | did not finish |\n|---|---:|---:|")
    for placement in args.placements:
        stuck = 0
        for _ in range(args.runs):
            command = [sys.executable, "-m", "benchmarks.lab.two_device_hang", "--once", placement]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
                if done.returncode != 0:
                    raise RuntimeError(done.stderr.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                stuck += 1
        print(f"| {placement} | {args.runs} | {stuck} |", flush=True)


if __name__ == "__main__":
    main()
