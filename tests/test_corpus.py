"""Corpus building: sources, normalisation, dedup, the hash split and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from shipkit.cli import main
from shipkit.corpus import CorpusConfig, build_corpus, iter_texts
from shipkit.errors import InputError
from shipkit.fsutil import sha256_file

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _docs(corpus_dir: Path, split: str) -> list[dict]:
    return [json.loads(line) for path in sorted(corpus_dir.glob(f"{split}-*.jsonl"))
            for line in path.read_text().splitlines()]


def _shas(corpus_dir: Path, split: str) -> set[str]:
    return {doc["sha256"] for doc in _docs(corpus_dir, split)}


def _numbered(count: int) -> list[dict]:
    return [{"text": f"value_{i} = {i} * {i}\n"} for i in range(count)]


# --- the default corpus -------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[str, list[dict]]]:
    out = tmp_path_factory.mktemp("default-corpus")
    manifest = build_corpus([], out)
    return manifest, {split: _docs(out, split) for split in ("train", "val")}


def _stdlib_python_files() -> list[str]:
    found = []
    for root, dirs, files in os.walk(STDLIB):
        dirs[:] = [name for name in dirs if name not in ("site-packages", "dist-packages")]
        found += [name for name in files if name.endswith(".py")]
    return found


def test_default_corpus_is_this_pythons_stdlib_source(default_corpus: tuple[dict, dict]) -> None:
    manifest, _ = default_corpus
    (source,) = manifest["sources"]
    assert source["path"] == str(STDLIB)
    assert source["files"] == len(_stdlib_python_files())
    assert manifest["splits"]["train"]["bytes"] > 10 << 20


def test_default_corpus_has_no_document_on_both_sides(default_corpus: tuple[dict, dict]) -> None:
    manifest, docs = default_corpus
    assert manifest["duplicates_removed"] > 0
    assert not {doc["sha256"] for doc in docs["train"]} & {doc["sha256"] for doc in docs["val"]}


def test_default_corpus_leaves_out_site_packages(default_corpus: tuple[dict, dict]) -> None:
    _, docs = default_corpus
    assert not any("site-packages" in doc["source"] for split in docs.values() for doc in split)


# --- normalisation, dedup, split ----------------------------------------------------------


def test_each_line_holds_text_its_sha256_and_source(tmp_path: Path) -> None:
    build_corpus([_jsonl(tmp_path / "in.jsonl", _numbered(40))], tmp_path / "out", CorpusConfig(val_fraction=0.2))
    for doc in _docs(tmp_path / "out", "train") + _docs(tmp_path / "out", "val"):
        assert set(doc) == {"text", "sha256", "source"}
        assert doc["sha256"] == hashlib.sha256(doc["text"].encode()).hexdigest()
        assert doc["source"].startswith("in.jsonl:")


def test_exact_duplicates_are_kept_once(tmp_path: Path) -> None:
    records = _numbered(30) + [{"text": "print('again')\n"}] * 5
    manifest = build_corpus([_jsonl(tmp_path / "in.jsonl", records)], tmp_path / "out", CorpusConfig(val_fraction=0.2))
    assert manifest["duplicates_removed"] == 4
    assert manifest["splits"]["train"]["docs"] + manifest["splits"]["val"]["docs"] == 31


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from([f"doc {i}\n" for i in range(12)] + ["", " \n", "doc 1\r\n"]), min_size=1, max_size=60))
def test_split_partitions_the_distinct_texts(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> None:
    root = tmp_path_factory.mktemp("split")
    distinct = {text.replace("\r\n", "\n") for text in texts if text.strip()}
    source = _jsonl(root / "in.jsonl", [{"text": text} for text in texts])
    try:
        build_corpus([source], root / "out", CorpusConfig(val_fraction=0.3))
    except InputError:  # an empty corpus or an empty split
        return
    train, val = set(iter_texts(root / "out", "train")), set(iter_texts(root / "out", "val"))
    assert not train & val
    assert train | val == distinct


def test_split_ignores_source_order(tmp_path: Path) -> None:
    first = _jsonl(tmp_path / "a.jsonl", _numbered(50))
    second = _jsonl(tmp_path / "b.jsonl", [{"text": f"other_{i}()\n"} for i in range(50)])
    build_corpus([first, second], tmp_path / "ab", CorpusConfig(val_fraction=0.2))
    build_corpus([second, first], tmp_path / "ba", CorpusConfig(val_fraction=0.2))
    assert _shas(tmp_path / "ab", "val") == _shas(tmp_path / "ba", "val")


def test_seed_changes_the_split(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "in.jsonl", _numbered(100))
    build_corpus([source], tmp_path / "s0", CorpusConfig(val_fraction=0.2, seed=0))
    build_corpus([source], tmp_path / "s1", CorpusConfig(val_fraction=0.2, seed=1))
    assert _shas(tmp_path / "s0", "val") != _shas(tmp_path / "s1", "val")


def test_val_fraction_sets_the_share_of_val_documents(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "in.jsonl", _numbered(4000))
    manifest = build_corpus([source], tmp_path / "out", CorpusConfig(val_fraction=0.1))
    assert 0.08 < manifest["splits"]["val"]["docs"] / 4000 < 0.12


def test_undecodable_bytes_are_replaced_and_counted(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "latin1.py").write_bytes(b"name = 'caf\xe9 cr\xe8me'\n")
    for i in range(20):
        (tmp_path / "src" / f"fine{i}.py").write_text(f"x = 'naïve {i}'\n")
    manifest = build_corpus([tmp_path / "src"], tmp_path / "out", CorpusConfig(val_fraction=0.2))
    texts = set(iter_texts(tmp_path / "out", "train")) | set(iter_texts(tmp_path / "out", "val"))
    assert "name = 'caf\ufffd cr\ufffdme'\n" in texts
    assert manifest["undecodable"] == {"bytes": 2, "docs": 1}


def test_crlf_and_lf_copies_are_one_document(tmp_path: Path) -> None:
    records = _numbered(20) + [{"text": "a = 1\r\nb = 2\r\n"}, {"text": "a = 1\nb = 2\n"}]
    manifest = build_corpus([_jsonl(tmp_path / "in.jsonl", records)], tmp_path / "out", CorpusConfig(val_fraction=0.2))
    assert manifest["duplicates_removed"] == 1


def test_empty_and_blank_documents_are_dropped(tmp_path: Path) -> None:
    records = _numbered(20) + [{"text": ""}, {"text": "  \n\t"}, {"text": None}]
    manifest = build_corpus([_jsonl(tmp_path / "in.jsonl", records)], tmp_path / "out", CorpusConfig(val_fraction=0.2))
    assert manifest["empty_dropped"] == 3


def test_large_splits_are_sharded_and_listed_with_hashes(tmp_path: Path) -> None:
    manifest = build_corpus([_jsonl(tmp_path / "in.jsonl", _numbered(2000))], tmp_path / "out",
                            CorpusConfig(val_fraction=0.1, shard_bytes=20_000))
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 1
    assert [shard["file"] for shard in shards] == [f"train-{i:05d}.jsonl" for i in range(len(shards))]
    for shard in shards:
        assert sha256_file(tmp_path / "out" / shard["file"]) == shard["sha256"]
    assert sum(shard["docs"] for shard in shards) == manifest["splits"]["train"]["docs"]


# --- sources ------------------------------------------------------------------------------


def test_folder_sha256_is_that_of_its_sha256sum_listing(tmp_path: Path) -> None:
    folder = tmp_path / "pkg"
    (folder / "sub").mkdir(parents=True)
    files = {f"sub/m{i}.py" if i % 2 else f"m{i}.py": f"import m{i}\n".encode() for i in range(20)}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("not python\n")
    manifest = build_corpus([folder], tmp_path / "out", CorpusConfig(val_fraction=0.2))
    listing = "".join(f"{hashlib.sha256(files[name]).hexdigest()}  {name}\n" for name in sorted(files))
    assert manifest["sources"][0]["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert manifest["sources"][0]["files"] == 20


def test_glob_selects_the_folder_files(tmp_path: Path) -> None:
    for i in range(20):
        (tmp_path / f"m{i}.md").write_text(f"# title {i}\n")
        (tmp_path / f"m{i}.py").write_text(f"x = {i}\n")
    manifest = build_corpus([tmp_path], tmp_path / "out", CorpusConfig(val_fraction=0.2, glob="*.md"))
    assert manifest["sources"][0]["files"] == 20
    assert all(text.startswith("# title") for text in iter_texts(tmp_path / "out", "train"))


def test_parquet_text_column_is_detected(tmp_path: Path) -> None:
    table = pa.table({"repo": ["r"] * 30, "content": [f"def f{i}(): pass\n" for i in range(30)]})
    pq.write_table(table, tmp_path / "code.parquet")
    manifest = build_corpus([tmp_path / "code.parquet"], tmp_path / "out", CorpusConfig(val_fraction=0.2))
    assert manifest["sources"][0]["text_column"] == "content"
    assert manifest["sources"][0]["sha256"] == sha256_file(tmp_path / "code.parquet")
    assert "def f0(): pass\n" in set(iter_texts(tmp_path / "out", "train")) | set(iter_texts(tmp_path / "out", "val"))


def test_parquet_binary_column_is_decoded_with_replacement(tmp_path: Path) -> None:
    values = [f"s{i} = 1\n".encode() for i in range(30)] + [b"bad = '\xff'\n"]
    pq.write_table(pa.table({"code": pa.array(values, pa.binary())}), tmp_path / "bin.parquet")
    manifest = build_corpus([tmp_path / "bin.parquet"], tmp_path / "out", CorpusConfig(val_fraction=0.2))
    assert manifest["undecodable"] == {"bytes": 1, "docs": 1}


def test_missing_text_column_lists_the_columns(tmp_path: Path) -> None:
    pq.write_table(pa.table({"path": ["a.py"], "body": ["x = 1\n"]}), tmp_path / "odd.parquet")
    with pytest.raises(InputError, match=r"odd.parquet.*columns are: path, body"):
        build_corpus([tmp_path / "odd.parquet"], tmp_path / "out")


def test_named_text_column_must_exist(tmp_path: Path) -> None:
    pq.write_table(pa.table({"content": ["x = 1\n"]}), tmp_path / "one.parquet")
    with pytest.raises(InputError, match="no column 'source'; columns are: content"):
        build_corpus([tmp_path / "one.parquet"], tmp_path / "out", CorpusConfig(text_column="source"))


def test_corrupt_parquet_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "broken.parquet").write_bytes(b"PAR1" + b"\x00" * 64)
    with pytest.raises(InputError, match="broken.parquet: not a readable parquet file"):
        build_corpus([tmp_path / "broken.parquet"], tmp_path / "out")


def test_corrupt_jsonl_names_the_file_and_line(tmp_path: Path) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "a = 1"}\n{"text": "b = 2"}\n{"text": "c = \n')
    with pytest.raises(InputError, match="bad.jsonl:3: invalid JSON"):
        build_corpus([source], tmp_path / "out")


def test_jsonl_line_without_the_column_names_the_line(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "mixed.jsonl", [{"code": "a = 1"}, {"code": "b = 2"}, {"body": "c = 3"}])
    with pytest.raises(InputError, match="mixed.jsonl:3: no column 'code'; columns are: body"):
        build_corpus([source], tmp_path / "out")


def test_empty_corpus_is_an_input_error(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "blank.jsonl", [{"text": " "}, {"text": ""}])
    with pytest.raises(InputError, match="empty corpus"):
        build_corpus([source], tmp_path / "out")


def test_cli_exits_2_with_one_line_on_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["corpus", "build", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "empty corpus" in result.output


def test_cli_builds_a_corpus_and_prints_json(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "in.jsonl", _numbered(50))
    result = CliRunner().invoke(main, ["corpus", "build", str(source), "--out", str(tmp_path / "out"),
                                       "--val-fraction", "0.2", "--seed", "7", "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.output)
    assert manifest["split"]["seed"] == 7
    assert manifest == json.loads((tmp_path / "out" / "corpus.json").read_text())
