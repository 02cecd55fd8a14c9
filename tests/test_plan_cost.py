"""gte_jax.plan_cost: matmul FLOPs (loop trips multiplied in) and per-chip collective bytes read
off compiled programs, against figures computed here from the shapes (8 fake CPU devices; the
TPU checks need libtpu, the [plan] extra)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gte_jax import plan_cost

F32 = np.dtype(np.float32).itemsize


def _abstract(shape, dtype=jnp.float32, sharding=None):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _compiled_collectives(mesh, axis, shape):
    """psum, all_gather and psum_scatter of a [rows, cols] float32 array sharded on ``axis``."""

    def f(x):
        return lax.psum(x, axis), lax.all_gather(x, axis), lax.psum_scatter(x, axis, tiled=True)

    spec = P(axis)
    fn = jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=(spec, spec, spec))
    return jax.jit(fn).lower(_abstract(shape, sharding=NamedSharding(mesh, spec))).compile()


def _ring(n, size):
    """What one chip sends in a ring over n chips (computed here, not by the module)."""
    return {
        "all-reduce": 2 * (n - 1) / n * size,
        "all-gather": (n - 1) / n * size * n,  # the gathered array is n shards
        "reduce-scatter": (n - 1) / n * size,
    }


def test_collective_bytes_follow_the_ring_formula():
    mesh = jax.make_mesh((8,), ("data",))
    rows, cols = 64, 48
    cost = plan_cost.program_cost(_compiled_collectives(mesh, "data", (rows, cols)).as_text())
    shard = rows // 8 * cols * F32  # each chip's block
    for kind, expected in _ring(8, shard).items():
        assert cost.ici[kind] == pytest.approx(expected, rel=1e-12), kind
    assert cost.ici["all-to-all"] == cost.ici["collective-permute"] == 0
    assert not any(cost.dcn.values())


def test_subgroups_and_slices_split_ici_from_dcn():
    """A psum over the 4-chip axis of a 2 x 4 mesh: groups of 4 (XLA writes them in the iota
    form). Over all 8 chips with chips 0-3 and 4-7 in two slices: hierarchical, the ICI share
    over the 4 chips of a slice and the DCN share (2-1)/2 of the chip's quarter of the array."""
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    mesh = Mesh(devices, ("slice", "data"))
    rows, cols = 64, 16
    compiled = _compiled_collectives(mesh, "data", (rows, cols))
    assert plan_cost.parse_hlo(compiled.as_text()).num_partitions == 8
    cost = plan_cost.program_cost(compiled.as_text())
    shard = rows // 4 * cols * F32
    assert cost.ici["all-reduce"] == pytest.approx(_ring(4, shard)["all-reduce"], rel=1e-12)

    both = Mesh(devices.reshape(8), ("all",))
    compiled = _compiled_collectives(both, "all", (rows, cols))
    slice_of = [d // 4 for d in range(8)]
    cost = plan_cost.program_cost(compiled.as_text(), slice_of)
    size = rows // 8 * cols * F32
    assert cost.ici["all-reduce"] == pytest.approx(2 * 3 / 4 * size, rel=1e-12)
    assert cost.dcn["all-reduce"] == pytest.approx(2 * 1 / 2 * size / 4, rel=1e-12)
    assert cost.dcn["all-gather"] == pytest.approx(1 / 2 * 8 * size / 4, rel=1e-12)


@pytest.mark.parametrize(
    "text, groups",
    [
        ("replica_groups={{0,1,2,3},{4,5,6,7}}", [[0, 1, 2, 3], [4, 5, 6, 7]]),
        ("replica_groups=[2,4]<=[8]", [[0, 1, 2, 3], [4, 5, 6, 7]]),
        ("replica_groups=[4,2]<=[2,4]T(1,0)", [[0, 4], [1, 5], [2, 6], [3, 7]]),
        ("replica_groups={}", [list(range(8))]),
    ],
)
def test_replica_group_forms(text, groups):
    expected = np.arange(8).reshape(2, 4).T.tolist() if "T(" in text else groups
    assert plan_cost.replica_groups(f"x, {text}, y", 8) == expected


def _loop_matmul(m, k, trips, inner=1):
    """``trips`` x (``inner`` x [m,k] @ [k,k]) in a fori_loop around a scan."""

    def step(a, w):
        def body(_, a):
            a, _ = lax.scan(lambda c, _: (jnp.tanh(c @ w), None), a, None, length=inner)
            return a

        return lax.fori_loop(0, trips, body, a)

    return jax.jit(step).lower(_abstract((m, k)), _abstract((k, k))).compile()


@pytest.mark.parametrize("trips, inner", [(5, 1), (3, 4)])
def test_loop_flops_multiply_the_trip_counts(trips, inner):
    m, k = 24, 40
    compiled = _loop_matmul(m, k, trips, inner)
    cost = plan_cost.program_cost(compiled.as_text())
    assert cost.flops == 2 * m * k * k * trips * inner
    assert cost.unknown_trip_counts == 0
    # XLA's own count runs each loop body once: why the plan parses the program.
    xla = compiled.cost_analysis()["flops"]
    assert xla < cost.flops and xla == pytest.approx(2 * m * k * k, rel=0.05)


def test_loop_free_flops_agree_with_xla_cost_analysis():
    """Where XLA's count is right (no loop, matmuls only): a two-layer gradient, both agree."""

    def loss(w1, w2, x):
        return jnp.sum(jnp.tanh(jnp.tanh(x @ w1) @ w2))

    b, d, h, o = 64, 128, 128, 64
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    compiled = grad.lower(_abstract((d, h)), _abstract((h, o)), _abstract((b, d))).compile()
    ours = plan_cost.program_cost(compiled.as_text()).flops
    # forward 2 matmuls, dW1, dW2, and the hidden layer's gradient (x takes none)
    assert ours == 2 * b * (d * h + h * o) * 2 + 2 * b * o * h
    # XLA's count adds the element-wise work (tanh's derivative): a few per hidden element.
    assert ours == pytest.approx(compiled.cost_analysis()["flops"], rel=0.02)


def test_a_mutated_trip_count_changes_the_flops():
    """The trips are read from the program: edit the loop's count and the FLOPs follow."""
    m, k = 16, 32
    text = _loop_matmul(m, k, 5).as_text()
    mutated, n = re.subn(r'"known_trip_count":\{"n":"5"\}', '"known_trip_count":{"n":"7"}', text)
    if not n:  # no known_trip_count written: the condition's limit is the count
        mutated, n = re.subn(r"constant\(5\)", "constant(7)", text)
    assert n >= 1
    assert plan_cost.program_cost(mutated).flops == 2 * m * k * k * 7


@pytest.mark.parametrize("lhs_dilate", [1, 2, 3])
def test_convolution_taps_on_real_elements_match_an_enumeration(lhs_dilate):
    """Taps summed over a spatial dimension's outputs, against enumerating every (output, tap)
    pair of the padded, dilated input (XLA's convolution semantics)."""
    rng = np.random.default_rng(lhs_dilate)
    for _ in range(200):
        n, k, stride, rhs = (int(x) for x in rng.integers(1, [12, 6, 4, 3]))
        low, high = (int(x) for x in rng.integers(-2, 4, size=2))
        span = (n - 1) * lhs_dilate + 1 + low + high - ((k - 1) * rhs + 1)
        if span < 0:
            continue
        out = span // stride + 1
        real = [
            0 <= x <= (n - 1) * lhs_dilate and x % lhs_dilate == 0
            for p in range(out)
            for t in range(k)
            for x in [p * stride + t * rhs - low]
        ]
        args = (n, out, k, stride, low, high, lhs_dilate, rhs)
        assert plan_cost._real_taps(*args) == sum(real), args


_MULTILINE_HLO = """HloModule m, num_partitions=1

ENTRY %main (a: f32[8,16], b: f32[16,4]) -> f32[8,4] {
  %a = f32[8,16]{1,0} parameter(0)
  %b = f32[16,4]{1,0} parameter(1)
  %kernel = f32[8,16]{1,0} custom-call(%a), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={
"xprof_metadata":"{\\"block_q\\": 128}"
}}, metadata={op_name="my_kernel"}, backend_config={"custom_call_config":{"body":"x"}}
  ROOT %dot = f32[8,4]{1,0} dot(%kernel, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""


def test_an_instruction_printed_over_several_lines_keeps_its_computation():
    """XLA prints a Mosaic kernel's frontend_attributes over three lines, the last starting with
    ``}}``: the instructions after it are still the computation's (the matmul is counted) and
    the kernel, whose FLOPs are unknown, is reported, not silently taken as 0."""
    module = plan_cost.parse_hlo(_MULTILINE_HLO)
    assert [i.opcode for i in module.computations["main"]][-2:] == ["custom-call", "dot"]
    cost = plan_cost.program_cost(_MULTILINE_HLO)
    assert cost.flops == 2 * 8 * 16 * 4
    assert cost.uncounted_kernels == 1 and cost.attention_kernel_flops == 0
    named = _MULTILINE_HLO.replace("%kernel", "%splash_mqa_fwd_no_residuals")
    assert plan_cost.program_cost(named).uncounted_kernels == 1  # no q, k operands: unknown


def test_seconds_and_bound_follow_the_table():
    flat = {"hardware_flops_per_chip": 197e12 * 0.5 * 2.0, "unknown_trip_counts": 0.0}
    for k in plan_cost.COLLECTIVE_KINDS:
        flat[f"ici_bytes:{k}"] = flat[f"dcn_bytes:{k}"] = 0.0
    flat["ici_bytes:all-reduce"] = 3 * 200e9  # 3 s at v5e's 200 GB/s
    flat["dcn_bytes:all-gather"] = 25e9 / 8  # 1 s at 25 Gbps
    out = plan_cost.time_fields(
        flat, generation="v5e", chips=4, mfu=0.5, model_flops=4 * 197e12 * 0.5,
        trainable_parameters=10**9, batch_size=8, num_steps=86400,
    )  # fmt: skip
    assert (out["compute_seconds"], out["ici_seconds"], out["dcn_seconds"]) == (2.0, 3.0, 1.0)
    assert out["step_seconds"] == 4.0 and out["bound"] == "ici" and out["days"] == 4.0
    assert out["hardware_to_model_flops"] == 2.0
    assert out["reduce_bytes_over_float32_parameters"] == pytest.approx(3 * 200e9 / 4e9)


# ----------------------------------------------------------------------------- TPU (libtpu)


def _tpu_mesh(name="v5e:2x4"):
    pytest.importorskip("libtpu")
    from gte_jax.topologies import parse_topology, topology_devices

    return Mesh(np.array(topology_devices(parse_topology(name))), ("data",))


def test_tpu_program_counts_loops_and_collectives():
    """XLA:TPU writes matmuls as convolutions and may drop the known trip count: the trips come
    from the loop condition; the gradient all-reduce follows the ring formula."""
    mesh = _tpu_mesh()
    rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    m, k, trips = 256, 512, 5

    def loop(a, w):
        return lax.fori_loop(0, trips, lambda _, a: jnp.tanh(a @ w), a)

    text = (
        jax.jit(loop)
        .lower(_abstract((m, k), jnp.bfloat16, rep), _abstract((k, k), jnp.bfloat16, rep))
        .compile()
        .as_text()
    )
    assert "convolution" in text
    assert plan_cost.program_cost(text).flops == 2 * m * k * k * trips

    def loss(w, x):
        return jnp.sum(jnp.tanh(x @ w))

    compiled = (
        jax.jit(jax.grad(loss))
        .lower(_abstract((k, 128), jnp.float32, rep), _abstract((1024, k), jnp.float32, rows))
        .compile()
    )
    cost = plan_cost.program_cost(compiled.as_text())
    assert cost.ici["all-reduce"] == pytest.approx(2 * 7 / 8 * k * 128 * F32, rel=1e-12)
    assert cost.flops == pytest.approx(2 * 2 * 1024 // 8 * k * 128, rel=1e-12)  # fwd + dW


def test_tpu_reduce_scatter_in_all_reduce_form_is_counted_as_one():
    """XLA:TPU writes the reduce-scatter of an FSDP gradient (global view: GSPMD) as an
    ``all-reduce-scatter`` fusion: an all-reduce whose result each chip slices to its 1/n. A
    ring runs it as a reduce-scatter, (n-1)/n of the array, not an all-reduce's 2 (n-1)/n."""
    mesh = _tpu_mesh()
    rows = NamedSharding(mesh, P("data"))
    k, h = 512, 128

    def loss(w, x):
        return jnp.sum(jnp.tanh(x @ w))

    text = (
        jax.jit(jax.grad(loss), out_shardings=rows)
        .lower(_abstract((k, h), jnp.float32, rows), _abstract((1024, k), jnp.float32, rows))
        .compile()
        .as_text()
    )
    assert re.search(r"all-reduce\(", text), "no all-reduce form: the check would be vacuous"
    cost = plan_cost.program_cost(text)
    assert cost.ici["reduce-scatter"] == pytest.approx(_ring(8, k * h * F32)["reduce-scatter"])
    assert cost.ici["all-reduce"] == 0
    kinds = [op.kind for op in plan_cost.collective_ops(text)]
    assert "reduce-scatter" in kinds and "all-reduce" not in kinds


