"""Property-based fuzzing (hypothesis, a small budget here; scripts/fuzz.py runs 10,000 cases): mask
building, dataset records and LoRA key conversion only ever raise the package's named errors
(ValueError), and what succeeds keeps its promises (token-grid shape, PIL-exact masks, sample sizes,
tensors out of the conversion). The inputs are built by tests/support/fuzz_cases.py from hypothesis' Random."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_cases
from tiny_models import tiny_flux

BUDGET = settings(max_examples=60, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fuzz_dataset"))
    fuzz_cases.make_dataset_folder(path)
    return path


@pytest.fixture(scope="module")
def model():
    return tiny_flux()


def check(target, rng, folder=None, model=None):
    error = fuzz_cases.run_one(target, rng, folder, model)
    if error is not None and not isinstance(error, fuzz_cases.EXPECTED):
        raise error
    return error


@BUDGET
@given(rng=st.randoms(use_true_random=False))
def test_mask_building_raises_only_named_errors(rng):
    check("masks", rng)


@BUDGET
@given(rng=st.randoms(use_true_random=False))
def test_dataset_records_raise_only_named_errors(folder, rng):
    check("dataset_records", rng, folder=folder)


@BUDGET
@given(rng=st.randoms(use_true_random=False))
def test_lora_key_conversion_raises_only_named_errors(model, rng):
    check("lora_keys", rng, model=model)


def test_the_generators_reach_both_outcomes(folder, model):
    """The fuzzer is not all-refusals: every target also produces inputs that pass."""
    for target in fuzz_cases.TARGETS:
        outcomes = {check(target, fuzz_cases.case_rng(7, i), folder, model) is None for i in range(60)}
        assert outcomes == {True, False}, target
