"""The representation contract (tests/contract.py) for every registered model."""

from typing import ClassVar

from contract import RepresentationContract
from helpers import SMALL_MODELS

from atomlens.registry import representation_names


def test_every_registered_representation_has_a_contract_class_and_a_small_model():
    tested = {cls.representation for cls in RepresentationContract.__subclasses__()}
    assert set(representation_names()) <= tested
    assert set(representation_names()) == set(SMALL_MODELS)


class TestSchNetTabulated(RepresentationContract):
    representation = "schnet"
    kwargs: ClassVar[dict] = {
        "n_atom_basis": 12,
        "n_interactions": 2,
        "n_filters": 12,
        "n_rbf": 10,
        "cutoff": 4.5,
        "filter_spacing": 0.01,
    }


class TestSchNetDirect(RepresentationContract):
    representation = "schnet"
    kwargs: ClassVar[dict] = {
        "n_atom_basis": 12,
        "n_interactions": 2,
        "n_filters": 12,
        "n_rbf": 10,
        "cutoff": 4.5,
        "filter_spacing": None,
    }


class TestDTNN(RepresentationContract):
    representation = "dtnn"
    kwargs: ClassVar[dict] = {
        "n_atom_basis": 12,
        "n_interactions": 2,
        "n_factors": 10,
        "n_rbf": 25,
        "cutoff": 5.0,
        "rbf_stop": 5.0,
        "rbf_gamma": 10.0,
    }