def test_tpu_reduce_scatter_sliced_inside_the_fusion_that_uses_it_is_counted_as_one():
    """On 64 chips XLA:TPU writes even a lone ``psum_scatter`` as an all-reduce whose 1/n slice
    is taken inside the fusion that uses it (here the update ``w - 0.1 g``), not by a
    ``dynamic-slice`` of its own: still a reduce-scatter on the ring (the per-step gradient
    reductions of FSDP at v5e-64 were counted as all-reduces, 2x)."""
    pytest.importorskip("libtpu")
    from gte_jax.topologies import parse_topology, topology_devices

    mesh = Mesh(np.array(topology_devices(parse_topology("v5litepod-64"))), ("data",))
    shape = (3072, 768)

    def update(x, w):
        scatter = lambda g: jax.lax.psum_scatter(g, "data", scatter_dimension=0, tiled=True)  # noqa: E731
        g = jax.shard_map(scatter, mesh=mesh, in_specs=P(), out_specs=P("data"), check_vma=False)
        return w - 0.1 * g(x)

    text = (
        jax.jit(update)
        .lower(
            _abstract(shape, jnp.float32, NamedSharding(mesh, P())),
            _abstract(shape, jnp.float32, NamedSharding(mesh, P("data"))),
        )
        .compile()
        .as_text()
    )
    assert re.search(r"all-reduce\(", text) and "dynamic-slice(" not in text.split("ENTRY")[1], (
        "XLA wrote it another way: the check would be vacuous"
    )
    cost = plan_cost.program_cost(text)
    assert cost.ici["reduce-scatter"] == pytest.approx(
        _ring(64, 3072 * 768 * F32)["reduce-scatter"]
    )
    assert cost.ici["all-reduce"] == 0


