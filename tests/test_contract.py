"""The model contract: packaged defaults, size bands, overrides, and malformed files."""

import pytest

from shipkit.contract import PARITY_METRICS, Threshold, load_contract
from shipkit.errors import InputError

SMALL, LARGE = 400_000_000, 8_000_000_000


def test_default_reference_band_is_llama_cpp_q4_k_m_for_llama_3_8b():
    band, thresholds = load_contract().parity.thresholds_for(LARGE)
    assert band == "reference"
    assert thresholds["kl_mean"].limit == pytest.approx(0.031273)
    assert thresholds["same_top_pct"].limit == pytest.approx(91.901)
    assert thresholds["ppl_ratio"].limit == pytest.approx(1.02816)


def test_default_small_band_applies_up_to_one_billion_parameters():
    parity = load_contract().parity
    assert parity.thresholds_for(1_000_000_000)[0] != "reference"
    assert parity.thresholds_for(1_000_000_001)[0] == "reference"


def test_default_small_band_only_loosens_the_reference():
    parity = load_contract().parity
    reference = parity.thresholds_for(LARGE)[1]
    for metric, small in parity.thresholds_for(SMALL)[1].items():
        strict = reference[metric]
        assert small.direction == strict.direction
        assert small.limit >= strict.limit if small.direction == "max" else small.limit <= strict.limit


def test_default_requires_both_engines_and_agreement_thresholds():
    parity = load_contract().parity
    assert parity.required_engines == ("torch", "llama.cpp")
    assert parity.agreement["top1_pct"].limit == 99.9
    assert parity.agreement["kl_mean"].limit == pytest.approx(1e-4)


def test_every_default_threshold_has_a_reason():
    parity = load_contract().parity
    everything = [*parity.thresholds.values(), *parity.agreement.values(), *parity.tensors.values()]
    everything += [t for band in parity.size_bands for t in band.thresholds.values()]
    assert everything and all(len(t.reason) > 20 for t in everything)


def test_a_contract_file_replaces_the_parity_table(tmp_path):
    path = tmp_path / "model.toml"
    path.write_text('[contract]\nname = "mine"\n[parity]\nrequired_engines = ["torch"]\n'
                    '[parity.thresholds.kl_mean]\nmax = 0.01\nreason = "tight"\n')
    contract = load_contract(path)
    assert contract.name == "mine"
    assert contract.parity.required_engines == ("torch",)
    assert contract.parity.thresholds_for(SMALL) == ("reference", {"kl_mean": Threshold(0.01, "max", "tight")})


def test_a_contract_file_without_parity_inherits_the_default_parity(tmp_path):
    path = tmp_path / "model.toml"
    path.write_text('[contract]\nname = "mine"\n')
    assert load_contract(path).parity == load_contract().parity


@pytest.mark.parametrize(
    "body, named",
    [
        ('[parity.thresholds.kl_mean]\nmax = 0.1\n', "parity.thresholds.kl_mean.reason"),
        ('[parity.thresholds.kl_mean]\nmax = 0.1\nmin = 0.0\nreason = "r"\n', "exactly one of max or min"),
        ('[parity.thresholds.vibes]\nmax = 0.1\nreason = "r"\n', "parity.thresholds.vibes"),
        ('[parity.thresholds.kl_mean]\nmax = "low"\nreason = "r"\n', "expected a number"),
        ('[parity]\nrequired_engines = ["onnx"]\n', "parity.required_engines"),
        ('[parity]\nthreshold = 1\n', "threshold"),
        ('[vibes]\nx = 1\n', "unknown section"),
        ('[[parity.size_bands]]\nname = "s"\nreason = "r"\n', "size_bands[0].max_parameters"),
        ("[parity\n", "not valid TOML"),
    ],
)
def test_malformed_contract_is_an_input_error_naming_the_field(tmp_path, body, named):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(InputError, match="bad.toml") as error:
        load_contract(path)
    assert named in str(error.value)


def test_missing_contract_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_contract(tmp_path / "absent.toml")


def test_thresholds_may_name_every_parity_metric(tmp_path):
    path = tmp_path / "all.toml"
    path.write_text("".join(f'[parity.thresholds.{m}]\nmax = 1.0\nreason = "r"\n' for m in PARITY_METRICS))
    assert set(load_contract(path).parity.thresholds) == set(PARITY_METRICS)


@pytest.mark.parametrize("value", [None, float("nan"), float("inf")])
def test_a_missing_or_non_finite_value_never_passes(value):
    assert not Threshold(1e9, "max", "r").passes(value)
    assert not Threshold(-1e9, "min", "r").passes(value)
