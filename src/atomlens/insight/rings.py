"""Ring stabilities from atomic energies (DTNN paper: aromatic rings come out most stable).

For every ring of a molecule the atomic energies of its atoms are summed, with the element
references removed so that rings of different composition can be compared:

    E_ring   = sum_{i in ring} (E_i - atomref[Z_i])                     (eV)
    E_ring+H = E_ring + sum_{h bonded to the ring} (E_h - atomref[H])   (eV)

Ring types are then ranked by their mean energy per ring atom (lowest = most stable).

Rings are perceived on the molecule's geometry, not on the SMILES atom order. QM9's XYZ atom
order matches the SMILES heavy-atom order only usually (the element sequences differ for a
few molecules, and equal element sequences do not guarantee equal atoms), so the bond graph
is built from covalent radii and matched to the graph of the SMILES (hydrogens made explicit)
by a labelled graph isomorphism. The SMILES supplies ring membership, aromaticity and bond
orders; molecules whose geometry does not match their SMILES (bonds that changed on
relaxation) are counted and skipped.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .._optional import require

#: bonded when d < BOND_SCALE * (r_cov(a) + r_cov(b))
BOND_SCALE = 1.2

# aromatic rings: (size, sorted heteroatoms) -> name; "adjacent" variants resolved below
_AROMATIC = {
    (6, ()): "benzene",
    (6, ("N",)): "pyridine",
    (6, ("N", "N", "N")): "triazine",
    (5, ("O",)): "furan",
    (5, ("N",)): "pyrrole",
    (5, ("N", "N", "N")): "triazole",
    (5, ("N", "N", "N", "N")): "tetrazole",
    (5, ("N", "N", "O")): "oxadiazole",
}
_SATURATED = {
    (3, ()): "cyclopropane",
    (3, ("O",)): "oxirane",
    (3, ("N",)): "aziridine",
    (4, ()): "cyclobutane",
    (4, ("O",)): "oxetane",
    (4, ("N",)): "azetidine",
    (5, ()): "cyclopentane",
    (5, ("O",)): "oxolane",
    (5, ("N",)): "pyrrolidine",
    (6, ()): "cyclohexane",
    (6, ("O",)): "oxane",
    (6, ("N",)): "piperidine",
    (6, ("O", "O")): "dioxane",
    (7, ()): "cycloheptane",
}
_UNSATURATED_CARBON = {3: "cyclopropene", 4: "cyclobutene", 5: "cyclopentene", 6: "cyclohexene"}


def bond_graph(
    numbers: np.ndarray, positions: np.ndarray, scale: float = BOND_SCALE
) -> list[tuple[int, int]]:
    """Bonds (i < j) from covalent radii: d_ij < scale * (r_i + r_j)."""
    from ase.data import covalent_radii

    numbers = np.asarray(numbers)
    positions = np.asarray(positions, dtype=np.float64)
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    r = covalent_radii[numbers]
    bonded = d < scale * (r[:, None] + r[None])
    i, j = np.nonzero(np.triu(bonded, 1))
    return list(zip(i.tolist(), j.tolist()))


def match_smiles(smiles: str, numbers: np.ndarray, positions: np.ndarray):
    """``(mol, mapping)``: the RDKit molecule of ``smiles`` with explicit hydrogens and a map
    geometry atom index -> mol atom index, or ``(mol or None, None)`` when the geometry's bond
    graph does not match the SMILES."""
    import networkx as nx
    from networkx.algorithms.isomorphism import GraphMatcher

    require("rdkit.Chem", "the ring analysis")
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return None, None
    mol = Chem.AddHs(mol)
    numbers = np.asarray(numbers)
    if mol.GetNumAtoms() != len(numbers):
        return mol, None
    geometry = nx.Graph()
    geometry.add_nodes_from((k, {"z": int(z)}) for k, z in enumerate(numbers))
    geometry.add_edges_from(bond_graph(numbers, positions))
    graph = nx.Graph()
    graph.add_nodes_from((a.GetIdx(), {"z": a.GetAtomicNum()}) for a in mol.GetAtoms())
    graph.add_edges_from((b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds())
    if geometry.number_of_edges() != graph.number_of_edges():
        return mol, None
    matcher = GraphMatcher(geometry, graph, node_match=lambda a, b: a["z"] == b["z"])
    if not matcher.is_isomorphic():
        return mol, None
    return mol, dict(matcher.mapping)


#: ring types whose heteroatoms can sit in several places: named with their locants
_BY_LOCANTS = {"triazine", "triazole", "oxadiazole", "dioxane"}
#: Hantzsch-Widman seniority of ring heteroatoms (O before S before N)
_SENIORITY = {"O": 0, "S": 1, "Se": 2, "N": 3, "P": 4}


def ring_locants(symbols: list[str]) -> str:
    """The lowest locants of the heteroatoms of a ring whose atoms are ``symbols`` in ring
    order, numbered from its senior heteroatom (O, then S, then N) in the direction that
    gives the lowest set, e.g. ``"1,3,5"`` for 1,3,5-triazine, ``"1,2,4"`` for
    1,2,4-oxadiazole (O at 1)."""
    size = len(symbols)
    hetero = [k for k, symbol in enumerate(symbols) if symbol != "C"]
    senior = min(_SENIORITY.get(symbols[k], 9) for k in hetero)
    best = None
    for start in (k for k in hetero if _SENIORITY.get(symbols[k], 9) == senior):
        for step in (1, -1):
            order = [symbols[(start + step * k) % size] for k in range(size)]
            locants = tuple(1 + k for k, symbol in enumerate(order) if symbol != "C")
            by_seniority = tuple(sorted((_SENIORITY.get(order[k - 1], 9), k) for k in locants))
            key = (locants, by_seniority)
            best = key if best is None or key < best else best
    return ",".join(map(str, best[0]))


def classify_ring(mol, ring: tuple[int, ...]) -> tuple[str, bool]:
    """Name and aromaticity of the ring ``ring`` (RDKit atom indices of ``mol``)."""
    from rdkit import Chem

    size = len(ring)
    atoms = [mol.GetAtomWithIdx(k) for k in ring]
    hetero = tuple(sorted(a.GetSymbol() for a in atoms if a.GetSymbol() != "C"))
    bonds = [mol.GetBondBetweenAtoms(ring[k], ring[(k + 1) % size]) for k in range(size)]
    aromatic = all(b.GetIsAromatic() for b in bonds)
    n_double = sum(b.GetBondType() == Chem.BondType.DOUBLE for b in bonds)
    symbols = [a.GetSymbol() for a in atoms]  # in ring order (RDKit's ring atoms are)
    if aromatic:
        if (size, hetero) in _AROMATIC:
            name = _AROMATIC[(size, hetero)]
            if name in _BY_LOCANTS:  # 1,2,3- / 1,2,4- / 1,3,5-triazine are not one type
                name = f"{ring_locants(symbols)}-{name}"
            return name, True
        positions = [k for k, symbol in enumerate(symbols) if symbol != "C"]
        adjacent = len(positions) == 2 and (positions[1] - positions[0]) in (1, size - 1)
        if (size, hetero) == (6, ("N", "N")):
            apart = positions[1] - positions[0]
            return {
                1: "pyridazine",
                5: "pyridazine",
                2: "pyrimidine",
                4: "pyrimidine",
                3: "pyrazine",
            }[apart], True
        if (size, hetero) == (5, ("N", "N")):
            return ("pyrazole" if adjacent else "imidazole"), True
        if (size, hetero) == (5, ("N", "O")):
            return ("isoxazole" if adjacent else "oxazole"), True
        return f"aromatic {size}-ring {_ring_formula(size, hetero)}", True
    if n_double == 0 and (size, hetero) in _SATURATED:
        name = _SATURATED[(size, hetero)]
        if name in _BY_LOCANTS:  # 1,3- and 1,4-dioxane
            name = f"{ring_locants(symbols)}-{name}"
        return name, False
    if not hetero and n_double == 1 and size in _UNSATURATED_CARBON:
        return _UNSATURATED_CARBON[size], False
    if not hetero and n_double == 2 and size == 6:
        return "cyclohexadiene", False
    kind = "saturated" if n_double == 0 else f"{n_double} double bond{'s' * (n_double > 1)}"
    return f"{size}-ring {_ring_formula(size, hetero)} ({kind})", False


def _ring_formula(size: int, hetero: tuple[str, ...]) -> str:
    """Ring atoms as a formula, e.g. C4NO, C3N2."""
    parts = [("C", size - len(hetero))] + [(e, hetero.count(e)) for e in sorted(set(hetero))]
    return "".join(f"{e}{n if n > 1 else ''}" for e, n in parts if n)


@dataclass
class Ring:
    """One ring of one molecule; indices are geometry (data set) atom indices."""

    name: str
    aromatic: bool
    atoms: list[int]
    hydrogens: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.atoms)


def find_rings(
    smiles: str,
    numbers: np.ndarray,
    positions: np.ndarray,
    sizes: tuple[int, ...] = (3, 4, 5, 6, 7),
) -> list[Ring] | None:
    """Rings (smallest set of smallest rings) of one molecule, or ``None`` if its geometry
    does not match its SMILES."""
    mol, mapping = match_smiles(smiles, numbers, positions)
    if mapping is None:
        return None
    to_geometry = {m: g for g, m in mapping.items()}
    rings = []
    for ring in mol.GetRingInfo().AtomRings():
        if len(ring) not in sizes:
            continue
        name, aromatic = classify_ring(mol, ring)
        hydrogens = sorted(
            {
                to_geometry[n.GetIdx()]
                for k in ring
                for n in mol.GetAtomWithIdx(k).GetNeighbors()
                if n.GetAtomicNum() == 1
            }
        )
        rings.append(Ring(name, aromatic, [to_geometry[k] for k in ring], hydrogens))
    return rings


def has_rings(smiles: np.ndarray, sizes: tuple[int, ...] = (5, 6)) -> np.ndarray:
    """Boolean mask: which SMILES have a ring of one of ``sizes`` (no geometry needed)."""
    require("rdkit.Chem", "the ring analysis")
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    mask = np.zeros(len(smiles), dtype=bool)
    for k, s in enumerate(smiles):
        s = str(s)
        if not any(c.isdigit() for c in s):  # ring closures are digits: no digit, no ring
            continue
        mol = Chem.MolFromSmiles(s)
        if mol is not None:
            mask[k] = any(len(r) in sizes for r in mol.GetRingInfo().AtomRings())
    return mask


@dataclass
class RingAnalysis:
    """Per-ring records and the ranking of ring types by mean energy per ring atom."""

    records: list[dict]
    ranking: list[dict]
    n_molecules: int
    n_unmatched: int

    def table(self) -> str:
        header = (
            f"{'ring type':<34} {'n':>6} {'E_ring/atom':>12} {'sd':>7} "
            f"{'E_ring':>9} {'E_ring+H':>9} {'arom':>5}   (eV, element references removed)"
        )
        lines = [header]
        for r in self.ranking:
            lines.append(
                f"{r['name']:<34} {r['count']:>6} {r['per_atom']:>12.4f} "
                f"{r['per_atom_sd']:>7.4f} {r['ring']:>9.3f} {r['ring_h']:>9.3f} "
                f"{'yes' if r['aromatic'] else 'no':>5}"
            )
        lines.append(
            f"{self.n_molecules} molecules, {self.n_unmatched} skipped "
            "(geometry bonds do not match the SMILES)"
        )
        return "\n".join(lines)

    def as_dict(self) -> dict:
        """The ranking, the per-ring records and the counts, as JSON-ready values."""
        return {
            "ranking": self.ranking,
            "records": self.records,
            "n_molecules": self.n_molecules,
            "n_unmatched": self.n_unmatched,
        }


def rank_ring_types(records: list[dict], min_count: int = 1) -> list[dict]:
    """Mean ring energies per ring type, most stable (lowest energy per ring atom) first."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        groups[rec["name"]].append(rec)
    ranking = []
    for name, recs in groups.items():
        if len(recs) < min_count:
            continue
        per_atom = np.array([r["ring"] / r["size"] for r in recs])
        ranking.append(
            {
                "name": name,
                "count": len(recs),
                "aromatic": recs[0]["aromatic"],
                "size": recs[0]["size"],
                "per_atom": float(per_atom.mean()),
                "per_atom_sd": float(per_atom.std()),
                "ring": float(np.mean([r["ring"] for r in recs])),
                "ring_h": float(np.mean([r["ring_h"] for r in recs])),
            }
        )
    return sorted(ranking, key=lambda r: r["per_atom"])