_SCATTER_HLO = """HloModule m, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (p: f32[64,16]) -> (f32[8,16], f32[64,16]) {
  %p = f32[64,16]{1,0} parameter(0)
  %ar = f32[64,16]{1,0} all-reduce(%p), channel_id=1, GROUPS, to_apply=%add
  %pid = u32[] partition-id()
  %c8 = u32[] constant(8)
  %off = u32[] multiply(%pid, %c8)
  %z = u32[] constant(0)
  %ds = f32[8,16]{1,0} dynamic-slice(%ar, %off, %z), dynamic_slice_sizes={8,16}
  %other = f32[64,16]{1,0} negate(%OTHER)
  ROOT %t = (f32[8,16]{1,0}, f32[64,16]{1,0}) tuple(%ds, %other)
}
"""


@pytest.mark.parametrize(
    "groups", ["replica_groups={{0,1,2,3,4,5,6,7}}", "replica_groups=mesh['axis_0'=8] {'axis_0'}"]
)
def test_an_all_reduce_used_whole_stays_an_all_reduce(groups):
    """Hand-built: the same all-reduce counts as a reduce-scatter when its only user slices
    1/8 per chip, and as an all-reduce when the whole result is also read."""
    size = 64 * 16 * F32
    text = _SCATTER_HLO.replace("GROUPS", groups)
    sliced = plan_cost.program_cost(text.replace("%OTHER", "%p"))
    assert sliced.ici["reduce-scatter"] == pytest.approx(_ring(8, size)["reduce-scatter"])
    assert sliced.ici["all-reduce"] == 0
    whole = plan_cost.program_cost(text.replace("%OTHER", "%ar"))
    assert whole.ici["all-reduce"] == pytest.approx(_ring(8, size)["all-reduce"])
    assert whole.ici["reduce-scatter"] == 0


