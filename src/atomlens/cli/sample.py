"""``atomlens sample``: new reference data by ab initio molecular dynamics.

A thin layer over :mod:`atomlens.data.sampling` and the writers in
:mod:`atomlens.data.sources`. Examples::

    atomlens sample --smiles CCO --frames 1000 --out ethanol.npz
    atomlens sample --xyz start.xyz --temperature 300 --frames 200 --out traj.db
    atomlens sample --isomers CCOC=O COCC=O OCCC=O --frames 300 --out iso_sets/
    atomlens sample --xyz si64.extxyz --method gfn1 --cells 4 --strain 0.02 --out si.extxyz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from ._common import check_numbers


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``sample`` subcommand on ``subparsers`` (from ``add_subparsers``)."""
    parser = subparsers.add_parser(
        "sample",
        help="sample reference data by ab initio MD (GFN2-xTB by default)",
        description="Langevin MD with an ab initio calculator; energies (eV) and forces "
        "(eV/Angstrom) of every stored frame are written as an MD17 .npz "
        "(kcal/mol, Angstrom, units recorded), an ISO17-layout ASE .db (eV) or extxyz "
        "(eV, Angstrom; the format for periodic cells, with cell and stress). A "
        "start structure with a cell is sampled with its cell (GFN1-xTB). "
        "With --isomers, --out is a folder that receives ISO17-style "
        "reference.db, test_within.db and test_other.db.",
    )
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--xyz", help="start structure: any file ASE reads (first frame)")
    start.add_argument("--smiles", help="start structure from SMILES (RDKit ETKDG + MMFF)")
    start.add_argument(
        "--isomers", nargs="+", metavar="SMILES", help="ISO17-style sets from several isomers"
    )
    parser.add_argument("--temperature", type=float, default=500.0, help="K (default 500)")
    parser.add_argument(
        "--frames",
        type=int,
        default=1000,
        help="frames to store (per isomer with --isomers; default 1000)",
    )
    parser.add_argument("--every", type=int, default=5, help="MD steps between frames (5)")
    parser.add_argument("--timestep", type=float, default=0.5, help="time step, fs (0.5)")
    parser.add_argument(
        "--equilibration",
        type=float,
        default=1000.0,
        help="discarded equilibration time, fs (1000)",
    )
    parser.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs")
    parser.add_argument(
        "--method",
        default=None,
        choices=["gfn2", "gfn1", "pyscf"],
        help="level of theory (default: gfn2, GFN2-xTB via tblite, for "
        "molecules; gfn1, GFN1-xTB, for periodic cells; pyscf needs PySCF)",
    )
    parser.add_argument(
        "--relax",
        type=float,
        default=None,
        metavar="FMAX",
        help="relax the start structure first, to FMAX eV/Angstrom",
    )
    parser.add_argument(
        "--reference-isomers",
        type=int,
        default=None,
        help="isomers in reference/test_within (default 80%%)",
    )
    parser.add_argument(
        "--cells",
        type=int,
        default=1,
        help="periodic start: sample this many randomly strained copies of "
        "the cell (default 1: the cell as given)",
    )
    parser.add_argument(
        "--strain",
        type=float,
        default=None,
        help="standard deviation of the random strain with --cells (0.02)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument(
        "--out", required=True, help="out.npz | out.db | out.extxyz | folder (--isomers)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out (refused without it: a sampled set costs hours)",
    )
    parser.set_defaults(func=run)
    return parser


#: the range of each numeric option (:func:`~atomlens.cli._common.check_numbers`)
OPTION_RANGES = {
    "--temperature": ">= 0",
    "--frames": ">= 1",
    "--every": ">= 1",
    "--timestep": "> 0",
    "--equilibration": ">= 0",
    "--friction": ">= 0",
    "--relax": "> 0",
    "--reference-isomers": ">= 1",
    "--cells": ">= 1",
    "--strain": ">= 0",
    "--seed": ">= 0",
}


