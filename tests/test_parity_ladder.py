"""Parity over a quant ladder: several GGUFs of the tiny trained model scored in one run that
shares the base model's forward, each judged under its file type's band; a planted bad file
fails only its own line, in the evidence and in `shipkit gates`; an imatrix computed on the val
split fails its gate."""

import json
import shutil
from importlib import resources
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from shipkit.cli import main
from shipkit.contract import load_contract
from shipkit.errors import InputError
from shipkit.evidence import read_evidence
from shipkit.gates import evaluate_gates
from shipkit.imatrix import compute_imatrix, split_sha256
from shipkit.parity import ParityOptions, llama_runtime, run_parity, torch_engine
from shipkit.quantize import write_gguf

CTX = 128
N_TOKENS = 512  # 4 windows of 128: 252 scored positions
# The ladder: the primary (the release default) first, then types smallest-to-largest bits.
PRIMARY, OTHERS = "Q4_K_M", ("Q2_K", "Q4_K_S", "Q6_K", "Q8_0")
IMATRIX_TOKENS = 2048


@pytest.fixture(scope="module")
def ladder(tiny_run_dir, tiny_tokens_dir, tmp_path_factory):
    """The tiny run's best checkpoint and its GGUFs, by file type."""
    folder = tmp_path_factory.mktemp("ladder")
    base = tiny_run_dir / "ckpt" / "best.apr"
    files = {file_type: write_gguf(base, folder / f"tiny-{file_type}.gguf", file_type,
                                   tokenizer_path=tiny_tokens_dir / "tokenizer.json").path
             for file_type in (PRIMARY, *OTHERS)}
    return {"base": base, "tokens": tiny_tokens_dir, "folder": folder, "files": files}


def _options(ladder, primary, *others, **changes):
    options = dict(base=ladder["base"], quant=primary, extra_quants=tuple(others), tokens_dir=ladder["tokens"],
                   n_tokens=N_TOKENS, ctx=CTX)
    return ParityOptions(**{**options, **changes})


