"""``atomlens insight``: chemical insight from a trained model (thin layer over atomlens.insight).

    atomlens insight atomic-energies MODEL STRUCTURES [--out PNG] [--charges DIPOLE_MODEL]
    atomlens insight potential-map   MODEL STRUCTURE --probe C [--plane principal] [--out PNG]
                                     [--cube OUT.cube]
    atomlens insight rings           MODEL [--data qm9] [--max-molecules N] [--out PNG]
    atomlens insight isomers         MODEL [--formula C7H10O2] [--out PNG]
    atomlens insight extensivity     MODEL STRUCTURE [--separation D]

A STRUCTURE is any ASE-readable file, or ``qm9:N`` for the QM9 molecule with index N.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..fileio import atomic_file, check_figure_path, check_outputs
from ._common import check_numbers


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "insight",
        help="atomic energies, chemical potential maps, rings, "
        "isomers, size extensivity (DTNN paper)",
    )
    sub = p.add_subparsers(dest="insight_command", required=True)

    a = sub.add_parser("atomic-energies", help="per-atom energies of structures")
    a.add_argument("model", help="model folder (or the training output folder)")
    a.add_argument("structures", help="ASE-readable file or qm9:N")
    a.add_argument("--index", default=":", help="which frames of the file (ASE index syntax)")
    a.add_argument(
        "--out",
        help="PNG of the molecule coloured by E_i - atomref[Z_i] "
        "(several structures: OUT_<k>.png), and beside it OUT.html: "
        "an interactive 3D view of all structures (offline)",
    )
    _add_json(a, "the tables (one record per structure, with its unit)")
    a.add_argument(
        "--charges",
        metavar="DIPOLE_MODEL",
        help="a dipole model (trained on QM9 mu): its partial charges q_i beside E_i",
    )
    _add_dtype(a)
    _add_unknown_elements(a)
    a.set_defaults(func=run_atomic_energies)

    m = sub.add_parser("potential-map", help="local chemical potential Omega_A(r) of a probe atom")
    m.add_argument("model")
    m.add_argument("structure", help="ASE-readable file (first frame unless --index) or qm9:N")
    m.add_argument("--index", default="0")
    m.add_argument("--probe", default="C", help="probe element (C, H, N, O, ...)")
    m.add_argument(
        "--plane",
        default="principal",
        choices=["principal", "xy", "xz", "yz"],
        help="plane of the 2D map through the centroid (principal: molecular plane)",
    )
    m.add_argument(
        "--height", type=float, default=0.0, help="shift the plane along its normal (Angstrom)"
    )
    m.add_argument("--spacing", type=float, default=0.1, help="2D grid spacing (Angstrom)")
    m.add_argument("--padding", type=float, default=3.0, help="margin around the atoms (Angstrom)")
    m.add_argument(
        "--reference",
        default="isolated",
        choices=["none", "atomref", "isolated"],
        help="zero of the energy: isolated (Omega - Omega of the lone probe atom: "
        "the probe's interaction with the molecule, default), atomref "
        "(Omega - atomref[A]), none (Omega incl. atomref and shift)",
    )
    m.add_argument("--out", help="PNG contour plot (default: potential_<probe>.png)")
    m.add_argument("--cube", help="also write a 3D Gaussian cube file (hartree, bohr)")
    m.add_argument("--cube-spacing", type=float, default=0.2, help="3D grid spacing (Angstrom)")
    m.add_argument("--chunk-size", type=int, default=2048, help="probe points per forward pass")
    _add_dtype(m)
    _add_unknown_elements(m)
    m.set_defaults(func=run_potential_map)

    r = sub.add_parser("rings", help="rank ring types by summed atomic energies (QM9 subset)")
    r.add_argument("model")
    _add_data_options(r)
    r.add_argument(
        "--max-molecules",
        type=int,
        default=10000,
        help="molecules with rings of --sizes to analyse, drawn at random (0: all)",
    )
    r.add_argument("--sizes", default="5,6", help="ring sizes, comma separated")
    r.add_argument(
        "--min-count", type=int, default=3, help="ring types seen fewer times are left out"
    )
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", default="rings.png", help="PNG of the ranking (default rings.png)")
    _add_json(r, "the ranking and the per-ring records")
    _add_dtype(r)
    r.set_defaults(func=run_rings)

    i = sub.add_parser("isomers", help="predicted vs reference energies of one formula's isomers")
    i.add_argument("model")
    _add_data_options(i)
    i.add_argument("--formula", default="C7H10O2")
    i.add_argument(
        "--out",
        default="isomers.png",
        help="scatter PNG of relative energies (default isomers.png)",
    )
    _add_json(i, "the summary (one line)")
    _add_dtype(i)
    i.set_defaults(func=run_isomers)

    e = sub.add_parser("extensivity", help="E(two copies beyond the cutoff) = 2 E(one)?")
    e.add_argument("model")
    e.add_argument("structure", help="ASE-readable file (first frame unless --index) or qm9:N")
    e.add_argument("--index", default="0")
    e.add_argument(
        "--separation",
        type=float,
        help="closest distance between the copies (Angstrom; default cutoff + 1)",
    )
    _add_dtype(e)
    _add_unknown_elements(e)
    e.set_defaults(func=run_extensivity)


def _add_json(p, what: str) -> None:
    """``--json``: ``what`` on standard output instead of the text (the other messages go
    to standard error, so the output parses); ``--json-file FILE``: written to FILE."""
    p.add_argument(
        "--json",
        action="store_true",
        help=f"print {what} as JSON instead of the text (other messages then go to standard error)",
    )
    p.add_argument("--json-file", metavar="FILE", help=f"write {what} as JSON to FILE")


def _say(args, text: str) -> None:
    """A message: on standard output, or standard error while that carries the JSON."""
    print(text, file=sys.stderr if args.json else sys.stdout)


def _put_json(args, payload) -> None:
    """``payload`` as JSON: printed (``--json``) and/or written whole to ``--json-file``
    (neither: nothing)."""
    text = json.dumps(payload)
    if args.json:
        print(text)
    if args.json_file:
        with atomic_file(args.json_file) as tmp:
            tmp.write_text(text)
        _say(args, f"written {args.json_file}")


def _add_dtype(p) -> None:
    p.add_argument(
        "--dtype",
        default="float64",
        choices=["float64", "float32"],
        help="precision of the model evaluation (float64: atomic energies sum to "
        "the total to ~1e-9 eV; float32: about twice as fast)",
    )


def _add_unknown_elements(p) -> None:
    p.add_argument(
        "--allow-unknown-elements",
        action="store_true",
        help="go on (with a warning) for elements absent from the model's training data",
    )


def _add_data_options(p) -> None:
    p.add_argument(
        "--data",
        default="qm9",
        help="'qm9', a packed data set folder, or a file of labelled structures",
    )
    p.add_argument(
        "--energy-unit", help="energy unit of a --data file that does not state it (eV, ...)"
    )
    p.add_argument(
        "--length-unit", help="length unit of a --data file that does not state it (Angstrom)"
    )
    p.add_argument(
        "--split",
        default="all",
        choices=["all", "train", "val", "test"],
        help="only molecules of this split of the model's training data",
    )


# --------------------------------------------------------------------------- helpers
def _one_structure(spec: str, index: str):
    """The one structure ``--index`` selects of ``spec`` (a selection of several is refused:
    the command studies one; it had taken the first without a word)."""
    from ..data.sources.open import open_structures

    frames = open_structures(spec, index)
    if len(frames) != 1:
        raise ValueError(
            f"--index {index} selects {len(frames)} structures of {spec}; this command "
            f"studies one: give one index (e.g. --index 0)"
        )
    return frames[0]


def _load(model_path: str, dtype: str = "float64"):
    import torch

    from ..models.io import load_model, model_folder, read_config

    folder = model_folder(model_path)
    model = load_model(folder, dtype=getattr(torch, dtype))
    return model, folder, read_config(folder)["model"].get("unit", "eV")


def _split_indices(folder: Path, split: str, data, name: str) -> np.ndarray:
    """The indices of ``split`` of the model's training data in ``data`` (``name``: its
    --data), refused where ``data`` is not that data (the run's recorded fingerprint): the
    indices would pick other molecules."""
    if split == "all":
        return np.arange(len(data))
    from ..data.splits import load_split
    from ..training.run_folder import FINGERPRINT, run_of, same_data

    path = folder / "split.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the model folder has no split; use --split all")
    run = run_of(folder)  # the fingerprint's folder
    if same_data(run, data) is False:
        raise ValueError(
            f"--split {split}: the split indexes the data {run} was trained on, and --data "
            f"{name} holds other data (its content differs from the run's {FINGERPRINT}); "
            f"name the training data with --data, or use --split all"
        )
    return np.asarray(load_split(path)[split])


# --------------------------------------------------------------------------- commands
def run_atomic_energies(args) -> int:
    from ..data.sources.open import open_structures
    from ..insight.atomic import atomic_energies
    from ..insight.plots import atomic_energy_plot

    check_figure_path("--out", args.out)
    model, _, unit = _load(args.model, args.dtype)
    frames = open_structures(args.structures, args.index)
    if args.out:
        out = Path(args.out)
        figures = [out] if len(frames) == 1 else [_numbered(out, k) for k in range(len(frames))]
        outputs = {f"--out ({path.name})": path for path in figures}
        outputs |= {"--out (.html)": out.with_suffix(".html")}
    else:
        outputs = {}
    check_outputs(
        outputs | {"--json-file": args.json_file},
        [args.model, args.structures, *([args.charges] if args.charges else [])],
    )
    charge_model = _load(args.charges, args.dtype)[0] if args.charges else None
    tables = atomic_energies(
        model,
        frames,
        charge_model=charge_model,
        allow_unknown_elements=args.allow_unknown_elements,
    )
    if not args.json:
        print("\n\n".join(t.table(unit) for t in tables))
    records = [
        {"formula": t.formula, "total": t.total, "unit": unit, "atoms": t.rows()} for t in tables
    ]
    _put_json(args, records)
    if args.out:
        from ..insight.plots import to_milli
        from ..insight.viewer import write_viewer

        out = Path(args.out)
        for k, t in enumerate(tables):
            path = out if len(tables) == 1 else _numbered(out, k)
            atomic_energy_plot(
                t.numbers,
                t.positions,
                t.relative,
                path,
                unit=unit,
                title=f"{t.formula}: atomic energies E_i - atomref[Z_i]",
            )
            _say(args, f"figure: {path}")
        properties = []
        for t in tables:
            relative, small_unit = to_milli(t.relative, unit)
            properties.append(
                {"E_i - atomref[Z_i]": (relative, small_unit), "E_i": (t.energies, unit)}
            )
        view = write_viewer(
            out.with_suffix(".html"), frames, properties, title="atomlens atomic energies"
        )
        _say(args, f"interactive 3D view: {view}")
    return 0


def _numbered(path: Path, k: int) -> Path:
    """``atoms.png`` -> ``atoms_3.png``: the figure of structure 3 of several."""
    return path.with_name(f"{path.stem}_{k}{path.suffix}")


#: the range of each numeric option of ``potential-map`` (:func:`check_numbers`)
POTENTIAL_MAP_RANGES = {
    "--height": "",
    "--spacing": "> 0",
    "--padding": ">= 0",
    "--cube-spacing": "> 0",
    "--chunk-size": ">= 1",
}


def run_potential_map(args) -> int:
    from ..insight.cube import write_cube
    from ..insight.plots import potential_map_plot
    from ..insight.potential_map import potential_map

    check_numbers(args, POTENTIAL_MAP_RANGES)
    check_figure_path("--out", args.out)
    check_outputs(
        {"--out": args.out or f"potential_{args.probe}.png", "--cube": args.cube},
        [args.model, args.structure],
    )
    model, _, unit = _load(args.model, args.dtype)
    atoms = _one_structure(args.structure, args.index)
    pmap = potential_map(
        model,
        atoms,
        probe=args.probe,
        plane=args.plane,
        spacing=args.spacing,
        padding=args.padding,
        height=args.height,
        reference=args.reference,
        chunk_size=args.chunk_size,
        allow_unknown_elements=args.allow_unknown_elements,
        source=args.structure,
    )
    v = pmap.values
    print(
        f"Omega_{args.probe} on {v.shape[0]} x {v.shape[1]} points ({args.plane} plane, "
        f"spacing {args.spacing} Angstrom, reference {args.reference}): "
        f"min {v.min():.4f}, median {np.median(v):.4f}, max {v.max():.4f} {unit}"
    )
    out = Path(args.out or f"potential_{args.probe}.png")
    potential_map_plot(
        pmap,
        out,
        unit=unit,
        title=f"{atoms.get_chemical_formula()}: local "
        f"chemical potential of a {args.probe} probe ({args.plane} plane)",
    )
    print(f"figure: {out}")
    if args.cube:
        box = potential_map(
            model,
            atoms,
            probe=args.probe,
            plane=None,
            spacing=args.cube_spacing,
            padding=args.padding,
            reference=args.reference,
            chunk_size=args.chunk_size,
            allow_unknown_elements=args.allow_unknown_elements,
        )
        write_cube(args.cube, box, unit=unit)
        print(f"cube file: {args.cube} ({'x'.join(map(str, box.values.shape))} points)")
    return 0


def run_rings(args) -> int:
    from ..data.sources.open import open_dataset
    from ..insight.plots import ring_ranking_plot
    from ..insight.rings import ring_study

    check_numbers(args, {"--max-molecules": ">= 0", "--min-count": ">= 0", "--seed": ">= 0"})
    sizes = _ring_sizes(args.sizes)
    check_figure_path("--out", args.out)
    check_outputs({"--out": args.out, "--json-file": args.json_file}, [args.model, args.data])
    model, folder, unit = _load(args.model, args.dtype)
    data = open_dataset(args.data, args.energy_unit, args.length_unit)
    analysis = ring_study(
        model,
        data,
        _split_indices(folder, args.split, data, args.data),
        sizes=sizes,
        max_molecules=args.max_molecules,
        min_count=args.min_count,
        seed=args.seed,
        source=args.data,
    )
    if not args.json:
        print(analysis.table())
    if analysis.ranking:
        ring_ranking_plot(
            analysis,
            args.out,
            unit=unit,
            title=f"{model.config.representation.upper()}: ring energies "
            f"({analysis.n_molecules} molecules; red: aromatic)",
        )
        _say(args, f"figure: {args.out}")
    else:
        _say(
            args,
            f"no ring type was seen {args.min_count} times or more in the "
            f"{analysis.n_molecules} molecules analysed (no figure): lower --min-count or "
            f"raise --max-molecules",
        )
    _put_json(args, {"unit": unit, **analysis.as_dict()})
    return 0


def _ring_sizes(text: str) -> tuple[int, ...]:
    """``--sizes 5,6`` -> (5, 6); a ring has at least three atoms."""
    try:
        sizes = tuple(int(size) for size in text.split(","))
    except ValueError:
        raise ValueError(
            f"--sizes must be ring sizes separated by commas (5,6), not {text!r}"
        ) from None
    if min(sizes) < 3:
        raise ValueError(f"--sizes must be 3 or more (atoms in a ring), not {text}")
    return sizes


def run_isomers(args) -> int:
    from ..data.sources.open import open_dataset
    from ..insight.isomers import isomer_analysis
    from ..insight.plots import isomer_plot

    check_figure_path("--out", args.out)
    check_outputs({"--out": args.out, "--json-file": args.json_file}, [args.model, args.data])
    model, folder, unit = _load(args.model, args.dtype)
    data = open_dataset(args.data, args.energy_unit, args.length_unit)
    indices = _split_indices(folder, args.split, data, args.data)
    analysis = isomer_analysis(model, data, args.formula, None if args.split == "all" else indices)
    summary = analysis.summary()
    trained_on = _in_training_split(folder, args, analysis.indices)
    if trained_on is not None:  # (0 too: none of them trained on)
        summary["n_in_training_split"] = trained_on
    _put_json(args, {"split": args.split, "unit": unit, **summary})
    if not args.json:
        seen = (
            f"; {trained_on} of them in the model's training split (--split test: the "
            f"test split's only)"
            if trained_on is not None
            else ""
        )
        print(
            f"{summary['n_isomers']} isomers of {summary['formula']} ({args.split}{seen}): "
            f"Spearman {summary['spearman']:.4f}, MAE of relative energies "
            f"{summary['relative_mae_eV'] * 1000:.1f} meV (w.r.t. the lowest isomer), "
            f"{summary['centred_mae_eV'] * 1000:.1f} meV (centred), MAE of total energies "
            f"{summary['mae_eV'] * 1000:.1f} meV; lowest isomer (reference) "
            f"#{summary['lowest_index']}, predicted lowest #{summary['predicted_lowest_index']}"
        )
    isomer_plot(analysis, args.out, unit=unit)
    _say(args, f"figure: {args.out}")
    return 0


def _in_training_split(folder: Path, args, indices: np.ndarray) -> int | None:
    """How many of ``indices`` the model trained on, when scoring its own data set (the
    default, or --data naming the one of its training config) with --split all."""
    if args.split != "all" or not (folder / "split.npz").is_file():
        return None
    from ..training.config import load_config

    config = folder / "train_config.yaml"
    trained_data = str(load_config(config).data) if config.is_file() else "qm9"

    def same(a: str, b: str) -> bool:  # "qm9", or the same file or folder however spelled
        if a == b:
            return True
        return Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()

    if not same(str(args.data), trained_data):
        return None
    from ..data.splits import load_split

    return int(np.isin(indices, load_split(folder / "split.npz")["train"]).sum())


def run_extensivity(args) -> int:
    from ..insight.extensivity import extensivity
    from ..models.guards import check_elements

    model, _, unit = _load(args.model, args.dtype)
    atoms = _one_structure(args.structure, args.index)
    check_elements(model, atoms.numbers, args.allow_unknown_elements, str(args.structure))
    result = extensivity(model, atoms, args.separation, args.allow_unknown_elements)
    ok = result.passed()
    if result.separation is None:
        axis = "abc"[int(np.flatnonzero(atoms.pbc)[0])]
        pair = f"the cell doubled along {axis}, its first periodic axis"
    else:
        within = result.cutoff is not None and result.separation < result.cutoff
        pair = (
            f"two copies {result.separation:.2f} Angstrom apart (cutoff {result.cutoff}"
            f"{': within it, the copies interact' if within else ''})"
        )
    print(
        f"{atoms.get_chemical_formula()}: E = {result.single:.6f} {unit}; {pair}: "
        f"E = {result.pair:.6f} {unit}; E(2) - 2 E(1) = {result.difference:.3e} {unit} -> "
        f"{'size-extensive' if ok else 'NOT size-extensive'} (float64)"
    )
    return 0 if ok else 1