_FUSED_SCATTER_HLO = """HloModule m, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%update (g: f32[64,16], w: f32[8,16], off: u32[]) -> f32[8,16] {
  %g = f32[64,16]{1,0} parameter(0)
  %w = f32[8,16]{1,0} parameter(1)
  %off = u32[] parameter(2)
  %z = u32[] constant(0)
  %mine = f32[8,16]{1,0} dynamic-slice(%g, %off, %z), dynamic_slice_sizes={8,16}
  ROOT %new = f32[8,16]{1,0} subtract(%w, READ)
}

ENTRY %main (p: f32[64,16], w: f32[8,16]) -> f32[8,16] {
  %p = f32[64,16]{1,0} parameter(0)
  %w = f32[8,16]{1,0} parameter(1)
  %ar = f32[64,16]{1,0} all-reduce(%p), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %cs = (f32[64,16]{1,0}, f32[64,16]{1,0}, u32[]) copy-start(%ar)
  %cd = f32[64,16]{1,0} copy-done(%cs)
  %pid = u32[] partition-id()
  %c8 = u32[] constant(8)
  %off = u32[] multiply(%pid, %c8)
  ROOT %f = f32[8,16]{1,0} fusion(%cd, %w, %off), kind=kLoop, calls=%update
}
"""


@pytest.mark.parametrize("read, kind", [("%mine", "reduce-scatter"), ("%g", "all-reduce")])
def test_an_all_reduce_sliced_inside_a_fusion_after_a_copy(read, kind):
    """Hand-built: the all-reduce moves between memories (copy-start / copy-done) and the
    fusion that updates the chip's 1/8 takes its slice inside; it stays an all-reduce when the
    fusion also reads the whole array (the subtraction's shape is then wrong, but only the
    reads matter to the classification)."""
    text = _FUSED_SCATTER_HLO.replace("READ", read)
    kinds = [op.kind for op in plan_cost.collective_ops(text)]
    assert kinds == [kind]


