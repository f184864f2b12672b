"""The one batch structure that flows through atomlens, and the pairs inside it.

Every field, its shape and its unit is documented here and nowhere else.
``n_atoms`` is the total number of atoms in the batch, ``n_structures`` the number of
structures (molecules or periodic cells) and ``n_pairs`` the number of directed neighbour
pairs.

:class:`Pairs`, the neighbour pairs of a batch:

=====================  ==========================  ====================================
field                  shape, dtype                meaning (unit)
=====================  ==========================  ====================================
``i, j``               (n_pairs,) int64            directed pairs i <- j within the cutoff
``shifts``             (n_pairs, 3) float or None  Cartesian periodic shift of j's image
                                                   (Angstrom): r_ij = r_j - r_i + shift_ij;
                                                   ``None``: no pair crosses a cell
                                                   boundary (molecules)
``symmetric``          python bool                 True: pairs [0:n/2] are each unordered
                                                   pair once, and [n/2:n] the same pairs
                                                   reversed (j, i, -shift): pair functions
                                                   of the distance are evaluated once per
                                                   unordered pair
=====================  ==========================  ====================================

:class:`Batch`:

=====================  ==========================  ====================================
field                  shape, dtype                meaning (unit)
=====================  ==========================  ====================================
``numbers``            (n_atoms,) int64            atomic numbers Z
``positions``          (n_atoms, 3) float          Cartesian positions (Angstrom)
``structure_index``    (n_atoms,) int64            which structure each atom belongs to
``n_atoms_per``        (n_structures,) int64       atoms per structure
``pairs``              :class:`Pairs`              neighbour pairs (see above)
``n_structures``       python int                  number of structures (known on the
                                                   host, so forward never syncs)
``cell``               (n_structures, 3, 3) float  lattice vectors as rows (Angstrom);
                       or None                     zero rows for non-periodic directions;
                                                   ``None``: a batch of molecules
``pbc``                (n_structures, 3) bool      periodic directions; ``None`` as cell
                       or None
``targets``            dict name -> tensor         per-structure (n_structures, ...) or
                                                   per-atom (n_atoms, ...) reference
                                                   values, in internal units (eV,
                                                   eV/Angstrom, eV/Angstrom^3 for stress)
=====================  ==========================  ====================================

Which targets are per atom is declared by the dataset (``PackedDataset.per_atom``), never
guessed from array shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


def _move(t: torch.Tensor | None, device, dtype) -> torch.Tensor | None:
    if t is None:
        return None
    if dtype is not None and t.is_floating_point():
        return t.to(device=device, dtype=dtype, non_blocking=True)
    return t.to(device=device, non_blocking=True)


@dataclass
class Pairs:
    """Directed neighbour pairs ``i <- j`` with the periodic shift of each (see module doc)."""

    i: torch.Tensor
    j: torch.Tensor
    shifts: torch.Tensor | None = None
    symmetric: bool = True

    def __len__(self) -> int:
        return self.i.shape[0]

    @property
    def n_evaluated(self) -> int:
        """How many pairs a pair function is evaluated on: half of them if symmetric."""
        return self.i.shape[0] // 2 if self.symmetric else self.i.shape[0]

    def to(self, device=None, dtype=None) -> Pairs:
        return replace(
            self,
            i=_move(self.i, device, None),
            j=_move(self.j, device, None),
            shifts=_move(self.shifts, device, dtype),
        )

    @staticmethod
    def symmetric_from_half(
        i: torch.Tensor, j: torch.Tensor, shifts: torch.Tensor | None = None
    ) -> Pairs:
        """Each unordered pair once (i, j, shift) -> the symmetric layout with (j, i, -shift)."""
        both = None if shifts is None else torch.cat([shifts, -shifts])
        return Pairs(torch.cat([i, j]), torch.cat([j, i]), both, True)


@dataclass
class Batch:
    numbers: torch.Tensor
    positions: torch.Tensor
    structure_index: torch.Tensor
    n_atoms_per: torch.Tensor
    pairs: Pairs
    n_structures: int
    targets: dict[str, torch.Tensor] = field(default_factory=dict)
    cell: torch.Tensor | None = None
    pbc: torch.Tensor | None = None

    def to(self, device=None, dtype=None) -> Batch:
        """Move to a device; ``dtype`` applies to floating-point fields only."""
        return replace(
            self,
            numbers=_move(self.numbers, device, None),
            positions=_move(self.positions, device, dtype),
            structure_index=_move(self.structure_index, device, None),
            n_atoms_per=_move(self.n_atoms_per, device, None),
            pairs=self.pairs.to(device, dtype),
            cell=_move(self.cell, device, dtype),
            pbc=_move(self.pbc, device, None),
            targets={k: _move(v, device, dtype) for k, v in self.targets.items()},
        )

    @property
    def n_atoms(self) -> int:
        return self.numbers.shape[0]

    @property
    def periodic(self) -> bool:
        """Whether any structure of the batch is periodic (has a cell that pairs cross)."""
        return self.pbc is not None and bool(self.pbc.any())

    # the pair fields by their former names (read-only)
    @property
    def pair_i(self) -> torch.Tensor:
        return self.pairs.i

    @property
    def pair_j(self) -> torch.Tensor:
        return self.pairs.j

    @property
    def symmetric_pairs(self) -> bool:
        return self.pairs.symmetric

    def __len__(self) -> int:
        return self.n_structures