def ring_analysis(
    data,
    indices: np.ndarray,
    atomic: np.ndarray,
    atomref: np.ndarray,
    sizes: tuple[int, ...] = (5, 6),
    min_count: int = 1,
) -> RingAnalysis:
    """Rings of the molecules ``indices`` of a packed data set with a ``smiles`` extra.

    ``atomic`` holds the atomic energies of those molecules' atoms, concatenated in order (as
    :func:`~atomlens.models.inference.predict_dataset` returns them); ``atomref`` the model's
    element references indexed by Z.
    """
    if "smiles" not in data.extras:
        raise ValueError("the data set has no SMILES (extra 'smiles'); rings need them")
    records, unmatched, start = [], 0, 0
    for m in tqdm(np.asarray(indices), desc="rings", unit="molecule", leave=False, disable=None):
        a, b = int(data.offsets[m]), int(data.offsets[m + 1])
        numbers = np.asarray(data.numbers[a:b]).astype(np.int64)
        relative = atomic[start : start + b - a] - atomref[numbers]
        start += b - a
        rings = find_rings(
            str(data.extras["smiles"][m]), numbers, np.asarray(data.positions[a:b]), sizes
        )
        if rings is None:
            unmatched += 1
            continue
        for ring in rings:
            e_ring = float(relative[ring.atoms].sum())
            records.append(
                {
                    "molecule": int(m),
                    "name": ring.name,
                    "aromatic": ring.aromatic,
                    "size": ring.size,
                    "ring": e_ring,
                    "ring_h": e_ring + float(relative[ring.hydrogens].sum()),
                    "n_h": len(ring.hydrogens),
                }
            )
    if start != len(atomic):
        raise ValueError("atomic energies do not match the atoms of the chosen molecules")
    return RingAnalysis(records, rank_ring_types(records, min_count), len(indices), unmatched)