def test_mesh_form_replica_groups():
    attrs = "x, replica_groups=mesh['data'=4,'model'=2] {'data'}, dimensions={0}"
    assert plan_cost.replica_groups(attrs, 8) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    attrs = attrs.replace("{'data'}", "{'model'}")
    assert plan_cost.replica_groups(attrs, 8) == [[0, 1], [2, 3], [4, 5], [6, 7]]


@pytest.mark.parametrize(
    "equation, lhs, rhs",
    [
        ("btkgh,bskh->bkgts", (16, 512, 2, 2, 32), (16, 512, 2, 32)),  # grouped-query scores
        ("bkgts,bskh->btkgh", (16, 2, 2, 512, 512), (16, 512, 2, 32)),  # their values
    ],
)
def test_tpu_batched_matmul_written_as_a_padded_convolution(equation, lhs, rhs):
    """XLA:TPU writes these einsums as convolutions whose window also walks a padded dimension
    (``pad=..x1_1``): half of those taps read padding. FLOPs: 2 x b x t x s x heads x head_dim."""
    mesh = _tpu_mesh()
    rep = NamedSharding(mesh, P())
    text = (
        jax.jit(lambda x, y: jnp.einsum(equation, x, y, preferred_element_type=jnp.float32))
        .lower(_abstract(lhs, jnp.bfloat16, rep), _abstract(rhs, jnp.bfloat16, rep))
        .compile()
        .as_text()
    )
    assert re.search(r"window=\{[^}]*pad=", text), "no padded window: the check would be vacuous"
    b, t, k, g, h = 16, 512, 2, 2, 32
    assert plan_cost.program_cost(text).flops == 2 * b * t * t * k * g * h


