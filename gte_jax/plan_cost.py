"""What a compiled step makes the chip do: matmul FLOPs and collective bytes, read off its HLO.

``gte-jax plan`` compiles the real train step for a TPU topology (:mod:`gte_jax.plan`); this
module reads the compiled program's text (``compiled.as_text()``: the per-chip SPMD program after
XLA's optimisations) and counts, per chip and per step:

- **hardware FLOPs**: 2 x (output elements) x (contraction length) of every ``dot`` and
  ``convolution`` (XLA:TPU writes matmuls as convolutions; of a convolution's window only the
  taps on real input elements, not on the holes of a dilated input or on padding), inside fusions
  too, plus the splash attention kernels' matmuls (Mosaic custom calls, read from their operand
  shapes: dense, so the blocks a causal or local mask lets the kernel skip are counted; other
  Mosaic kernels are reported as not counted), each multiplied by the trip counts of the
  ``while`` loops around it (GradCache's chunks and ``lax.map`` / ``lax.scan`` loops). Remat's
  recomputation and GradCache's extra forward are in the program, so they are counted. XLA's
  own ``cost_analysis()`` counts a loop body once, whatever its trip count (checked on CPU and
  TPU: ``tests/test_plan_cost.py``), hence the parse. Element-wise work (softmax, norms, the
  optimizer) is not counted: it runs on the vector unit, not the MXU.
- **collective bytes** by kind (all-gather, all-reduce, reduce-scatter, all-to-all,
  collective-permute): what one chip sends, with the ring algorithm's share: over a group of
  ``n`` chips an all-gather or a reduce-scatter moves (n-1)/n x the full (gathered / unreduced)
  array, an all-to-all (n-1)/n x its array, an all-reduce 2 (n-1)/n x its array (a
  reduce-scatter then an all-gather), a collective-permute its whole array. An async pair
  (``*-start`` / ``*-done``, ``async-start`` / ``async-done``) is counted once, at its start.
  Each is ICI or DCN by its replica groups: a group within one slice is ICI; a group spanning
  ``s`` slices with ``m`` chips in each is taken as hierarchical (XLA's multislice collectives):
  the ICI share over ``m`` chips and the DCN share (s-1)/s of the chip's 1/m part of the array.

Seconds follow from the per-chip figures of :data:`INTERCONNECT` (vendor figures) and the chip's
bf16 peak (:data:`gte_jax.topologies.CHIPS`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from gte_jax.topologies import CHIPS

COLLECTIVE_KINDS = (
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
)


@dataclasses.dataclass(frozen=True)
class Interconnect:
    """Bytes per second one chip sends: over ICI (all its links) and over DCN (its share of the
    host's NICs)."""

    ici_bytes_per_s: float
    dcn_bytes_per_s: float


# Vendor figures, Google Cloud's TPU system-architecture pages (cloud.google.com/tpu/docs/v4,
# /v5e, /v5p, /v6e, read Dec 2026). ICI: what a chip sends, half the bidirectional figure, which
# is also each page's "all-reduce bandwidth per Pod" / chips per Pod:
#   v4   1.1 PB/s all-reduce per 4096-chip Pod -> 268.6 GB/s per chip;
#   v5e  400 GB/s bidirectional per chip (51.2 TB/s per 256-chip Pod) -> 200 GB/s;
#   v5p  1200 GB/s bidirectional per chip -> 600 GB/s;
#   v6e  800 GB/s bidirectional per chip (102.4 TB/s per Pod) -> 400 GB/s.
# DCN per chip: v5e 2 x 100 Gbps NICs per 8-chip host (6.4 Tbps per 256-chip Pod) -> 25 Gbps =
# 3.125 GB/s; v5p 50 Gbps per chip -> 6.25 GB/s. Ours (no figure on their pages): v4 as v5p's
# 50 Gbps per chip, v6e as v5e's 25 Gbps per chip.
INTERCONNECT: dict[str, Interconnect] = {
    "v4": Interconnect(1.1e15 / 4096, 50e9 / 8),
    "v5e": Interconnect(200e9, 25e9 / 8),
    "v5p": Interconnect(600e9, 50e9 / 8),
    "v6e": Interconnect(400e9, 25e9 / 8),
}
assert set(INTERCONNECT) == set(CHIPS), "a chip without interconnect figures"

# --------------------------------------------------------------------------------------------------
# The HLO text, parsed as far as the counts need
# --------------------------------------------------------------------------------------------------

_BYTES = {"pred": 1, "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(pred|bf16|[fsu]\d+|f8\w*|c64|c128)\[([\d,]*)\]")
_HEAD = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")


@dataclasses.dataclass
class Instr:
    name: str
    type: str  # e.g. "f32[8,16]{1,0}" or a tuple "(f32[2], s32[])"
    opcode: str
    operands: list[str]  # operand names (without %), or the raw text of a literal
    attrs: str


def _closing(text: str, start: int) -> int:
    """Index just past the bracket group that opens at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _split_top(text: str) -> list[str]:
    parts, depth, last = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(text[last:i])
            last = i + 1
    return [p.strip() for p in [*parts, text[last:]] if p.strip()]


def _instr(line: str) -> Instr | None:
    head = _HEAD.match(line)
    if not head:
        return None
    rest = line[head.end() :]
    cut = _closing(rest, 0) if rest.startswith("(") else rest.find(" ")
    type_, rest = rest[:cut], rest[cut:].lstrip()
    opcode = re.match(r"[\w\-]+", rest)
    if not opcode:
        return None
    open_at = opcode.end()
    close = _closing(rest, open_at)
    operands = [
        (m.group(1) if (m := re.search(r"%([\w.\-]+)\s*$", p)) else p)
        for p in _split_top(rest[open_at + 1 : close - 1])
    ]
    return Instr(head.group(1), type_, opcode.group(0), operands, rest[close:])


@dataclasses.dataclass
class Module:
    computations: dict[str, list[Instr]]
    entry: str
    num_partitions: int


_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def _depth(line: str) -> int:
    """Brackets a line opens minus those it closes, outside quoted strings."""
    bare = _QUOTED.sub("", line)
    return sum(bare.count(c) for c in "([{") - sum(bare.count(c) for c in ")]}")


def _lines(text: str) -> list[str]:
    """The text's lines, an instruction's continuation lines joined to it: XLA prints some
    attributes over several lines (a Mosaic kernel's ``frontend_attributes={kernel_metadata={``
    then a line that starts with ``}}``), which read line by line would end the computation."""
    out: list[str] = []
    depth = 0
    for line in text.splitlines():
        # (a line that starts an instruction or a computation is never a continuation: an
        # unbalanced line cannot swallow the rest of the module)
        if depth > 0 and not (_HEAD.match(line) or _COMPUTATION.match(line)):
            out[-1] += " " + line.strip()
            depth += _depth(line)
            continue
        out.append(line)
        depth = max(_depth(line), 0) if _HEAD.match(line) else 0
    return out


def parse_hlo(text: str) -> Module:
    """The computations of an HLO module's text (``compiled.as_text()``)."""
    computations: dict[str, list[Instr]] = {}
    entry, current = "", None
    for line in _lines(text):
        start = _COMPUTATION.match(line)
        if start:
            current = computations.setdefault(start.group(2), [])
            entry = start.group(2) if start.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None and (instr := _instr(line)) is not None:
            current.append(instr)
    partitions = re.search(r"num_partitions=(\d+)", text)
    return Module(computations, entry, int(partitions.group(1)) if partitions else 1)