def known_elements_only(data, indices: np.ndarray, known) -> np.ndarray:
    """Mask over ``indices``: the structures of ``data`` made of ``known`` elements only."""
    allowed = np.zeros(max(int(data.numbers.max()), max(known)) + 1, dtype=bool)
    allowed[np.asarray(known, dtype=int)] = True
    per_atom = allowed[data.numbers]
    starts = np.asarray(data.offsets)[:-1]
    all_known = np.logical_and.reduceat(per_atom, starts) if len(per_atom) else per_atom
    return all_known[np.asarray(indices)]


def ring_study(
    model,
    data,
    indices: np.ndarray | None = None,
    sizes: tuple[int, ...] = (5, 6),
    max_molecules: int | None = 10000,
    min_count: int = 3,
    seed: int = 0,
    batch_size: int = 100,
    source: str = "<memory>",
) -> RingAnalysis:
    """The DTNN paper's ring study with a trained energy model, from data to ranking.

    Of the molecules ``indices`` of ``data`` (default: all; the data needs a ``smiles``
    extra), those whose SMILES has a ring of one of ``sizes`` are kept; at most
    ``max_molecules`` of them (drawn at random with ``seed``; ``None`` or 0: all) get their
    atomic energies predicted by ``model`` (in float64 for the sums), and their rings are
    ranked by :func:`ring_analysis` (types seen fewer than ``min_count`` times left out).
    Molecules with an element absent from the model's training data are left out first
    (their atomic energies would be extrapolation). ``source`` names the data in error
    messages.
    """
    from ..models.guards import require_extensive_energy, training_elements
    from ..models.inference import predict_dataset

    require_extensive_energy(model, "ring energies")
    if "smiles" not in data.extras:
        raise ValueError(f"{source}: the data set has no SMILES; rings need them")
    sizes = tuple(int(size) for size in sizes)
    indices = np.arange(len(data)) if indices is None else np.asarray(indices)
    known = training_elements(model)
    if known is not None:
        indices = indices[known_elements_only(data, indices, known)]
    indices = indices[has_rings(np.asarray(data.extras["smiles"])[indices], sizes)]
    if max_molecules and len(indices) > max_molecules:
        rng = np.random.default_rng(seed)
        indices = np.sort(rng.choice(indices, max_molecules, replace=False))
    if len(indices) == 0:
        raise ValueError(
            f"no molecule with a ring of size {','.join(map(str, sizes))} in the chosen data"
        )
    atomic = predict_dataset(model, data, indices, batch_size)["atomic"].astype(np.float64)
    atomref = model.atomref.detach().cpu().numpy().astype(np.float64)
    return ring_analysis(data, indices, atomic, atomref, sizes, min_count)
