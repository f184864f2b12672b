"""The dipole moment from latent atomic partial charges (SchNet, J. Chem. Phys. 148,
241722 (2018); SchNetPack's ``DipoleMoment``).

The atom-wise head predicts a latent charge ``p_i`` per atom; the charges are corrected so
that each molecule carries its total charge ``Q`` (0 for QM9), spreading the excess evenly:

    q_i  = p_i + (Q - sum_{j in m} p_j) / n_m                     (e)
    mu_m = c sum_{i in m} q_i r_i,     c = 4.80320... debye/(e Angstrom)
    |mu_m|                                                        (debye, as QM9 gives it)

The vector rotates with the molecule (the charges are invariant), and for a neutral molecule
it does not depend on the origin (``sum_i q_i t = Q t = 0``). Selected by
``ModelConfig.output = "dipole"``; training on the norm needs no dipole vectors in the data.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data.batch import Batch
from ..nn import scatter_sum
from ..units import E_ANGSTROM_DEBYE

#: name of the per-atom output (e) and of the dipole vector (debye, (n_structures, 3))
CHARGES, DIPOLE = "charges", "dipole"
#: optional per-structure target holding the total charge Q (e); 0 when absent
TOTAL_CHARGE = "total_charge"


class DipoleMoment(nn.Module):
    """Latent charges ``p_i`` -> corrected charges, dipole vector and its norm."""

    def forward(self, latent: torch.Tensor, batch: Batch, target: str) -> dict[str, torch.Tensor]:
        """``{target: |mu| (n_structures,), "dipole": mu (n_structures, 3), "charges": q,
        "atomic": q}``: ``latent`` (n_atoms,) in e; positions in Angstrom; mu in debye."""
        index, n = batch.structure_index, batch.n_structures
        total = batch.targets.get(TOTAL_CHARGE)
        total = torch.zeros(n, dtype=latent.dtype, device=latent.device) if total is None else total
        excess = (total.to(latent.dtype) - scatter_sum(latent, index, n)) / batch.n_atoms_per
        charges = latent + excess[index]
        dipole = scatter_sum(charges[:, None] * batch.positions, index, n) * E_ANGSTROM_DEBYE
        return {
            target: torch.linalg.vector_norm(dipole, dim=1),
            DIPOLE: dipole,
            CHARGES: charges,
            "atomic": charges,
        }
