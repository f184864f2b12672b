"""``atomlens explain molecule``: explain one energy prediction of a SchNet or DTNN model.

    atomlens explain molecule MODEL STRUCTURE --out DIR [--method relevant_walks ...]
        [--index 0] [--patterns FILE | --fit-data FILE]

For each method: ``DIR/<method>.png`` (atoms coloured by relevance, pairs drawn with width
and colour by R_ij, element symbols), ``DIR/<method>_terms.csv`` / ``.md`` (the largest pair,
three-body and walk terms in meV) and ``DIR/<method>.json`` (energy, reference, sum rule,
conservation error, all relevances in eV). PatternAttribution needs patterns: a file saved
earlier (``--patterns``) or fitted here in one pass over ``--fit-data`` (any ASE-readable
file of training structures; the fitted patterns are saved to ``DIR/patterns.safetensors``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ..registry import MOLECULE_METHODS
from ._common import check_numbers


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``molecule`` on the ``explain`` command's subparsers."""
    parser = subparsers.add_parser(
        "molecule",
        help="explain one molecular energy (atoms, pairs, three-body terms, walks)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="model folder (config.json + model.safetensors)")
    parser.add_argument("structure", help="structure file (anything ase.io.read reads)")
    parser.add_argument("--index", default="0", help="which frame of STRUCTURE (default 0)")
    parser.add_argument(
        "--method",
        action="append",
        choices=MOLECULE_METHODS,
        help="explanation method (repeat for several; default relevant_walks)",
    )
    parser.add_argument(
        "--patterns", type=Path, help="patterns (.safetensors) for patternattribution"
    )
    parser.add_argument("--fit-data", help="structures to fit the patterns on (patternattribution)")
    parser.add_argument("--n-top", type=int, default=15, help="rows per kind in the terms table")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--allow-unknown-elements",
        action="store_true",
        help="go on (with a warning) for elements absent from the model's training data",
    )
    parser.set_defaults(func=run)
    return parser


def _patterns(args, model):
    from ..explain.graph import fit_molecule_patterns
    from ..explain.patterns import Patterns

    if args.patterns is not None:
        if args.fit_data is not None:
            raise ValueError(
                "give --patterns FILE (patterns fitted before) or --fit-data STRUCTURES (fit "
                "them now), not both"
            )
        if not args.patterns.is_file():
            raise FileNotFoundError(f"{args.patterns}: no such patterns file")
        return Patterns.load(args.patterns, model)
    if args.fit_data is None:
        raise ValueError("patternattribution needs --patterns FILE or --fit-data STRUCTURES")
    from ..data.sources.ase_files import read_structures

    frames = read_structures(args.fit_data)
    distinct = {
        (a.numbers.tobytes(), np.round(a.positions, 6).tobytes()) for a in frames
    }  # the estimator needs variation: the same structure twice is one
    if len(distinct) < MIN_FIT_STRUCTURES:
        print(
            f"atomlens explain: warning: {args.fit_data} holds {len(distinct)} distinct "
            f"structure(s); PatternAttribution's patterns fitted on so few are degenerate "
            f"(relevances far from the energy): fit them on more, different structures",
            file=sys.stderr,
        )
    batches = (model.batch_from_atoms(frames[k : k + 64]) for k in range(0, len(frames), 64))
    patterns = fit_molecule_patterns(model, batches)
    patterns.save(args.out / "patterns.safetensors", model)
    return patterns


#: relevances summing to more than this many times E - ref (at least 0.1 eV) are flagged
DEGENERATE_FACTOR = 100.0
#: fewer distinct structures than this to fit patterns on are flagged
MIN_FIT_STRUCTURES = 3


def run(args: argparse.Namespace) -> int:
    """Explain the structure with each method; returns the exit code."""
    from ..data.dataset import dataset_from_atoms
    from ..data.sources.ase_files import read_structures
    from ..explain.molecule_figures import molecule_figure, terms_table, write_terms
    from ..explain.molecules import explain_molecule
    from ..fileio import atomic_file, check_output_folder
    from ..models.guards import check_elements
    from ..models.io import load_model

    check_output_folder(args.out)
    check_numbers(args, {"--n-top": ">= 1"})
    model = load_model(args.model)
    frames = read_structures(args.structure, args.index)
    if len(frames) != 1:
        raise ValueError(
            f"{args.structure}: --index {args.index} selects {len(frames)} "
            "structures; explain one at a time"
        )
    dataset_from_atoms(frames, source=args.structure, targets=False)  # finite, not overlapping
    numbers = frames[0].get_atomic_numbers()
    check_elements(model, numbers, args.allow_unknown_elements, args.structure)
    args.out.mkdir(parents=True, exist_ok=True)
    methods = args.method or ["relevant_walks"]
    patterns = _patterns(args, model) if "patternattribution" in methods else None
    relevances = {}
    for method in methods:
        e = explain_molecule(model, frames[0], method, patterns=patterns)
        relevances[f"{method} (meV)"] = (1000.0 * np.asarray(e.atoms), "meV")
        molecule_figure(e, args.out / f"{method}.png")
        write_terms(terms_table(e, args.n_top), args.out / f"{method}_terms")
        summary = {
            "method": method,
            "unit": e.unit,
            "energy": e.energy,
            "reference": e.reference,
            "reference_kind": e.reference_kind,
            "explained": e.explained,
            "conservation_error": e.conservation_error,
            "remainder": e.remainder,
            "notes": e.notes,
            "atoms": e.atoms.tolist(),
            "pairs": e.pairs.tolist(),
            "pair_relevance": e.pair_relevance.tolist(),
        }
        if e.triples is not None:
            summary["triples"] = e.triples.tolist()
            summary["triple_relevance"] = e.triple_relevance.tolist()
        with atomic_file(args.out / f"{method}.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=1) + "\n")
        print(
            f"{method:>22}: E = {e.energy:.4f} eV, E - ref = {e.explained:.4f} eV "
            f"(ref: {e.reference_kind}), sum of atom relevances {e.atoms.sum():.4f} eV "
            f"(conservation error {1000 * e.conservation_error:.3g} meV)"
        )
        for note in e.notes or ():  # e.g. walks not listed past the limit: said, not only
            print(f"{'':>24}note: {note}")  # in the JSON
        if abs(e.conservation_error) > DEGENERATE_FACTOR * max(abs(e.explained), 0.1):
            print(
                f"atomlens explain: warning: {method}'s relevances sum to "
                f"{e.atoms.sum():.4g} eV for E - ref = {e.explained:.4g} eV"
                + (
                    ": its patterns look degenerate; fit them on more, different structures"
                    if method == "patternattribution"
                    else ""
                ),
                file=sys.stderr,
            )
    # the atom relevances of every method in one interactive 3D view, beside the PNGs
    from ..insight.viewer import write_viewer

    write_viewer(
        args.out / "relevance.html",
        [frames[0]],
        [relevances],
        title=f"atom relevances, {frames[0].get_chemical_formula()}",
    )
    print(f"wrote {args.out} (PNG, terms tables, JSON per method; relevance.html: 3D view)")
    return 0
