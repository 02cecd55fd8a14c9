"""Itemise the collectives of a recipe's compiled train step (what ``gte-jax plan`` compiles).

Prints one line per collective instruction: kind (an all-reduce that each chip only slices is the
reduce-scatter it is: ``plan_cost``), runs per step (loop trip counts multiplied), bytes one chip
sends per step and their ratio to the float32 parameter bytes, operand shapes, group size, the
loops around it and XLA's op name; then the totals by kind.

    python -m benchmarks.reductions --config configs/gte_base_pretrain.py --model-config bert-base \
        --topology v5litepod-64 --config.model.attention_kernel=xla [--layers 12] [--hlo out.txt]
"""

from __future__ import annotations

import argparse
import collections
import re

import jax
import numpy as np

from gte_jax import plan, plan_cost
from gte_jax.config import load_config
from gte_jax.topologies import parse_topology, topology_devices
from gte_jax.training.spec import StageSpec


def rows(text: str):
    """(kind, runs, bytes per chip per step, name, operand types, group size, loops, op name)."""
    module = plan_cost.parse_hlo(text)
    n = module.num_partitions
    out = []

    def walk(name: str, runs: int, loops: str) -> None:
        instrs = module.computations.get(name, [])
        table, users = {i.name: i for i in instrs}, plan_cost._users(instrs)
        for ins in instrs:
            kind = plan_cost._kind(ins, users, n, module)
            if kind:
                ici, dcn = plan_cost._collective_bytes(kind, ins, table, n, [0] * n)
                types = [table[o].type.split("{")[0] for o in ins.operands if o in table]
                group = len(plan_cost.replica_groups(ins.attrs, n)[0])
                op = re.search(r'op_name="([^"]*)"', ins.attrs)
                out.append((kind, runs, (ici + dcn) * runs, ins.name, types, group, loops,
                            op.group(1) if op else ""))  # fmt: skip
            elif ins.opcode == "while":
                trips = plan_cost.trip_count(module, ins, table) or 1
                for body in plan_cost._called(ins, "body"):
                    walk(body, runs * trips, f"{loops}/{ins.name}x{trips}")
            else:
                for key in ("calls", "to_apply", "branch_computations"):
                    for callee in plan_cost._called(ins, key):
                        walk(callee, runs, loops)

    walk(module.entry, 1, "")
    return sorted(out, key=lambda r: -r[2])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--model-config", required=True)
    parser.add_argument("--topology", required=True)
    parser.add_argument("--layers", type=int, default=None, help="a shallower copy (faster)")
    parser.add_argument("--hlo", default=None, help="also write the compiled program's text here")
    args, overrides = parser.parse_known_args()
    jax.config.update("jax_platforms", "cpu")
    # the first stage's typed spec, as `gte-jax plan` parses it
    config = StageSpec.from_config(plan.stage_configs(load_config(args.config, overrides), None)[0])
    mesh, _ = plan.start_checks(config, topology_devices(parse_topology(args.topology)))
    hf_config, _ = plan.model_shape(config.model, args.model_config)
    if args.layers:
        hf_config = plan.with_layers(hf_config, args.layers)
    step = plan.abstract_step(config, mesh, hf_config)
    compiled, _ = plan.compile_step(step)
    text = compiled.as_text()
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(text)
    f32 = 4 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(step.params))
    totals: collections.Counter = collections.Counter()
    for kind, runs, sent, name, types, group, loops, op in rows(text):
        totals[kind] += sent
        print(f"{kind:15s} runs={runs:<4d} {sent / 1e6:9.2f} MB {sent / f32:6.3f}x  {name}  "
              f"{';'.join(types)[:160]}  group={group} loops={loops or '-'} op={op[-100:]}")  # fmt: skip
    print({k: f"{v / 1e6:.1f} MB = {v / f32:.3f}x f32 params" for k, v in totals.items()})
    reduced = totals["all-reduce"] + totals["reduce-scatter"]
    print(
        f"reduce_bytes_over_float32_parameters {reduced / f32:.4g} (f32 params {f32 / 1e6:.1f} MB)"
    )


if __name__ == "__main__":
    main()
