"""Which rows of every global batch a process reads, tokenises and feeds (no JAX needed)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

DATA_AXIS = "data"  # gte_jax.sharding.DATA_AXIS


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Which rows of every global batch a process materialises.

    The global batch is split over the mesh's ``"data"`` axis into ``num_blocks`` equal blocks
    (block i on the devices at data index i). A process holds the blocks of its devices, wherever
    they sit on the axis: ``blocks`` (increasing). Its local batch is those blocks' rows in global
    order, each block on its own device (packing packs each block into its own rows), and
    :func:`global_batch` puts each block on its devices. Nothing assumes the blocks are adjacent.
    """

    blocks: tuple[int, ...]
    num_blocks: int

    def __post_init__(self):
        if not self.blocks or list(self.blocks) != sorted(set(self.blocks)):
            raise ValueError(f"blocks must be distinct and increasing, got {self.blocks}")
        if self.blocks[0] < 0 or self.blocks[-1] >= self.num_blocks:
            raise ValueError(f"blocks {self.blocks} outside 0..{self.num_blocks - 1}")

    @classmethod
    def contiguous(cls, process_index: int, process_count: int, groups: int = 1) -> BatchLayout:
        """Process p holds blocks [p * groups, (p + 1) * groups) (one device per block)."""
        first = process_index * groups
        return cls(tuple(range(first, first + groups)), process_count * groups)

    @classmethod
    def of_mesh(cls, mesh: Any, process_index: int | None = None) -> BatchLayout:
        """The blocks ``process_index``'s devices hold on ``mesh`` (a ``jax.sharding.Mesh``
        with a ``"data"`` axis; default: this process)."""
        if process_index is None:
            import jax

            process_index = jax.process_index()
        axis = mesh.axis_names.index(DATA_AXIS)
        held = np.vectorize(lambda d: d.process_index == process_index, otypes=[bool])
        coords = np.argwhere(held(mesh.devices))
        if not len(coords):
            raise ValueError(f"process {process_index} has no device on the mesh")
        return cls(tuple(sorted({int(c[axis]) for c in coords})), int(mesh.shape[DATA_AXIS]))

    @property
    def groups(self) -> int:
        """Blocks (data-axis devices) of this process."""
        return len(self.blocks)

    def rows(self, batch_size: int) -> np.ndarray:
        """Global row indices of this process's local batch, in local order."""
        per = self.block_rows(batch_size)
        return np.concatenate([np.arange(b * per, (b + 1) * per) for b in self.blocks])

    def block_rows(self, batch_size: int) -> int:
        if batch_size % self.num_blocks:
            raise ValueError(
                f"global batch size {batch_size} is not divisible by the {self.num_blocks} data "
                "devices: choose a batch size that is a multiple of mesh.data"
            )
        return batch_size // self.num_blocks

    def describe(self) -> str:
        runs, start = [], self.blocks[0]
        for a, b in zip(self.blocks, (*self.blocks[1:], None), strict=True):
            if b != a + 1:
                runs.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        return f"blocks {','.join(runs)} of {self.num_blocks}"