def _splash_layers(mesh, scan, batch, length, width, heads, kv_heads, head_dim, layers):
    """The gradient (input and weights) of ``layers`` remat'd attention blocks (q/k/v/o
    projections around the splash kernel, causal) in a ``lax.scan`` or unrolled, compiled."""
    from gte_jax.models.attention import Mask, splash_attention

    def block(x, w, seg):
        b = x.shape[0]
        q = (x @ w[0]).reshape(b, length, heads, head_dim)
        k = (x @ w[1]).reshape(b, length, kv_heads, head_dim)
        v = (x @ w[2]).reshape(b, length, kv_heads, head_dim)
        a = splash_attention(q, k, v, Mask(seg, causal=True), scale=head_dim**-0.5)
        return x + a.reshape(b, length, heads * head_dim) @ w[3]

    def loss(x, ws, seg):
        f = jax.checkpoint(block)
        if scan:
            x, _ = lax.scan(lambda x, w: (f(x, w, seg), None), x, ws)
        else:
            for i in range(layers):
                x = f(x, [w[i] for w in ws], seg)
        return jnp.sum(x.astype(jnp.float32) ** 2)

    rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    shapes = [(width, q_out), (width, kv_out), (width, kv_out), (q_out, width)]
    ws = [_abstract((layers, *s), jnp.bfloat16, rep) for s in shapes]
    x = _abstract((batch, length, width), jnp.bfloat16, rows)
    seg = _abstract((batch, length), jnp.int32, rows)
    with jax.set_mesh(mesh):
        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, ws, seg).compile().as_text()


@pytest.mark.parametrize("scan", [False, True])
def test_tpu_splash_decoder_layers_count_every_matmul_and_kernel(scan):
    """The same remat'd attention layers, scanned or unrolled, against a count from the shapes.
    Projections: forward, remat's recomputation (less the output projection, whose result the
    backward never reads), backward (input and weight gradients). Splash kernels, dense, in units
    of 2 x queries x keys x heads x head_dim: forward (QK^T, PV) twice (remat), dq (QK^T, dP,
    dQ), dkv (QK^T, dP, dV, dK)."""
    mesh = _tpu_mesh()
    batch, length, width, heads, kv_heads, head_dim, layers = 16, 256, 128, 4, 2, 32, 2
    text = _splash_layers(mesh, scan, batch, length, width, heads, kv_heads, head_dim, layers)
    tokens = batch // 8 * length  # per chip
    q_o, k_v = width * heads * head_dim, width * kv_heads * head_dim  # each of the two
    projections = 2 * tokens * layers * ((2 * q_o + 2 * k_v) * 3 + (q_o + 2 * k_v))
    attention = 2 * (batch // 8) * heads * length * length * head_dim * layers * (2 + 2 + 3 + 4)
    cost = plan_cost.program_cost(text)
    assert cost.flops == projections + attention
    assert cost.attention_kernel_flops == attention
    assert (cost.unknown_trip_counts, cost.uncounted_kernels) == (0, 0)