def run(args: argparse.Namespace) -> int:
    """Run the sampling described by ``args``; returns the exit status."""
    from ..data.dataset import DataError
    from ..data.sampling import (
        ISO17_SETS,
        SamplingInterrupted,
        check_start_structure,
        make_calculator,
        molecule_from_smiles,
        relax,
        sample_cells,
        sample_isomers,
        sample_md,
    )
    from ..data.sources.ase_files import read_structures
    from ..data.sources.iso17 import write_iso17
    from ..fileio import check_output_folder, check_outputs

    check_numbers(args, OPTION_RANGES)
    md = {
        "temperature": args.temperature,
        "n_frames": args.frames,
        "every": args.every,
        "timestep_fs": args.timestep,
        "equilibration_fs": args.equilibration,
        "friction": args.friction,
    }
    out = Path(args.out)
    if args.isomers:
        check_output_folder(out)
        existing = [out / f"{name}.db" for name in ISO17_SETS]
    else:
        check_outputs({"--out": out}, [args.xyz] if args.xyz else [])
        existing = [out]
    existing = [path for path in existing if path.exists()]
    if existing and not args.overwrite:  # quantum-chemistry frames are never lost silently
        raise FileExistsError(
            f"--out {out}: {existing[0]} exists (a sampled set); pass --overwrite to "
            f"replace it, or name another output"
        )
    if args.isomers:
        args.method = args.method or "gfn2"
        if args.cells != 1 or args.strain is not None:  # they would be ignored
            raise ValueError(
                "--cells and --strain sample strained copies of a periodic cell; --isomers "
                "samples molecules: leave them out"
            )
        if out.suffix:
            raise DataError(f"--out {out}: with --isomers give a folder for the three sets")
        if args.reference_isomers is not None and args.reference_isomers > len(args.isomers):
            raise ValueError(
                f"--reference-isomers must be at most the {len(args.isomers)} isomers given, "
                f"not {args.reference_isomers}"
            )
        try:
            sets = sample_isomers(
                args.isomers,
                args.reference_isomers,
                method=args.method,
                relax_fmax=args.relax,
                seed=args.seed,
                **md,
            )
        except SamplingInterrupted as stop:  # the isomers' frames so far, not yet split
            out.mkdir(parents=True, exist_ok=True)
            _keep_partial(
                stop.partial,
                out / "sampled.db",
                write_iso17,
                " (all isomers so far, not split into the three sets)",
            )
        for name, data in sets.items():
            write_iso17(out / f"{name}.db", data)
            print(f"{out / f'{name}.db'}: {len(data)} frames")
        return 0
    if out.suffix not in (".npz", ".db", ".extxyz"):
        raise DataError(f"--out {out}: use .npz (MD17 layout), .db (ISO17 layout) or .extxyz")
    if args.smiles is not None:
        if not args.smiles.strip():
            raise ValueError("--smiles is empty: give a molecule's SMILES (e.g. CCO)")
        atoms = molecule_from_smiles(args.smiles, seed=args.seed)
    else:
        atoms = read_structures(args.xyz, 0)[0]
    periodic = bool(atoms.pbc.any())
    if periodic and out.suffix != ".extxyz":
        raise DataError(
            f"--out {out}: the start structure is periodic; write its cells "
            f"and stress to an .extxyz file"
        )
    if not periodic and args.cells > 1:
        raise ValueError(
            f"--cells {args.cells}: strained copies are of a periodic cell; the start "
            f"structure is a molecule (sample it with MD alone, without --cells)"
        )
    if args.strain is not None and args.cells == 1:  # it would be ignored without a word
        raise ValueError(
            f"--strain {args.strain} sets the strain of the copies of --cells N (N > 1); "
            f"give --cells too, or leave --strain out"
        )
    if args.reference_isomers is not None:
        raise ValueError("--reference-isomers splits the isomers of --isomers; give those too")
    if args.method is None:  # GFN1-xTB gives the stress of periodic cells
        args.method = "gfn1" if periodic else "gfn2"
    check_start_structure(atoms, args.method, args.xyz or f"--smiles {args.smiles}")
    calculator = make_calculator(args.method)
    atoms.calc = None
    if args.relax is not None:
        atoms = relax(atoms, calculator, fmax=args.relax)
    try:
        if periodic and args.cells > 1:
            data = sample_cells(
                atoms,
                calculator,
                n_cells=args.cells,
                strain=0.02 if args.strain is None else args.strain,
                seed=args.seed,
                **md,
            )
        else:
            data = sample_md(atoms, calculator, seed=args.seed, **md)
    except SamplingInterrupted as stop:  # the frames sampled so far cost hours: kept
        _keep_partial(
            stop.partial,
            out,
            lambda path, data: _write(path, data, args),
            " (a whole data set; sample more into another file and train on both)",
        )
    _write(out, data, args)
    energy = data.targets["energy"]
    print(
        f"{out}: {len(data)} frames of {int(data.n_atoms_per[0])} atoms, "
        f"energy {energy.min():.4f} .. {energy.max():.4f} eV"
    )
    return 0


def _keep_partial(data, out: Path, write, note: str) -> NoReturn:
    """After a Ctrl-C: ``write(path, data)`` the frames sampled so far to
    ``OUT.partial.SUFFIX`` (``OUT.partial-K.SUFFIX`` where an earlier interrupt's frames
    are: they stay), say where, and go on with the interrupt."""
    partial, k = out.with_name(f"{out.stem}.partial{out.suffix}"), 1
    while partial.exists():
        partial, k = out.with_name(f"{out.stem}.partial-{k}{out.suffix}"), k + 1
    write(partial, data)
    print(
        f"atomlens sample: the {len(data)} frames sampled before the interrupt are in "
        f"{partial}{note}",
        file=sys.stderr,
    )
    raise KeyboardInterrupt


def _write(out: Path, data, args) -> None:
    """The sampled ``data`` as ``out``'s format says (extxyz, MD17 npz or ISO17 db)."""
    from ..data.sources.ase_files import write_ase
    from ..data.sources.iso17 import write_iso17
    from ..data.sources.md17 import write_md17

    if out.suffix == ".extxyz":
        write_ase(out, data, format="extxyz", info={"theory": args.method})
    elif out.suffix == ".npz":
        write_md17(
            out,
            data,
            name=args.smiles or Path(args.xyz).stem,
            theory=args.method,
            md_T=args.temperature,
            md_dt_fs=args.timestep,
            md_every_steps=args.every,
            md_equil_fs=args.equilibration,
            md_friction_per_fs=args.friction,
            seed=args.seed,
        )
    else:
        write_iso17(out, data)
