"""Local chemical potential Omega_A(r): the energy of a probe atom of type A placed at r.

Following the DTNN paper (Schütt et al., Nat. Commun. 8, 13890, 2017), a probe atom of
element A is put at r into the field of the molecule. The probe *receives* the messages of the
molecule's atoms in every interaction pass, but sends none, so the molecule's coefficient
vectors are those of the molecule alone:

    c_A^(0) = C_A,    c_A^(t+1) = c_A^(t) + sum_j v(c_j^(t), d(r, R_j))   (j: molecule atoms)
    Omega_A(r) = scale * head(c_A^(T)) + shift + atomref[A]                    (eV)

Equivalently, Omega_A(r) = E(molecule + probe, probe -> molecule messages removed) - E(molecule).

All probe positions go into one batch: the molecule's atoms, then the probes, with the
molecule's own pairs plus the directed pairs probe <- atom (``symmetric_pairs=False``; no
probe -> atom and no probe - probe pairs). Thousands of grid points are evaluated in one
vectorised forward pass, chunked to bound memory.

``reference`` chooses the zero of the energy scale:

* ``"none"``: Omega_A(r) as above (includes the element reference atomref[A] and the shift);
* ``"atomref"``: Omega_A(r) - atomref[A];
* ``"isolated"``: Omega_A(r) - Omega_A(infinity), the probe's interaction energy with the
  molecule (zero beyond the cutoff; the isolated probe atom is one model evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from ase.data import atomic_numbers
from tqdm.auto import tqdm

from ..data.batch import Pairs
from ..data.neighbors import molecular_pairs
from ..models.inference import model_device_dtype
from ..models.potential import AtomisticModel

REFERENCES = ("none", "atomref", "isolated")
PLANES = ("xy", "xz", "yz", "principal")


def _probe_number(probe: str | int) -> int:
    if isinstance(probe, (int, np.integer)):
        return int(probe)
    try:
        return atomic_numbers[probe]
    except KeyError:
        raise ValueError(f"probe {probe!r} is not an element symbol (C, H, N, O, ...)") from None


@torch.no_grad()
def probe_energies(
    model: AtomisticModel,
    atoms,
    points: np.ndarray,
    probe: str | int = "C",
    reference: str = "none",
    chunk_size: int = 2048,
) -> np.ndarray:
    """Omega_A(r) (eV) at ``points`` (..., 3) Angstrom for the molecule ``atoms``.

    Returns an array of the shape of ``points`` without its last axis.
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, not {reference!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 probe points, not {chunk_size}")
    z_probe = _probe_number(probe)
    device, dtype = model_device_dtype(model)
    points = np.asarray(points, dtype=np.float64)
    shape = points.shape[:-1]
    flat = torch.as_tensor(points.reshape(-1, 3), dtype=dtype, device=device)
    numbers = torch.as_tensor(atoms.get_atomic_numbers(), dtype=torch.int64, device=device)
    positions = torch.as_tensor(atoms.get_positions(), dtype=dtype, device=device)
    n = numbers.shape[0]
    cutoff = model.cutoff
    mol_i, mol_j = molecular_pairs(torch.tensor([n], device=device), positions, cutoff)
    out = []
    for start in tqdm(
        range(0, flat.shape[0], chunk_size),
        desc="potential map",
        unit="chunk",
        leave=False,
        disable=None,
    ):
        probes = flat[start : start + chunk_size]
        m = probes.shape[0]
        # every (probe, atom) pair within the cutoff, probe <- atom only
        p_idx, a_idx = torch.meshgrid(
            torch.arange(m, device=device), torch.arange(n, device=device), indexing="ij"
        )
        p_idx, a_idx = p_idx.reshape(-1), a_idx.reshape(-1)
        if cutoff is not None:
            near = (probes[p_idx] - positions[a_idx]).pow(2).sum(-1) < cutoff * cutoff
            p_idx, a_idx = p_idx[near], a_idx[near]
        all_numbers = torch.cat([numbers, numbers.new_full((m,), z_probe)])
        all_positions = torch.cat([positions, probes])
        pairs = Pairs(
            torch.cat([mol_i, p_idx + n]), torch.cat([mol_j, a_idx]), None, symmetric=False
        )
        out.append(model.atomic_energies(all_numbers, all_positions, pairs)[n:])
    omega = torch.cat(out).double().cpu().numpy() if out else np.zeros(0)
    if reference == "atomref":
        omega = omega - float(model.atomref[z_probe])
    elif reference == "isolated":
        omega = omega - isolated_atom_energy(model, z_probe)
    return omega.reshape(shape)


@torch.no_grad()
def isolated_atom_energy(model: AtomisticModel, z: int) -> float:
    """The model's energy of a lone atom of element ``z`` (eV): Omega_A far from everything."""
    device, dtype = model_device_dtype(model)
    numbers = torch.tensor([z], device=device)
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    positions = torch.zeros(1, 3, dtype=dtype, device=device)
    return float(model.atomic_energies(numbers, positions, Pairs(empty, empty, None, False))[0])


@dataclass
class PotentialMap:
    """Omega_A on a grid. ``points`` has shape ``values.shape + (3,)`` (Angstrom)."""

    values: np.ndarray  # eV, (n1, n2) for a plane or (nx, ny, nz) for a box
    points: np.ndarray
    probe: str
    reference: str
    origin: np.ndarray  # (3,) first grid point, Angstrom
    axes: np.ndarray  # (k, 3) grid step vectors (Angstrom), k = values.ndim
    atoms: object = None

    @property
    def spacing(self) -> float:
        return float(np.linalg.norm(self.axes[0]))


def plane_axes(atoms, plane: str = "principal") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two orthonormal in-plane directions and the normal for ``plane``.

    ``"principal"`` is the plane of the two largest principal axes of the atom positions (the
    molecular plane of a flat molecule).
    """
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {PLANES}, not {plane!r}")
    if plane == "principal":
        pos = atoms.get_positions()
        centred = pos - pos.mean(0)
        if len(pos) < 3:
            u, v, w = np.eye(3)
        else:
            _, _, vt = np.linalg.svd(centred, full_matrices=True)
            u, v = vt[0], vt[1]
            w = np.cross(u, v)
        return u, v, w
    e = np.eye(3)
    a, b = {"xy": (0, 1), "xz": (0, 2), "yz": (1, 2)}[plane]
    return e[a], e[b], np.cross(e[a], e[b])


#: the most probe positions a map may have (each is one model evaluation)
MAX_GRID_POINTS = 1_000_000


def _check_grid_size(extent, spacing: float) -> None:
    """Refuse a spacing that is not positive, or whose grid over ``extent`` (Angstrom per
    axis) would exceed :data:`MAX_GRID_POINTS` (tens of GB and hours of model calls)."""
    if not (np.isfinite(spacing) and spacing > 0):
        raise ValueError(f"the grid spacing must be a positive number of Angstrom, not {spacing}")
    n = float(np.prod([np.floor(e / spacing) + 1 for e in extent]))
    if n > MAX_GRID_POINTS:
        raise ValueError(
            f"a grid spacing of {spacing:g} Angstrom gives {n:.3g} grid points, "
            f"more than {MAX_GRID_POINTS:,}; choose a larger spacing"
        )


def plane_grid(
    atoms, plane: str = "principal", spacing: float = 0.1, padding: float = 3.0, height: float = 0.0
):
    """Grid points on a plane through the atoms' centroid (shifted ``height`` along its normal).

    Returns ``points (n1, n2, 3)``, ``origin (3,)`` and the step vectors ``(2, 3)``.
    """
    u, v, w = plane_axes(atoms, plane)
    pos = atoms.get_positions()
    centre = pos.mean(0) + height * w
    s, t = (pos - centre) @ u, (pos - centre) @ v
    _check_grid_size([s.max() - s.min() + 2 * padding, t.max() - t.min() + 2 * padding], spacing)
    s_axis = np.arange(s.min() - padding, s.max() + padding + 1e-9, spacing)
    t_axis = np.arange(t.min() - padding, t.max() + padding + 1e-9, spacing)
    points = centre + s_axis[:, None, None] * u + t_axis[None, :, None] * v
    return points, points[0, 0].copy(), np.stack([u * spacing, v * spacing])


def box_grid(atoms, spacing: float = 0.2, padding: float = 3.0):
    """Cartesian grid around the atoms: ``points (nx, ny, nz, 3)``, ``origin``, step vectors."""
    pos = atoms.get_positions()
    lo, hi = pos.min(0) - padding, pos.max(0) + padding
    _check_grid_size(hi - lo, spacing)
    axes = [np.arange(lo[k], hi[k] + 1e-9, spacing) for k in range(3)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    return points, points[0, 0, 0].copy(), np.eye(3) * spacing


def potential_map(
    model: AtomisticModel,
    atoms,
    probe: str = "C",
    plane: str | None = "principal",
    grid: np.ndarray | None = None,
    spacing: float = 0.1,
    padding: float = 3.0,
    height: float = 0.0,
    reference: str = "none",
    chunk_size: int = 2048,
    allow_unknown_elements: bool = False,
    source: str = "potential map",
) -> PotentialMap:
    """Omega_A on a plane (``plane`` = xy, xz, yz or principal), a 3D box (``plane=None``) or
    on given ``grid`` points (..., 3). A probe or an atom of an element absent from the
    model's training data is refused (a warning with ``allow_unknown_elements``), as are
    periodic cells (the probe would need the cell's images) and structures that no model
    call accepts (non-finite or overlapping atoms); errors name ``source``."""
    from ..data.dataset import dataset_from_atoms
    from ..models.guards import check_elements, require_extensive_energy

    require_extensive_energy(model, "local chemical potentials (probe energies)")
    if atoms.pbc.any():
        raise ValueError(
            f"{source}: a periodic cell; the potential map is for molecules (the probe "
            f"would see none of the cell's periodic images)"
        )
    if not (np.isfinite(padding) and padding >= 0 and np.isfinite(height)):
        raise ValueError(
            f"padding must be finite and >= 0 Angstrom and height finite, not {padding}, {height}"
        )
    dataset_from_atoms([atoms], source=source, targets=False)  # finite, no overlapping atoms
    numbers = [*atoms.get_atomic_numbers().tolist(), _probe_number(probe)]
    check_elements(model, numbers, allow_unknown_elements, f"potential map ({probe} probe)")
    if grid is not None:
        points = np.asarray(grid, dtype=np.float64)
        origin, axes = points.reshape(-1, 3)[0], np.zeros((points.ndim - 1, 3))
    elif plane is None:
        points, origin, axes = box_grid(atoms, spacing, padding)
    else:
        points, origin, axes = plane_grid(atoms, plane, spacing, padding, height)
    values = probe_energies(model, atoms, points, probe, reference, chunk_size)
    return PotentialMap(values, points, str(probe), reference, origin, axes, atoms)
