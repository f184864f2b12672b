"""Ab initio molecular dynamics with any ASE calculator, for making new reference data.

The default level of theory is GFN2-xTB (``tblite``); PySCF DFT is available when PySCF is
installed. Frames are sampled from Langevin dynamics (:class:`ase.md.langevin.Langevin`)
started from Maxwell-Boltzmann velocities; each stored frame records the calculator's
energy (eV) and raw forces (eV/Angstrom, without constraints), so ``F = -dE/dR`` holds for
the stored data. Periodic start structures are sampled with their cell and the stress of
every frame (GFN1-xTB handles periodic cells); :func:`sample_cells` samples several
randomly strained copies of a cell, so that a model sees the energy's volume dependence.
:func:`sample_isomers` makes ISO17-style sets (reference, test_within, test_other); the
results are written with :func:`~atomlens.data.sources.md17.write_md17`,
:func:`~atomlens.data.sources.iso17.write_iso17` or (cells) ``write_ase`` as extxyz.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from tqdm.auto import tqdm

from .._optional import MissingExtra, require
from ..units import BOHR_ANGSTROM, HARTREE_EV
from .dataset import DataError, PackedDataset


def _thread_limit(threads: int | None):
    """Limit OpenMP/BLAS threads within the block (threadpoolctl, if installed)."""
    if threads is None or importlib.util.find_spec("threadpoolctl") is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads)


def make_calculator(
    method: str = "gfn2",
    charge: int = 0,
    multiplicity: int = 1,
    electronic_temperature: float = 300.0,
    accuracy: float = 1.0,
    xc: str = "PBE",
    basis: str = "def2-SVP",
):
    """An ASE calculator for ``method``.

    Args:
        method: ``"gfn2"`` (GFN2-xTB, default), ``"gfn1"`` (GFN1-xTB), both via
            ``tblite.ase.TBLite``; or ``"pyscf"`` (Kohn-Sham DFT, needs ``pip install pyscf``).
        charge, multiplicity: total charge (e) and spin multiplicity 2S+1.
        electronic_temperature: Fermi smearing of xTB (K).
        accuracy: xTB numerical accuracy (smaller is tighter).
        xc, basis: functional and basis set for PySCF.
    """
    method = method.lower()
    if method in ("gfn2", "gfn2-xtb", "gfn1", "gfn1-xtb"):
        require("tblite.ase", f"the {method} calculator")
        from tblite.ase import TBLite

        name = "GFN2-xTB" if method.startswith("gfn2") else "GFN1-xTB"
        return TBLite(
            method=name,
            charge=charge,
            multiplicity=multiplicity,
            electronic_temperature=electronic_temperature,
            accuracy=accuracy,
            max_iterations=250,
            verbosity=0,
        )
    if method == "pyscf":
        if importlib.util.find_spec("pyscf") is None:
            raise MissingExtra(  # no extra of its own: a large package for one method
                "method='pyscf' needs PySCF, which is not installed: pip install pyscf",
                name="pyscf",
            )
        return PySCFCalculator(xc=xc, basis=basis, charge=charge, spin=multiplicity - 1)
    raise ValueError(f"unknown method {method!r}; choose 'gfn2', 'gfn1' or 'pyscf'")


class PySCFCalculator(Calculator):
    """Kohn-Sham DFT with PySCF as an ASE calculator: energy (eV), forces (eV/Angstrom).

    Restricted for ``spin=0`` (number of unpaired electrons), unrestricted otherwise.
    """

    implemented_properties: ClassVar[list[str]] = ["energy", "forces"]

    def __init__(
        self, xc: str = "PBE", basis: str = "def2-SVP", charge: int = 0, spin: int = 0, **kwargs
    ):
        super().__init__(**kwargs)
        self.xc, self.basis, self.charge, self.spin = xc, basis, charge, spin

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        from pyscf import dft, gto

        super().calculate(atoms, properties, system_changes)
        mol = gto.M(
            atom=list(zip(self.atoms.get_chemical_symbols(), self.atoms.positions.tolist())),
            unit="Angstrom",
            basis=self.basis,
            charge=self.charge,
            spin=self.spin,
            verbose=0,
        )
        mf = (dft.RKS if self.spin == 0 else dft.UKS)(mol)
        mf.xc = self.xc
        energy = mf.kernel()  # hartree
        if not mf.converged:
            raise RuntimeError("PySCF SCF did not converge")
        gradient = mf.nuc_grad_method().kernel()  # hartree/bohr
        self.results["energy"] = energy * HARTREE_EV
        self.results["forces"] = -gradient * HARTREE_EV / BOHR_ANGSTROM


def molecule_from_smiles(smiles: str, seed: int = 0):
    """An :class:`ase.Atoms` with hydrogens from RDKit ETKDGv3 embedding + MMFF94 (Angstrom)."""
    from ase import Atoms

    require("rdkit.Chem", "a structure from SMILES")
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise DataError(f"cannot parse SMILES {smiles!r}")
    mol = Chem.AddHs(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed)
    if AllChem.EmbedMolecule(mol, params) != 0:
        raise DataError(f"RDKit could not embed a 3D structure for {smiles!r}")
    if AllChem.MMFFHasAllMoleculeParams(mol):
        AllChem.MMFFOptimizeMolecule(mol, maxIters=2000)
    numbers = [atom.GetAtomicNum() for atom in mol.GetAtoms()]
    atoms = Atoms(numbers=numbers, positions=mol.GetConformer().GetPositions())
    atoms.info["smiles"] = smiles
    return atoms


#: the three sets of :func:`sample_isomers`, as ISO17's files name them
ISO17_SETS = ("reference", "test_within", "test_other")
#: the heaviest element GFN1- and GFN2-xTB are parametrised for (Rn)
XTB_MAX_Z = 86


def check_start_structure(atoms, method: str, source: str) -> None:
    """Refuse a start structure no calculation should see, naming ``source``: unknown
    elements, non-finite coordinates, overlapping atoms, bad cells (the checks of
    :func:`~atomlens.data.dataset.dataset_from_atoms`), and elements beyond xTB's
    parametrisation; the quantum codes fail on them with obscure errors, or after hours."""
    from .dataset import dataset_from_atoms

    dataset_from_atoms([atoms], source=source, targets=False)
    heaviest = int(atoms.numbers.max())
    if method.lower().startswith("gfn") and heaviest > XTB_MAX_Z:
        raise DataError(
            f"{source}: element Z={heaviest} is beyond GFN-xTB's parametrisation "
            f"(Z <= {XTB_MAX_Z}); use the pyscf method"
        )


def relax(atoms, calculator, fmax: float = 0.005, steps: int = 1000):
    """A copy of ``atoms`` relaxed with BFGS until the largest force is below ``fmax`` (eV/A)."""
    from ase.optimize import BFGS

    atoms = atoms.copy()
    atoms.calc = calculator
    BFGS(atoms, logfile=None).run(fmax=fmax, steps=steps)
    return atoms


def sample_md(
    atoms,
    calculator,
    temperature: float = 500.0,
    n_frames: int = 100,
    every: int = 5,
    timestep_fs: float = 0.5,
    equilibration_fs: float = 0.0,
    friction: float = 0.01,
    seed: int = 0,
    fix_com: bool = True,
    threads: int | None = 1,
) -> PackedDataset:
    """Langevin molecular dynamics; one frame every ``every`` steps after equilibration.

    Args:
        atoms: start structure (Angstrom); not modified.
        calculator: any ASE calculator returning energy (eV) and forces (eV/Angstrom).
        temperature: thermostat and initial Maxwell-Boltzmann temperature (K).
        n_frames: frames to store.
        every: MD steps between stored frames.
        timestep_fs: time step (fs).
        equilibration_fs: simulated time discarded before the first frame (fs).
        friction: Langevin friction (1/fs).
        seed: seeds the velocities and the thermostat noise.
        fix_com: keep the centre of mass fixed (:class:`ase.constraints.FixCom`).
        threads: OpenMP threads for the calculator while sampling (``None``: leave as is).
            One is fastest for small molecules, and avoids OpenMP spin-waiting on a busy
            machine.

    Returns:
        Targets ``energy`` (eV) and ``forces`` (eV/Angstrom, raw calculator forces), and for
        periodic ``atoms`` ``stress`` (eV/Angstrom^3) with the cell; extras ``frame``; the
        protocol in ``meta``.
    """
    from ase import units as ase_units
    from ase.md import velocitydistribution as velocities
    from ase.md.langevin import Langevin

    from ..md import draw_momenta

    if n_frames < 1 or every < 1:
        raise ValueError("n_frames and every must be at least 1")
    if not (
        np.isfinite([temperature, timestep_fs, friction, equilibration_fs]).all()
        and timestep_fs > 0
        and min(temperature, friction, equilibration_fs) >= 0
    ):
        raise ValueError(
            f"need finite timestep_fs > 0 and temperature, friction, equilibration_fs >= 0, "
            f"not {timestep_fs}, {temperature}, {friction}, {equilibration_fs}"
        )
    from ase.constraints import FixCom

    atoms = atoms.copy()
    atoms.calc = calculator
    periodic = bool(atoms.pbc.any())
    if periodic and not atoms.pbc.all():
        raise DataError(
            "sampling supports molecules and cells periodic in all three "
            f"directions, not pbc={atoms.pbc.tolist()}"
        )
    if periodic and "stress" not in getattr(calculator, "implemented_properties", ()):
        raise DataError(
            f"{type(calculator).__name__} gives no stress for periodic cells; "
            "use method='gfn1' (GFN1-xTB)"
        )
    if fix_com:
        atoms.set_constraint(FixCom())
    rng = np.random.default_rng(seed)
    draw_momenta(atoms, temperature, rng)
    velocities.Stationary(atoms)
    if not periodic:  # no angular momentum in a periodic cell
        velocities.ZeroRotation(atoms)
    dynamics = Langevin(
        atoms,
        timestep_fs * ase_units.fs,
        temperature_K=temperature,
        friction=friction / ase_units.fs,
        fixcm=False,
        rng=rng,
    )
    equilibration_steps = round(equilibration_fs / timestep_fs)
    meta = {
        "temperature_K": temperature,
        "timestep_fs": timestep_fs,
        "every_steps": every,
        "equilibration_fs": equilibration_fs,
        "friction_per_fs": friction,
        "seed": seed,
        "thermostat": "Langevin (ase.md.langevin)"
        + (", centre of mass fixed (FixCom)" if fix_com else ""),
        "calculator": type(calculator).__name__,
    }
    structures, energies, forces, stresses = [], [], [], []
    bar = tqdm(
        total=equilibration_steps + n_frames * every, desc="sample MD", unit="step", disable=None
    )
    dynamics.attach(lambda: bar.update(1) if dynamics.nsteps else None, interval=1)
    try:
        with _thread_limit(threads), bar:
            if equilibration_steps:
                dynamics.run(equilibration_steps)
            for _ in range(n_frames):
                dynamics.run(every)
                # the frame's values first, then stored together (a Ctrl-C between them
                # leaves no half frame)
                frame = (atoms.numbers.copy(), atoms.positions.copy())
                energy = atoms.get_potential_energy()
                # raw calculator forces (without FixCom), so that F = -dE/dR holds
                force = atoms.get_forces(apply_constraint=False).copy()
                stress = atoms.get_stress(voigt=False).copy() if periodic else None
                structures.append(frame)
                energies.append(energy)
                forces.append(force)
                if periodic:
                    stresses.append(stress)
    except KeyboardInterrupt:
        if not energies:
            raise
        partial = _sampled(atoms, structures, energies, forces, stresses, meta)
        raise SamplingInterrupted(partial) from None
    return _sampled(atoms, structures, energies, forces, stresses, meta)


class SamplingInterrupted(KeyboardInterrupt):
    """A Ctrl-C during :func:`sample_md`: ``partial`` holds the frames sampled before it
    (a :class:`PackedDataset`; their quantum-chemistry values cost hours)."""

    def __init__(self, partial: PackedDataset):
        super().__init__(f"interrupted after {len(partial)} sampled frames")
        self.partial = partial


def _interrupted(stop: KeyboardInterrupt, parts: list, extra: str, k: int):
    """Raise a Ctrl-C in run ``k`` of several (a cell, an isomer) on as a
    :class:`SamplingInterrupted` holding the finished runs' ``parts`` and run ``k``'s frames
    so far (its extra ``extra`` set to ``k``); with none, the Ctrl-C as it came."""
    if isinstance(stop, SamplingInterrupted):
        stop.partial.extras[extra] = np.full(len(stop.partial), k)
        parts.append(stop.partial)
    if not parts:
        raise stop
    raise SamplingInterrupted(PackedDataset.concatenate(parts)) from None


def _sampled(atoms, structures, energies, forces, stresses, meta: dict) -> PackedDataset:
    """The data set of the frames :func:`sample_md` stored (``meta``: its settings)."""
    periodic = bool(atoms.pbc.any())
    n_frames = len(energies)
    extras = {"frame": np.arange(n_frames)}
    if "smiles" in atoms.info:
        extras["smiles"] = [atoms.info["smiles"]] * n_frames
    targets = {"energy": energies, "forces": forces}
    target_units = {"energy": "eV", "forces": "eV/Angstrom"}
    if periodic:
        targets["stress"], target_units["stress"] = stresses, "eV/Angstrom^3"
    return PackedDataset.from_structures(
        structures,
        targets,
        target_units,
        extras,
        meta,
        source="sample_md",
        per_atom=["forces"],
        cells=[atoms.cell.array] * n_frames if periodic else None,
        pbc=[atoms.pbc] * n_frames if periodic else None,
    )


def sample_cells(
    atoms, calculator, n_cells: int = 4, strain: float = 0.02, seed: int = 0, **md
) -> PackedDataset:
    """MD of ``n_cells`` randomly strained copies of a periodic cell, concatenated.

    Copy ``k`` has its cell (and atoms) deformed by ``1 + eps``, eps a random symmetric
    matrix with entries of standard deviation ``strain`` (the first copy is unstrained), and
    is sampled by :func:`sample_md` with seed ``seed + k`` and the options ``md``; the
    frames are split evenly. Extras: ``cell_index``.
    """
    if not atoms.pbc.all():
        raise DataError("sample_cells needs a cell periodic in all three directions")
    if n_cells < 1:
        raise ValueError("n_cells must be at least 1")
    n_frames = md.pop("n_frames", 100)
    if n_frames < n_cells:
        raise ValueError(
            f"{n_frames} frames for {n_cells} cells: every cell needs at least one frame"
        )
    rng = np.random.default_rng(seed)
    parts = []
    for k in range(n_cells):
        copy = atoms.copy()
        if k:
            eps = rng.normal(scale=strain, size=(3, 3))
            copy.set_cell(atoms.cell.array @ (np.eye(3) + 0.5 * (eps + eps.T)), scale_atoms=True)
        # the frames asked for, in all: the remainder to the first cells (n_frames //
        # n_cells each had stored 999 of 1,000 frames over 3 cells, 2 of 3 over 2)
        share = n_frames // n_cells + (k < n_frames % n_cells)
        try:
            frames = sample_md(copy, calculator, n_frames=share, seed=seed + k, **md)
        except KeyboardInterrupt as stop:  # the finished cells' frames and this one's so far
            _interrupted(stop, parts, "cell_index", k)
        frames.extras["cell_index"] = np.full(len(frames), k)
        parts.append(frames)
    return PackedDataset.concatenate(parts)


def sample_isomers(
    smiles_list: Sequence[str],
    n_reference_isomers: int | None = None,
    train_fraction: float = 0.8,
    method: str = "gfn2",
    relax_fmax: float | None = None,
    seed: int = 0,
    **md,
) -> dict[str, PackedDataset]:
    """ISO17-style sets: MD of each isomer, split into known and unseen conformations/isomers.

    The first ``n_reference_isomers`` isomers (default: 80% of them, at least one) are
    sampled; the first ``train_fraction`` of each trajectory goes to ``reference``, the rest
    to ``test_within`` (same isomers, later conformations). All frames of the remaining
    isomers go to ``test_other`` (absent when every isomer is a reference isomer).
    Isomer ``k`` starts from ``molecule_from_smiles(smiles, seed + k)`` and MD seed
    ``seed + k``; ``md`` goes to :func:`sample_md`. Extras: ``isomer``, ``smiles``, ``frame``.
    """
    if not smiles_list:
        raise ValueError("sample_isomers needs at least one SMILES")
    n_isomers = len(smiles_list)
    if n_reference_isomers is None:
        n_reference_isomers = max(1, round(0.8 * n_isomers))
    if not 1 <= n_reference_isomers <= n_isomers:
        raise ValueError(f"n_reference_isomers={n_reference_isomers} must be 1..{n_isomers}")
    sets: dict[str, list[PackedDataset]] = {name: [] for name in ISO17_SETS}
    sampled: list[PackedDataset] = []  # every isomer's frames, for an interrupt
    for k, smiles in enumerate(smiles_list):
        calculator = make_calculator(method)
        atoms = molecule_from_smiles(smiles, seed=seed + k)
        if relax_fmax is not None:
            atoms = relax(atoms, calculator, fmax=relax_fmax)
        try:
            frames = sample_md(atoms, calculator, seed=seed + k, **md)
        except KeyboardInterrupt as stop:  # the isomers sampled so far, unsplit
            _interrupted(stop, sampled, "isomer", k)
        frames.extras["isomer"] = np.full(len(frames), k)
        sampled.append(frames)
        if k < n_reference_isomers:
            cut = round(train_fraction * len(frames))
            if not 0 < cut < len(frames):
                raise ValueError(
                    f"train_fraction={train_fraction} leaves an empty part of {len(frames)} frames"
                )
            sets["reference"].append(frames.subset(np.arange(cut)))
            sets["test_within"].append(frames.subset(np.arange(cut, len(frames))))
        else:
            sets["test_other"].append(frames)
    return {name: PackedDataset.concatenate(parts) for name, parts in sets.items() if parts}