def _arrays(type_: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(type_)]


def type_bytes(type_: str) -> float:
    """Bytes of every array in an HLO type (a tuple's elements summed)."""
    total = 0.0
    for dt, dims in _arrays(type_):
        size = _BYTES.get(dt) or (int(re.sub(r"\D", "", dt) or 8) / 8)
        total += size * math.prod(dims)
    return total


def _dims(type_: str) -> tuple[int, ...]:
    arrays = _arrays(type_)
    return arrays[0][1] if arrays else ()


def _attr_ints(attrs: str, key: str) -> list[int]:
    m = re.search(rf"\b{key}=\{{([\d,]*)\}}", attrs)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


# --------------------------------------------------------------------------------------------------
# FLOPs and loop trip counts
# --------------------------------------------------------------------------------------------------


def _matmul_flops(ins: Instr, table: Mapping[str, Instr]) -> float:
    """2 x output elements x contraction length of a ``dot`` or ``convolution``."""
    out = math.prod(_dims(ins.type))
    lhs = table.get(ins.operands[0]) if ins.operands else None
    rhs = table.get(ins.operands[1]) if len(ins.operands) > 1 else None
    if ins.opcode == "dot":
        dims = _dims(lhs.type) if lhs else ()
        return 2.0 * out * math.prod(dims[c] for c in _attr_ints(ins.attrs, "lhs_contracting_dims"))
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
    kernel = _dims(rhs.type) if rhs else ()
    if not labels or lhs is None or len(labels.group(2)) != len(kernel):
        return 0.0
    # Each output element reduces over the kernel's input features ("i": already the input
    # features / feature_group_count) and the window's taps that land on real input elements.
    # XLA:TPU writes batched matmuls and outer products as convolutions whose window walks a
    # dilated (lhs_dilate) or padded input, so most taps may land on holes or padding: the taps
    # are counted per spatial dimension, summed over that dimension's output positions.
    lhs_labels, kernel_labels, out_labels = labels.groups()
    lhs_dims, out_dims = _dims(lhs.type), _dims(ins.type)
    rank = sum(c.isdigit() for c in kernel_labels)
    window = _window(ins.attrs, rank)
    flops = 2.0 * kernel[kernel_labels.index("i")]
    positions = 1  # output positions along the spatial dimensions
    for d in range(rank):
        size_out = out_dims[out_labels.index(str(d))]
        flops *= _real_taps(lhs_dims[lhs_labels.index(str(d))], size_out, *(w[d] for w in window))
        positions *= size_out
    return flops * (out // max(positions, 1))  # x the output's batch and features


def _window(attrs: str, rank: int) -> tuple[list[int], ...]:
    """(size, stride, pad_low, pad_high, lhs_dilate, rhs_dilate) per spatial dimension of a
    convolution's ``window={...}`` (XLA's defaults where a field is not written)."""
    text = m.group(1) if (m := re.search(r"window=\{([^}]*)\}", attrs)) else ""

    def field(key: str, default: int) -> list[int]:
        f = re.search(rf"\b{key}=([\dx]+)", text)
        return [int(x) for x in f.group(1).split("x")] if f else [default] * rank

    pads = re.search(r"\bpad=([\d_x-]+)", text)
    low_high = [p.split("_") for p in pads.group(1).split("x")] if pads else [["0", "0"]] * rank
    return (
        field("size", 1), field("stride", 1), [int(p[0]) for p in low_high],
        [int(p[1]) for p in low_high], field("lhs_dilate", 1), field("rhs_dilate", 1),
    )  # fmt: skip


def _real_taps(
    size_in: int, size_out: int, size: int, stride: int, low: int, _high: int, lhs: int, rhs: int
) -> int:
    """Window taps on real input elements, summed over a spatial dimension's output positions:
    tap k of output p reads position p * stride + k * rhs - low of the input dilated by ``lhs``
    (real elements at multiples of ``lhs`` up to (size_in - 1) * lhs; the rest holes or
    padding)."""
    last = (size_in - 1) * lhs
    offset = np.arange(size, dtype=np.int64) * rhs - low  # tap k of output 0; output p: + p stride
    if lhs == 1:  # every position in [0, last] is real: count the outputs p per tap k
        first = np.maximum(-(offset // stride), 0)  # ceil(-offset / stride)
        final = np.minimum((last - offset) // stride, size_out - 1)
        return int(np.maximum(final - first + 1, 0).sum())
    total = 0
    for start in offset:
        positions = start + stride * np.arange(size_out, dtype=np.int64)
        real = (positions >= 0) & (positions <= last) & (positions % lhs == 0)
        total += int(np.count_nonzero(real))
    return total


# Splash attention's Pallas kernels (jax.experimental.pallas.ops.tpu.splash_attention) are
# Mosaic custom calls named splash_{mqa|mha}_{fwd|dq|dkv}...; their matmuls, in units of
# 2 x (query heads x queries x keys x head dim): fwd QK^T and PV; dq recomputes QK^T, dP = dO V^T,
# dQ = dS K; dkv recomputes QK^T and dP, dV = P^T dO, dK = dS^T Q, and dQ too when the backward is
# fused (its dkv kernel then returns dQ's per-block partial sums: more than 4 results).
_SPLASH = re.compile(r"splash_m[hq]a_(fwd|dq|dkv)")
_SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}
_FLOAT = ("bf16", "f16", "f32", "f64")


def kernel_flops(ins: Instr, table: Mapping[str, Instr]) -> float | None:
    """Matmul FLOPs of a ``custom-call``: 0 for XLA's own (buffers, layout hints), a splash
    attention kernel's from its operand shapes, dense (blocks its mask skips included: an upper
    bound under a causal or local mask), None for another Mosaic kernel (not counted)."""
    if 'custom_call_target="tpu_custom_call"' not in ins.attrs:
        return 0.0
    phase = _SPLASH.search(ins.name) or _SPLASH.search(ins.attrs)
    if not phase:
        return None
    listed = re.search(r"operand_layout_constraints=\{(.*?)\}\s*,\s*\w+=", ins.attrs)
    shapes = (
        _arrays(listed.group(1))
        if listed
        else [a for o in ins.operands if o in table for a in _arrays(table[o].type)]
    )
    q, k = ([dims for dt, dims in shapes if dt in _FLOAT] + [(), ()])[:2]
    if not q or len(k) < 2:
        return None
    seq_minor = re.search(r'k_layout\\?"\s*:\s*2', ins.attrs)  # QKVLayout.SEQ_MINOR: [.., d, s]
    keys = k[-1] if seq_minor else k[-2]
    fused = phase.group(1) == "dkv" and len(_arrays(ins.type)) > 4  # dQ too
    units = _SPLASH_MATMULS[phase.group(1)] + fused
    return 2.0 * units * math.prod(q) * keys


def _constant(name: str, table: Mapping[str, Instr]) -> int | None:
    """The integer value of ``name`` when it is a constant (through copies), else None."""
    for _ in range(8):
        ins = table.get(name)
        if ins is None:
            return None
        if ins.opcode == "constant" and ins.operands:
            try:
                return int(ins.operands[0])
            except ValueError:
                return None
        if ins.opcode not in ("copy", "bitcast") or not ins.operands:
            return None
        name = ins.operands[0]
    return None


def _called(ins: Instr, key: str) -> list[str]:
    """Computations an instruction names in ``key=%c`` or ``key={%a, %b}``."""
    m = re.search(rf"\b{key}=(\{{[^}}]*\}}|%[\w.\-]+)", ins.attrs)
    return re.findall(r"%([\w.\-]+)", m.group(1)) if m else []


def trip_count(module: Module, ins: Instr, table: Mapping[str, Instr]) -> int | None:
    """Trips of a ``while``: XLA's ``known_trip_count`` when it wrote one, else read off the
    condition (``i < N`` or ``i <= N`` on one tuple element, N a constant, i's start a constant
    in the loop's initial tuple, step 1, which is how ``lax.scan`` / ``fori_loop`` / ``lax.map``
    lower); None when neither applies."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', ins.attrs)
    if known:
        return int(known.group(1))
    cond = _called(ins, "condition")
    if not cond or cond[0] not in module.computations:
        return None
    body = module.computations[cond[0]]
    for fused in [c for i in body for c in _called(i, "calls")]:
        body = body + module.computations.get(fused, [])
    compare = [i for i in body if i.opcode == "compare"]
    limits = [int(i.operands[0]) for i in body if i.opcode == "constant" and _is_int(i)]
    index = [int(m.group(1)) for i in body if (m := re.search(r"index=(\d+)", i.attrs))]
    if len(compare) != 1 or len(limits) != 1 or not index:
        return None
    direction = re.search(r"direction=(\w+)", compare[0].attrs)
    init_tuple = table.get(ins.operands[0]) if ins.operands else None
    start = 0
    if (
        init_tuple is not None
        and init_tuple.opcode == "tuple"
        and index[0] < len(init_tuple.operands)
    ):
        start = _constant(init_tuple.operands[index[0]], table) or 0
    extra = {"LT": 0, "LE": 1}.get(direction.group(1) if direction else "", None)
    return None if extra is None else max(limits[0] - start + extra, 0)


def _is_int(ins: Instr) -> bool:
    return bool(re.match(r"[su]\d+\[\]", ins.type)) and bool(
        re.fullmatch(r"-?\d+", ins.operands[0])
    )


# --------------------------------------------------------------------------------------------------
# Collectives
# --------------------------------------------------------------------------------------------------

_GROUPS_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_GROUPS_LIST = re.compile(r"replica_groups=\{((?:\{[\d,\s]*\},?\s*)*)\}")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")


def _mesh_groups(attrs: str) -> list[list[int]] | None:
    """The mesh form ``mesh['a'=4,'b'=2] {'a'}`` (newer XLA: the group varies the listed axes,
    devices numbered row-major over the mesh), else None."""
    m = _GROUPS_MESH.search(attrs)
    if not m:
        return None
    axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
    names = [a for a, _ in axes]
    listed = re.findall(r"'(\w+)'", m.group(2))
    if not axes or not listed or any(a not in names for a in listed):
        return None
    ids = np.arange(math.prod(int(n) for _, n in axes)).reshape([int(n) for _, n in axes])
    kept = [i for i, a in enumerate(names) if a not in listed]
    order = kept + [names.index(a) for a in listed]
    size = math.prod(int(axes[names.index(a)][1]) for a in listed)
    return ids.transpose(order).reshape(-1, size).tolist()


def replica_groups(attrs: str, num_devices: int) -> list[list[int]]:
    """The device groups of a collective: the explicit ``{{0,1},{2,3}}`` form, the iota form
    ``[G,S]<=[dims]T(perm)``, the mesh form ``mesh['a'=4,'b'=2] {'a'}``, or all devices when
    none are listed."""
    mesh = _mesh_groups(attrs)
    if mesh is not None:
        return mesh
    iota = _GROUPS_IOTA.search(attrs)
    if iota:
        shape = [int(x) for x in iota.group(1).split(",")]
        dims = [int(x) for x in iota.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if iota.group(3):
            ids = ids.transpose([int(x) for x in iota.group(3).split(",")])
        return ids.reshape(shape[0], -1).tolist()
    listed = _GROUPS_LIST.search(attrs)
    groups = (
        [
            [int(x) for x in g.split(",") if x.strip()]
            for g in re.findall(r"\{([\d,\s]*)\}", listed.group(1))
        ]
        if listed
        else []
    )
    return [g for g in groups if g] or [list(range(num_devices))]


def _collective_bytes(
    kind: str, ins: Instr, table: Mapping[str, Instr], num_devices: int, slice_of: Sequence[int]
) -> tuple[float, float]:
    """(ICI, DCN) bytes one chip sends for one collective (the module doc's formulas)."""
    sizes = [type_bytes(table[o].type) for o in ins.operands if o in table]
    if kind == "collective-permute":
        pairs = (
            [
                tuple(int(x) for x in p.split(","))
                for p in re.findall(r"\{(\d+,\d+)\}", ins.attrs.split("source_target_pairs=")[-1])
            ]
            if "source_target_pairs=" in ins.attrs
            else []
        )
        size = sizes[0] if sizes else 0.0
        share = size * len(pairs) / max(num_devices, 1)
        crossing = any(slice_of[a] != slice_of[b] for a, b in pairs if max(a, b) < len(slice_of))
        return (0.0, share) if crossing else (share, 0.0)
    group = replica_groups(ins.attrs, num_devices)[0]
    n = len(group)
    if n <= 1:
        return 0.0, 0.0
    full = sum(sizes) * (n if kind == "all-gather" else 1)
    factor = 2.0 if kind == "all-reduce" else 1.0
    slices = len({slice_of[d] for d in group if d < len(slice_of)}) or 1
    per_slice = n // slices
    ici = factor * (per_slice - 1) / per_slice * full
    dcn = factor * (slices - 1) / slices * full / per_slice
    return ici, dcn


# --------------------------------------------------------------------------------------------------
# The walk: every computation reached from the entry, times its loops' trips
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ProgramCost:
    """Per chip and per step: matmul FLOPs and bytes sent by collective kind and network."""

    flops: float = 0.0
    ici: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(COLLECTIVE_KINDS, 0.0)
    )
    dcn: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(COLLECTIVE_KINDS, 0.0)
    )
    unknown_trip_counts: int = 0
    attention_kernel_flops: float = 0.0  # of ``flops``: splash kernels (:func:`kernel_flops`)
    uncounted_kernels: int = 0  # Mosaic kernels whose FLOPs are not known (not in ``flops``)

    def add(self, other: ProgramCost, times: float = 1.0) -> None:
        self.flops += times * other.flops
        self.attention_kernel_flops += times * other.attention_kernel_flops
        self.uncounted_kernels += other.uncounted_kernels
        for k in COLLECTIVE_KINDS:
            self.ici[k] += times * other.ici[k]
            self.dcn[k] += times * other.dcn[k]
        self.unknown_trip_counts += other.unknown_trip_counts

    def flat(self) -> dict[str, float]:
        """Flat numbers (what ``plan --layers`` extrapolates in depth)."""
        out = {
            "hardware_flops_per_chip": self.flops,
            "unknown_trip_counts": float(self.unknown_trip_counts),
            "attention_kernel_flops_per_chip": self.attention_kernel_flops,
            "uncounted_kernels": float(self.uncounted_kernels),
        }
        out |= {f"ici_bytes:{k}": v for k, v in self.ici.items()}
        return out | {f"dcn_bytes:{k}": v for k, v in self.dcn.items()}


def _users(instrs: Sequence[Instr]) -> dict[str, list[Instr]]:
    out: dict[str, list[Instr]] = {}
    for ins in instrs:
        for o in ins.operands:
            out.setdefault(o, []).append(ins)
    return out


def _slices_in_fusion(user: Instr, source: str, size: int, module: Module | None) -> int | None:
    """How many ``dynamic-slice`` of ``size`` elements read operand ``source`` inside the fused
    computation ``user`` calls (XLA:TPU fuses each chip's slice of an all-reduce with what uses
    it, e.g. the optimizer update); None when anything else reads it there."""
    callees = _called(user, "calls")
    if module is None or user.opcode != "fusion" or len(callees) != 1:
        return None
    body = module.computations.get(callees[0], [])
    slots = {str(i) for i, o in enumerate(user.operands) if o == source}
    params = [
        i.name for i in body if i.opcode == "parameter" and i.operands[:1] in ([s] for s in slots)
    ]
    inner, count = _users(body), 0
    for param in params:
        for use in inner.get(param, []):
            if use.opcode != "dynamic-slice" or use.operands[0] != param:
                return None
            if math.prod(_dims(use.type)) != size:
                return None
            count += 1
    return count or None


def _scatters(
    ins: Instr, num_devices: int, users: Mapping[str, list[Instr]], module: Module | None = None
) -> bool:
    """Whether an all-reduce's results are only sliced, each to 1/n on a chip of its n-chip
    group: a reduce-scatter in all-reduce form (XLA:TPU's ``all-reduce-scatter`` fusions: the
    all-reduce, then each chip's ``dynamic-slice``, maybe inside the fusion that uses the slice:
    :func:`_slices_in_fusion`), which a ring runs as a reduce-scatter."""
    n = len(replica_groups(ins.attrs, num_devices)[0])
    frontier, sliced = [(ins, None)], 0
    while frontier:
        source, size = frontier.pop()
        if size is None and len(whole := _arrays(source.type)) == 1:
            if math.prod(whole[0][1]) % n:
                return False
            size = math.prod(whole[0][1]) // n
        for user in users.get(source.name, []):
            if user.opcode in ("get-tuple-element", "all-reduce-done"):
                frontier.append((user, None))
                continue
            if user.opcode in ("copy-start", "copy-done", "copy"):  # a move between memories
                frontier.append((user, size))
                continue
            if size is None:
                return False
            if user.opcode == "dynamic-slice" and user.operands[0] == source.name:
                if math.prod(_dims(user.type)) != size:
                    return False
                sliced += 1
                continue
            fused = _slices_in_fusion(user, source.name, size, module)
            if fused is None:
                return False
            sliced += fused
    return sliced > 0 and n > 1


def _kind(
    ins: Instr,
    users: Mapping[str, list[Instr]] | None = None,
    num_devices: int = 1,
    module: Module | None = None,
) -> str | None:
    """The collective kind of an instruction (None: not a collective). An all-reduce whose
    results are only sliced per chip counts as the reduce-scatter it is (:func:`_scatters`)."""
    kind = ins.opcode.removesuffix("-start")
    if kind not in COLLECTIVE_KINDS:
        return None
    if kind == "all-reduce" and users is not None:
        return "reduce-scatter" if _scatters(ins, num_devices, users, module) else kind
    return kind


def _walk(
    module: Module, name: str, slice_of: Sequence[int], memo: dict[str, ProgramCost]
) -> ProgramCost:
    """The cost of one run of computation ``name`` (memoised: a fused computation is often
    called from several places)."""
    if name in memo:
        return memo[name]
    instrs = module.computations.get(name, [])
    table, users = {i.name: i for i in instrs}, _users(instrs)
    cost = ProgramCost()
    for ins in instrs:
        op = ins.opcode
        if op in ("dot", "convolution"):
            cost.flops += _matmul_flops(ins, table)
        elif (kind := _kind(ins, users, module.num_partitions, module)) is not None:
            ici, dcn = _collective_bytes(kind, ins, table, module.num_partitions, slice_of)
            cost.ici[kind] += ici
            cost.dcn[kind] += dcn
        elif op == "custom-call":
            flops = kernel_flops(ins, table)
            if flops is None:
                cost.uncounted_kernels += 1
            else:
                cost.flops += flops
                cost.attention_kernel_flops += flops
        elif op == "while":
            trips = trip_count(module, ins, table)
            if trips is None:
                cost.unknown_trip_counts += 1
            for body in _called(ins, "body"):
                cost.add(_walk(module, body, slice_of, memo), 1 if trips is None else trips)
        elif op == "conditional":  # the costlier branch
            branches = [
                _walk(module, b, slice_of, memo)
                for b in _called(ins, "branch_computations")
                + _called(ins, "true_computation")
                + _called(ins, "false_computation")
            ]
            if branches:
                cost.add(max(branches, key=lambda c: c.flops))
        elif op in ("fusion", "async-start") or op == "call":
            for callee in _called(ins, "calls") + _called(ins, "to_apply"):
                cost.add(_walk(module, callee, slice_of, memo))
    memo[name] = cost
    return cost


def program_cost(hlo_text: str, slice_of: Sequence[int] | None = None) -> ProgramCost:
    """Per-chip FLOPs and collective bytes of one run of a compiled SPMD program.
    ``slice_of[d]``: the slice of the device with id ``d`` (the program's partition id, which
    for a ``jit`` over a mesh is the position in ``mesh.devices.flat``); None: one slice."""
    module = parse_hlo(hlo_text)
    slices = list(slice_of) if slice_of is not None else [0] * module.num_partitions
    return _walk(module, module.entry, slices, {})


@dataclasses.dataclass(frozen=True)
class CollectiveOp:
    """One collective of a compiled program: its kind, the shapes of its operands and results,
    and how many times a step runs it (the trip counts of the loops around it)."""

    kind: str
    operand_shapes: tuple[tuple[int, ...], ...]
    result_shapes: tuple[tuple[int, ...], ...]
    runs: int


def collective_ops(hlo_text: str) -> list[CollectiveOp]:
    """Every collective reached from the entry (async pairs once, at the start), with its runs
    per step: what the activation-sharding tests read (which arrays cross devices, how often)."""
    module = parse_hlo(hlo_text)
    out: list[CollectiveOp] = []

    def walk(name: str, runs: int) -> None:
        instrs = module.computations.get(name, [])
        table, users = {i.name: i for i in instrs}, _users(instrs)
        for ins in instrs:
            if (kind := _kind(ins, users, module.num_partitions, module)) is not None:
                operands = tuple(
                    dims for o in ins.operands if o in table for _, dims in _arrays(table[o].type)
                )
                results = tuple(dims for _, dims in _arrays(ins.type))
                out.append(CollectiveOp(kind, operands, results, runs))
            elif ins.opcode == "while":
                trips = trip_count(module, ins, table) or 1
                for body in _called(ins, "body"):
                    walk(body, runs * trips)
            else:
                for key in ("calls", "to_apply", "branch_computations", "true_computation",
                            "false_computation"):  # fmt: skip
                    for callee in _called(ins, key):
                        walk(callee, runs)

    walk(module.entry, 1)
    return out


# --------------------------------------------------------------------------------------------------
# The plan's fields
# --------------------------------------------------------------------------------------------------


def compiled_cost(compiled: Any, devices: Sequence[Any]) -> dict[str, float]:
    """:meth:`ProgramCost.flat` of a compiled step whose partitions are ``devices`` in order
    (``mesh.devices.flat``); each device's ``slice_index`` (multislice) decides ICI vs DCN.
    {} when XLA cannot print the program."""
    slice_of = [int(getattr(d, "slice_index", 0) or 0) for d in devices]
    try:
        text = compiled.as_text()
    except jax.errors.JaxRuntimeError:
        # XLA cannot print a program holding a Mosaic kernel (the splash attention): a RET_CHECK
        # on its async custom call (jax 0.10.2, libtpu 0.0.52). No cost then, not a failed plan.
        return {}
    return program_cost(text, slice_of).flat()


def time_fields(
    cost: Mapping[str, float],
    *,
    generation: str,
    chips: int,
    mfu: float,
    model_flops: float,
    trainable_parameters: int,
    batch_size: int,
    num_steps: int,
) -> dict[str, Any]:
    """The report's cost fields from :func:`compiled_cost`'s numbers: FLOPs of the whole step
    (all chips), collective bytes per chip, seconds, and the step time max(compute,
    collectives) with what bounds it. Collectives are taken as not overlapping each other (ICI
    and DCN seconds add up) but as overlapping compute (XLA schedules them asynchronously)."""
    link, peak = INTERCONNECT[generation], CHIPS[generation].peak_bf16_flops
    flops = cost["hardware_flops_per_chip"]
    by_kind = {
        k: {"ici": int(cost[f"ici_bytes:{k}"]), "dcn": int(cost[f"dcn_bytes:{k}"])}
        for k in COLLECTIVE_KINDS
    }
    compute_s = flops / (peak * mfu)
    ici_s = sum(b["ici"] for b in by_kind.values()) / link.ici_bytes_per_s
    dcn_s = sum(b["dcn"] for b in by_kind.values()) / link.dcn_bytes_per_s
    step_s = max(compute_s, ici_s + dcn_s)
    bound = "compute" if compute_s >= ici_s + dcn_s else ("ici" if ici_s >= dcn_s else "dcn")
    reduced = sum(by_kind[k]["ici"] + by_kind[k]["dcn"] for k in ("all-reduce", "reduce-scatter"))
    out = {
        "hardware_flops": _sig(flops * chips),
        "model_flops": _sig(model_flops),
        "hardware_to_model_flops": _sig(flops * chips / model_flops) if model_flops else None,
        "collective_bytes": by_kind,
        "compute_seconds": _sig(compute_s),
        "ici_seconds": _sig(ici_s),
        "dcn_seconds": _sig(dcn_s),
        "bound": bound,
        "step_seconds": _sig(step_s),
        "examples_per_second": _sig(batch_size / step_s) if step_s else None,
        "days": _sig(num_steps * step_s / 86400),
        "reduce_bytes_over_float32_parameters": _sig(reduced / (4 * trainable_parameters))
        if trainable_parameters
        else None,
    }
    if cost.get("unknown_trip_counts", 0) >= 0.5:  # a loop counted once: FLOPs are a lower bound
        out["loops_without_trip_count"] = round(cost["unknown_trip_counts"])
    if cost.get("attention_kernel_flops_per_chip", 0) > 0:  # of hardware_flops, dense
        out["attention_kernel_flops"] = _sig(cost["attention_kernel_flops_per_chip"] * chips)
    if cost.get("uncounted_kernels", 0) >= 0.5:  # Mosaic kernels left out: a lower bound
        out["kernels_without_flops"] = round(cost["uncounted_kernels"])
    return out


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}") if x and math.isfinite(x) else x