@pytest.fixture(scope="module")
def scored(ladder, tmp_path_factory):
    """One parity run over the whole ladder, counting the base model's forwards in each engine:
    torch's trunks (and the models each ran) and llama.cpp's window runs per GGUF."""
    trunks, llama_runs = [], {}
    run_trunk, run_window = torch_engine.run_trunk, llama_runtime.LlamaCppModel.run

    def counting_trunk(models, windows):
        trunks.append(len(models))
        return run_trunk(models, windows)

    def counting_run(self, window):
        llama_runs[self.path.name] = llama_runs.get(self.path.name, 0) + 1
        return run_window(self, window)

    run_dir = tmp_path_factory.mktemp("ladder-run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch_engine, "run_trunk", counting_trunk)
        patch.setattr(llama_runtime.LlamaCppModel, "run", counting_run)
        files = ladder["files"]
        evidence = run_parity(_options(ladder, files[PRIMARY], *(files[t] for t in OTHERS), run_dir=run_dir))
    return {"evidence": evidence, "trunks": trunks, "llama_runs": llama_runs, "run_dir": run_dir}


def _section(evidence, file_type):
    (section,) = [entry for entry in evidence["files"] if entry["file_type"] == file_type]
    return section


def test_one_run_scores_every_file_with_one_base_forward(scored, ladder):
    evidence = scored["evidence"]
    assert evidence["verdict"] == "PASS", evidence["failed"]
    assert [entry["file_type"] for entry in evidence["files"]] == [PRIMARY, *OTHERS]
    # torch: one trunk carried the base and all five quants through the layers together
    assert scored["trunks"] == [1 + 1 + len(OTHERS)]
    # llama.cpp: the base (written as an F32 GGUF) ran each window once, and only the primary quant beside it
    windows = evidence["tokens"]["windows"]
    assert scored["llama_runs"] == {"best-F32.gguf": windows, ladder["files"][PRIMARY].name: windows}
    assert set(_section(evidence, PRIMARY)["engines"]) == {"torch", "llama.cpp"}
    assert all(set(_section(evidence, t)["engines"]) == {"torch"} for t in OTHERS)


def test_each_file_is_judged_under_its_file_type_band(scored, ladder):
    evidence = scored["evidence"]
    contract = load_contract().parity
    for file_type in (PRIMARY, *OTHERS):
        section = _section(evidence, file_type)
        band = contract.band_for(evidence["parameters"], file_type)
        assert section["band"] == band.to_dict()
        assert section["band"]["name"] == f"{file_type} / small (<= 1B parameters)"
        checks = section["engines"]["torch"]["checks"]
        assert {metric: check["limit"] for metric, check in checks.items()} == {
            metric: threshold.limit for metric, threshold in band.thresholds.items()}
        assert section["tensors"]["checks"]["rel_rmse"]["limit"] == band.tensors["rel_rmse"].limit
        assert section["verdict"] == "PASS" and section["failed"] == []
    # each type's own limits: Q8_0 is held far tighter than Q2_K
    kl_limits = {t: _section(evidence, t)["engines"]["torch"]["checks"]["kl_mean"]["limit"] for t in (PRIMARY, *OTHERS)}
    assert kl_limits["Q8_0"] < kl_limits["Q6_K"] < kl_limits[PRIMARY] < kl_limits["Q4_K_S"] < kl_limits["Q2_K"]
    assert kl_limits[PRIMARY] == 0.0625  # the Q4_K_M small band, unchanged


def test_primary_section_is_the_top_level_document(scored):
    evidence = scored["evidence"]
    primary = evidence["files"][0]
    assert primary["primary"] and not any(entry["primary"] for entry in evidence["files"][1:])
    assert primary["sha256"] == evidence["quant"]["sha256"]
    assert primary["engines"] == evidence["engines"]
    assert primary["tensors"] == evidence["tensors"]
    assert primary["tokenizer"]["verdict"] == evidence["tokenizer"]["verdict"] == "PASS"


def test_bits_per_weight_and_size_match_llama_cpp(scored, ladder):
    """bits per weight as llama.cpp's loader computes it (model bytes x 8 / parameters)."""
    evidence = scored["evidence"]
    api = llama_cpp
    for file_type in (PRIMARY, *OTHERS):
        section = _section(evidence, file_type)
        path = ladder["files"][file_type]
        params = api.llama_model_default_params()
        params.use_extra_bufts = False  # llama-cpp-python 0.3.36's extra buffers crash on AMX CPUs
        model = api.llama_model_load_from_file(str(path).encode(), params)
        try:
            size, weights = api.llama_model_size(model), api.llama_model_n_params(model)
        finally:
            api.llama_model_free(model)
        assert section["tensor_bytes"] == size and section["weights"] == weights
        assert section["bits_per_weight"] == pytest.approx(8 * size / weights)
        assert section["bytes"] == path.stat().st_size
        assert section["file_type_id"] == int(GGUFReader(path).fields["general.file_type"].contents())
        assert section["imatrix"] is None
    bits = [_section(evidence, t)["bits_per_weight"] for t in OTHERS]
    assert bits == sorted(bits)  # Q2_K < Q4_K_S < Q6_K < Q8_0


def test_each_file_measures_as_it_does_alone(scored, ladder):
    """Sharing the base forward changes no number: Q6_K scored alone (as the primary) gives the
    ladder's torch metrics and tensor errors, and llama.cpp's own numbers for it agree."""
    alone = run_parity(_options(ladder, ladder["files"]["Q6_K"]))
    section = _section(scored["evidence"], "Q6_K")
    for metric, value in alone["engines"]["torch"]["metrics"].items():
        assert section["metrics"][metric] == pytest.approx(value, rel=1e-9, abs=1e-12), metric
    assert section["tensors"]["worst"] == alone["tensors"]["worst"]
    llama = alone["engines"]["llama.cpp"]["metrics"]
    assert section["metrics"]["kl_mean"] == pytest.approx(llama["kl_mean"], rel=0.5, abs=1e-6)
    assert "files" not in alone  # one file: the document of old


def test_evidence_validates_against_the_schema(scored):
    written = read_evidence(scored["run_dir"], "parity")  # validates
    assert [entry["name"] for entry in written["files"]] == [entry["name"] for entry in scored["evidence"]["files"]]


def _swapped_copy(source: Path, folder: Path) -> Path:
    """A copy of `source` with layer 0's ffn_gate and ffn_up bytes swapped (same type and size)."""
    path = folder / source.name.replace(".gguf", "-swapped.gguf")
    shutil.copyfile(source, path)
    tensors = {tensor.name: tensor for tensor in GGUFReader(path).tensors}
    gate, up = tensors["blk.0.ffn_gate.weight"], tensors["blk.0.ffn_up.weight"]
    assert gate.n_bytes == up.n_bytes and gate.tensor_type == up.tensor_type
    buffer = np.memmap(path, dtype=np.uint8, mode="r+")
    gate_bytes = buffer[gate.data_offset:gate.data_offset + gate.n_bytes].copy()
    buffer[gate.data_offset:gate.data_offset + gate.n_bytes] = buffer[up.data_offset:up.data_offset + up.n_bytes]
    buffer[up.data_offset:up.data_offset + up.n_bytes] = gate_bytes
    buffer.flush()
    return path


@pytest.fixture(scope="module")
def planted(ladder, tmp_path_factory):
    """A ladder whose Q6_K file has two tensors swapped."""
    folder = tmp_path_factory.mktemp("planted")
    bad = _swapped_copy(ladder["files"]["Q6_K"], folder)
    files = [ladder["files"][PRIMARY], ladder["files"]["Q8_0"], bad]
    return {"files": files, "bad": bad, "evidence": run_parity(_options(ladder, *files))}


def test_planted_bad_file_fails_only_its_own_section(planted):
    evidence, bad = planted["evidence"], planted["bad"].name
    assert evidence["verdict"] == "FAIL"
    verdicts = {entry["name"]: entry["verdict"] for entry in evidence["files"]}
    assert verdicts == {planted["files"][0].name: "PASS", planted["files"][1].name: "PASS", bad: "FAIL"}
    assert evidence["failed"] == [f"{bad}: tensors.rel_rmse"]
    flagged = {entry["name"] for entry in evidence["files"][2]["tensors"]["flagged"]}
    assert flagged == {"model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"}
    assert all(cause.startswith(f"{bad}: ") and "swapped" in cause for cause in evidence["causes"])


def test_a_file_with_another_tokenizer_fails_its_section(ladder, tmp_path):
    """Files share the primary's tokenizer verdict only when they store its tokenizer keys."""
    other = tmp_path / "tiny-Q8_0-other-pre.gguf"
    data = bytearray(ladder["files"]["Q8_0"].read_bytes())
    key = b"tokenizer.ggml.pre"
    value = data.index(key) + len(key) + 4 + 8  # the key, then its uint32 type and uint64 length
    data[value] ^= 0x01  # "gpt-2" becomes "fpt-2"
    other.write_bytes(bytes(data))
    evidence = run_parity(_options(ladder, ladder["files"][PRIMARY], other, engines=("torch",)))
    section = evidence["files"][1]
    assert section["verdict"] == "FAIL" and section["failed"] == ["tokenizer.keys"]
    assert section["tokenizer"]["note"].startswith("its tokenizer.ggml.pre differs from tiny-Q4_K_M.gguf's")
    assert "tokenizer.keys" not in evidence["files"][0]["failed"]


def _release_run(tiny_run_dir, files: list[Path], evidence: dict, folder: Path) -> Path:
    """A run folder releasing `files` in release/gguf, with `evidence` as its parity.json."""
    run_dir = shutil.copytree(tiny_run_dir, folder / "run")
    release = run_dir / "release" / "gguf"
    release.mkdir(parents=True)
    for path in files:
        shutil.copyfile(path, release / path.name)
    (run_dir / "evidence" / "parity.json").write_text(json.dumps(evidence))
    return run_dir


def _parity_lines(run_dir: Path) -> dict[str, dict]:
    return {gate["id"]: gate for gate in evaluate_gates(run_dir)["gates"] if gate["id"].startswith("parity.file.")}


def test_gates_fail_the_planted_file_line_only(planted, tiny_run_dir, tmp_path):
    run_dir = _release_run(tiny_run_dir, planted["files"], planted["evidence"], tmp_path)
    lines = _parity_lines(run_dir)
    assert {gate_id: gate["status"] for gate_id, gate in lines.items()} == {
        f"parity.file.{planted['files'][0].name}": "DISCHARGED",
        f"parity.file.{planted['files'][1].name}": "DISCHARGED",
        f"parity.file.{planted['bad'].name}": "FAILED",
    }
    assert "tensors.rel_rmse" in lines[f"parity.file.{planted['bad'].name}"]["detail"]
    assert "Q8_0 / small" in lines[f"parity.file.{planted['files'][1].name}"]["detail"]


@pytest.fixture(scope="module")
def single(ladder):
    """The primary alone, in torch only: a single-file document."""
    return run_parity(_options(ladder, ladder["files"][PRIMARY], engines=("torch",)))


def test_single_file_evidence_adds_no_file_lines(ladder, single, tiny_run_dir, tmp_path):
    evidence = single
    assert "files" not in evidence
    run_dir = _release_run(tiny_run_dir, [ladder["files"][PRIMARY]], evidence, tmp_path)
    assert _parity_lines(run_dir) == {}
    assert "quantize.imatrix_calibration" not in {gate["id"] for gate in evaluate_gates(run_dir)["gates"]}


def test_a_released_file_parity_did_not_measure_fails_its_line(ladder, single, tiny_run_dir, tmp_path):
    run_dir = _release_run(tiny_run_dir, [ladder["files"][PRIMARY], ladder["files"]["Q8_0"]], single, tmp_path)
    lines = _parity_lines(run_dir)
    name = ladder["files"]["Q8_0"].name
    assert list(lines) == [f"parity.file.{name}"] and lines[f"parity.file.{name}"]["status"] == "FAILED"
    assert "did not measure" in lines[f"parity.file.{name}"]["detail"]


def test_cli_scores_several_files_and_exits_1_naming_the_bad_one(ladder, planted):
    runner = CliRunner()
    common = ["--tokens", str(ladder["tokens"]), "--n-tokens", str(N_TOKENS), "--ctx", str(CTX)]
    good = runner.invoke(main, ["parity", str(ladder["base"]), *(str(ladder["files"][t]) for t in (PRIMARY, "Q8_0")),
                                *common])
    assert good.exit_code == 0, good.output
    rows = [line for line in good.output.splitlines() if line.lstrip().startswith("tiny-")]
    assert [row.split()[:2] for row in rows] == [[ladder["files"][PRIMARY].name, PRIMARY],
                                                 [ladder["files"]["Q8_0"].name, "Q8_0"]]
    bad = runner.invoke(main, ["parity", str(ladder["base"]), *map(str, planted["files"]), *common])
    assert bad.exit_code == 1
    assert f"parity gate FAILED: {planted['bad'].name}: tensors.rel_rmse" in bad.output


def test_the_same_file_twice_is_an_input_error(ladder):
    primary = ladder["files"][PRIMARY]
    with pytest.raises(InputError, match="given twice"):
        run_parity(_options(ladder, primary, primary))


def test_a_contract_requiring_llama_cpp_for_every_file_runs_it_for_every_file(ladder, tmp_path):
    contract = tmp_path / "every.toml"
    text = resources.files("shipkit.contracts").joinpath("default.toml").read_text()
    contract.write_text(text.replace('every_file_engines = ["torch"]', 'every_file_engines = ["torch", "llama.cpp"]'))
    files = ladder["files"]
    evidence = run_parity(_options(ladder, files[PRIMARY], files["Q8_0"], contract=contract))
    assert all(set(entry["engines"]) == {"torch", "llama.cpp"} for entry in evidence["files"])
    assert evidence["verdict"] == "PASS", evidence["failed"]


@pytest.fixture(scope="module")
def imatrix_files(ladder, tmp_path_factory):
    """A Q4_K_S made with an imatrix of the train split, one made with an imatrix of the val
    split (a tokens folder whose "train" is the real val split), each beside its imatrix."""
    made = {}
    for name, swap in (("train", False), ("val", True)):
        folder = tmp_path_factory.mktemp(f"imatrix-{name}")
        tokens = ladder["tokens"]
        if swap:
            tokens = shutil.copytree(ladder["tokens"], folder / "tokens")
            manifest = json.loads((tokens / "manifest.json").read_text())
            manifest["splits"]["train"], manifest["splits"]["val"] = manifest["splits"]["val"], manifest["splits"]["train"]
            (tokens / "manifest.json").write_text(json.dumps(manifest))
        imatrix = compute_imatrix(ladder["base"], tokens, folder / f"imatrix-{name}.gguf", n_tokens=IMATRIX_TOKENS,
                                  ctx=CTX).path
        made[name] = write_gguf(ladder["base"], folder / f"tiny-Q4_K_S-imatrix-{name}.gguf", "Q4_K_S",
                                tokenizer_path=ladder["tokens"] / "tokenizer.json", imatrix=imatrix).path
    return made


def test_imatrix_is_recorded_per_file_and_its_calibration_gated(ladder, imatrix_files, tiny_run_dir, tmp_path):
    files = [ladder["files"][PRIMARY], imatrix_files["train"]]
    evidence = run_parity(_options(ladder, *files, engines=("torch",)))
    section = evidence["files"][1]
    imatrix = section["imatrix"]
    manifest = json.loads((ladder["tokens"] / "manifest.json").read_text())
    assert imatrix["file"] == "imatrix-train.gguf" and imatrix["entries"] > 0
    assert imatrix["split_sha256"] == split_sha256(manifest, "train")
    assert imatrix["sha256"] is not None and imatrix["dataset"].startswith("shipkit-tokens train sha256:")
    assert evidence["files"][0]["imatrix"] is None
    run_dir = _release_run(tiny_run_dir, [*files, imatrix_files["train"].parent / "imatrix-train.gguf"], evidence,
                           tmp_path)
    gates = {gate["id"]: gate for gate in evaluate_gates(run_dir)["gates"]}
    assert gates["quantize.imatrix_calibration"]["status"] == "DISCHARGED"
    assert [gate_id for gate_id in gates if gate_id.startswith("parity.file.")] == [
        f"parity.file.{path.name}" for path in files]  # the released imatrix is not a model file


def test_imatrix_of_the_val_split_fails_its_gate(ladder, imatrix_files, tiny_run_dir, tmp_path):
    files = [ladder["files"][PRIMARY], imatrix_files["val"]]
    evidence = run_parity(_options(ladder, *files, engines=("torch",)))
    run_dir = _release_run(tiny_run_dir, [*files, imatrix_files["val"].parent / "imatrix-val.gguf"], evidence,
                           tmp_path)
    gate = {gate["id"]: gate for gate in evaluate_gates(run_dir)["gates"]}["quantize.imatrix_calibration"]
    assert gate["status"] == "FAILED"
    assert imatrix_files["val"].name in gate["detail"] and "not the train split" in gate["detail"]


def test_bands_only_ever_loosen_for_the_small_size_band():
    contract = load_contract().parity
    small, large = 400_000_000, 8_000_000_000
    for file_type in contract.file_types:
        strict, loose = contract.band_for(large, file_type), contract.band_for(small, file_type)
        assert strict.file_type == loose.file_type == file_type
        for metric, threshold in loose.thresholds.items():
            reference = strict.thresholds[metric]
            assert threshold.direction == reference.direction
            assert threshold.limit >= reference.limit if threshold.direction == "max" else threshold.limit <= reference.limit
            assert len(threshold.reason) > 20



@pytest.mark.parametrize(
    "body, named",
    [
        ('[parity.file_types.Q4_KM]\nreference = "r"\n', "parity.file_types.Q4_KM"),
        ('[parity.file_types.Q8_0]\nthresholds.kl_mean = { max = 0.1, reason = "r" }\n',
         "parity.file_types.Q8_0.reference"),
        ('[parity.file_types.Q8_0]\nreference = "r"\ntensors.kl_mean = { max = 0.1, reason = "r" }\n',
         "parity.file_types.Q8_0.tensors.kl_mean"),
        ('[parity]\nevery_file_engines = ["onnx"]\n', "parity.every_file_engines"),
        ('[parity]\nreference_file_type = "Q9_K"\n', "parity.reference_file_type"),
        ('[[parity.size_bands]]\nname = "s"\nmax_parameters = 1\nreason = "r"\n'
         '[parity.size_bands.file_types.Q8_0.vibes]\nmax = 1\nreason = "r"\n', "size_bands[0].file_types.Q8_0.vibes"),
    ],
)
def test_malformed_file_type_band_is_an_input_error_naming_the_field(tmp_path, body, named):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(InputError, match=named.replace("[", r"\[").replace("]", r"\]")) as refused:
        load_contract(path)
    assert "\n" not in str(refused.value)


def test_a_type_without_a_band_is_held_to_the_reference_thresholds(tmp_path):
    path = tmp_path / "own.toml"
    path.write_text('[parity]\nreference = "ours"\nreference_file_type = "Q8_0"\n'
                    '[parity.thresholds.kl_mean]\nmax = 0.01\nreason = "our Q8_0"\n'
                    '[parity.file_types.Q4_K_M]\nreference = "our Q4_K_M"\n'
                    'thresholds.kl_mean = { max = 0.05, reason = "our Q4_K_M" }\n'
                    'tensors.rel_rmse = { max = 0.2, reason = "tight" }\n')
    parity = load_contract(path).parity
    q4, q8, q2 = (parity.band_for(1000, file_type) for file_type in ("Q4_K_M", "Q8_0", "Q2_K"))
    assert (q4.file_type, q4.reference, q4.thresholds["kl_mean"].limit, q4.tensors["rel_rmse"].limit) == (
        "Q4_K_M", "our Q4_K_M", 0.05, 0.2)
    assert (q8.file_type, q8.reference, q8.thresholds["kl_mean"].limit, q8.tensors) == ("Q8_0", "ours", 0.01, {})
    assert (q2.file_type, q2.name) == (None, "reference / reference")
