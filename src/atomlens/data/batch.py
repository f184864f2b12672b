"""The one batch structure that flows through atomlens.

Every field, its shape and its unit is documented here and nowhere else.
``n_atoms`` is the total number of atoms in the batch, ``n_structures`` the number of
molecules and ``n_pairs`` the number of directed neighbour pairs.

=====================  ==========================  ====================================
field                  shape, dtype                meaning (unit)
=====================  ==========================  ====================================
``numbers``            (n_atoms,) int64            atomic numbers Z
``positions``          (n_atoms, 3) float          Cartesian positions (Angstrom)
``structure_index``    (n_atoms,) int64            which structure each atom belongs to
``n_atoms_per``        (n_structures,) int64       atoms per structure
``pair_i, pair_j``     (n_pairs,) int64            directed pairs i<-j within the cutoff
``symmetric_pairs``    python bool                 True: pairs [0:n/2] have i<j and
                                                   [n/2:n] are the same pairs reversed
``n_structures``       python int                  number of structures (known on the
                                                   host, so forward never syncs)
``targets``            dict name -> tensor         per-structure (n_structures,) or
                                                   per-atom (n_atoms, ...) reference
                                                   values, in the dataset's internal
                                                   units (eV, eV/Angstrom, ...)
=====================  ==========================  ====================================
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class Batch:
    numbers: torch.Tensor
    positions: torch.Tensor
    structure_index: torch.Tensor
    n_atoms_per: torch.Tensor
    pair_i: torch.Tensor
    pair_j: torch.Tensor
    n_structures: int
    targets: dict[str, torch.Tensor] = field(default_factory=dict)
    symmetric_pairs: bool = True

    def to(self, device=None, dtype=None) -> Batch:
        """Move to a device; ``dtype`` applies to floating-point fields only."""

        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype, non_blocking=True)
            return t.to(device=device, non_blocking=True)

        return replace(
            self,
            numbers=move(self.numbers),
            positions=move(self.positions),
            structure_index=move(self.structure_index),
            n_atoms_per=move(self.n_atoms_per),
            pair_i=move(self.pair_i),
            pair_j=move(self.pair_j),
            targets={k: move(v) for k, v in self.targets.items()},
        )

    @property
    def n_atoms(self) -> int:
        return self.numbers.shape[0]

    def __len__(self) -> int:
        return self.n_structures
