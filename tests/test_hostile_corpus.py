"""Hostile inputs on the corpus and tokenizer stages: special files, symlinks, pathological
documents, malformed JSONL/parquet, lying corpus and token manifests, bad `--out`.

A hostile file inside a source folder (or row of a dataset) is skipped and counted in
corpus.json, per docs/corpus.md; everything else is refused in one line naming the file, line or
field. Skipped-and-counted cases add themselves to the tally after their assertions."""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import hostile
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hostile import assert_refused, run_cli, run_cli_process

from shipkit.corpus import MAX_DOCUMENT_BYTES, MAX_JSONL_LINE_BYTES, MAX_LINE_CHARS
from shipkit.tokenize import MANIFEST_FORMAT, ShardWriter

SECRET = "AKIA_NOT_FOR_TRAINING = 'hostile'\n"
GOOD_FILES = 24  # distinct small documents, so both splits of a 0.5 val fraction hold some


def _good_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for index in range(GOOD_FILES):
        (root / f"module_{index}.py").write_text(f"def f_{index}(x):\n    return x * {index}\n")
    return root


def _build(*args: str | Path) -> tuple[dict, list[str]]:
    """`shipkit corpus build ARGS --json` that must succeed: (corpus.json, every kept text)."""
    out = Path(args[args.index("--out") + 1])
    outcome = run_cli("corpus", "build", *args, "--val-fraction", "0.5", "--json")
    assert outcome.exit_code == 0, outcome.stderr
    texts = [json.loads(line)["text"] for shard in sorted(out.glob("*.jsonl")) for line in shard.open()]
    return json.loads(outcome.stdout), texts


def _handled() -> None:
    """A hostile input handled by its documented outcome (not refused) is still counted."""
    hostile.TALLY["corpus"] += 1


def _refused(*args: str | Path, names: str | None = None) -> str:
    return assert_refused(run_cli(*args), "corpus", names=names)


# --- files in a source folder: skipped and counted -------------------------------------------


def _fifo(folder: Path) -> None:
    os.mkfifo(folder / "x.py")


def _socket(folder: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "s.py"))
    server.close()


def _device(folder: Path) -> None:
    try:
        os.mknod(folder / "zero.py", 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero never ends
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")


def _link(name: str, target: str | Path) -> Callable[[Path], None]:
    return lambda folder: (folder / name).symlink_to(target)


def _outside_secret(folder: Path) -> None:
    (folder.parent / "secrets.py").write_text(SECRET)
    (folder / "innocent.py").symlink_to(folder.parent / "secrets.py")


def _sibling_secret(folder: Path) -> None:
    (folder.parent / "other").mkdir()
    (folder.parent / "other" / "keys.py").write_text(SECRET)
    (folder / "relative.py").symlink_to(Path("..") / "other" / "keys.py")


def _loop_pair(folder: Path) -> None:
    (folder / "a.py").symlink_to("b.py")
    (folder / "b.py").symlink_to("a.py")


def _link_to_fifo(folder: Path) -> None:
    os.mkfifo(folder / "pipe")
    (folder / "pipe.py").symlink_to("pipe")


def _write(name: str, content: Callable[[], str | bytes]) -> Callable[[Path], None]:
    def plant(folder: Path) -> None:
        data = content()
        (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return plant


def _one_line(size: int) -> str:
    """Minified code: `size` characters and no newline."""
    return ("x=1;" * (size // 4 + 1))[:size]


SKIPPED_FILES = {
    "FIFO named x.py": (_fifo, {"special_files": 1}),
    "unix socket named s.py": (_socket, {"special_files": 1}),
    "character device named zero.py": (_device, {"special_files": 1}),
    "symlink to a FIFO in the folder": (_link_to_fifo, {"special_files": 1}),
    "symlink to itself": (_link("self.py", "self.py"), {"symlinks": 1}),
    "two symlinks in a loop": (_loop_pair, {"symlinks": 2}),
    "dangling symlink": (_link("gone.py", "nowhere.py"), {"symlinks": 1}),
    "symlink to a file outside the folder": (_outside_secret, {"symlinks": 1}),
    "relative symlink climbing to a sibling folder": (_sibling_secret, {"symlinks": 1}),
    "symlink to /etc/passwd": (_link("passwd.py", "/etc/passwd"), {"symlinks": 1}),
    "symlink to /dev/zero": (_link("zeros.py", "/dev/zero"), {"symlinks": 1}),
    "50 MB one-line file": (_write("bundle.min.py", lambda: _one_line(50 << 20)), {"too_large": 1}),
    "many-line file one byte over 1 MiB": (
        _write("big.py", lambda: ("# pad\n" * (MAX_DOCUMENT_BYTES // 6 + 1))[: MAX_DOCUMENT_BYTES + 1]), {"too_large": 1}),
    "half a MiB of invalid UTF-8, 1.5 MiB once replaced": (_write("blob.py", lambda: b"\xff" * (MAX_DOCUMENT_BYTES // 2)),
                                                           {"too_large": 1}),
    "200 KB minified one-liner": (_write("min.py", lambda: _one_line(200_000)), {"long_lines": 1}),
    "one line one character too long": (_write("long.py", lambda: "a = 1\n" + "b" * (MAX_LINE_CHARS + 1) + "\n"),
                                         {"long_lines": 1}),
    "a long line in UTF-8 multibyte characters": (_write("wide.py", lambda: "s = '" + "é" * MAX_LINE_CHARS + "'\n"),
                                                  {"long_lines": 1}),
}


@pytest.mark.parametrize("case", list(SKIPPED_FILES))
def test_hostile_folder_files_are_skipped_and_counted(tmp_path, case):
    plant, skipped = SKIPPED_FILES[case]
    folder = _good_folder(tmp_path / "src")
    plant(folder)
    manifest, texts = _build(folder, "--out", tmp_path / "out")
    assert {reason: count for reason, count in manifest["skipped"].items() if count} == skipped
    assert manifest["sources"][0]["skipped"] == manifest["skipped"]
    assert manifest["docs_read"] == GOOD_FILES and len(texts) == GOOD_FILES
    assert not any(SECRET in text for text in texts)
    _handled()


def test_a_fifo_named_like_source_never_blocks_the_build(tmp_path):
    """In a separate process with a deadline: a blocking read would hang, not fail."""
    folder = _good_folder(tmp_path / "src")
    os.mkfifo(folder / "x.py")
    outcome = run_cli_process("corpus", "build", folder, "--out", tmp_path / "out", "--val-fraction", "0.5",
                              timeout=120)
    assert outcome.exit_code == 0, outcome.stderr
    assert "1 skipped (1 special_files)" in outcome.stdout
    _handled()


def test_documents_at_the_bounds_are_kept(tmp_path):
    folder = _good_folder(tmp_path / "src")
    (folder / "edge.py").write_text(("#" * (MAX_LINE_CHARS - 1) + "\n") * (MAX_DOCUMENT_BYTES // MAX_LINE_CHARS))
    (folder / "line.py").write_text("x = '" + "y" * (MAX_LINE_CHARS - 6) + "'\n")
    manifest, _ = _build(folder, "--out", tmp_path / "out")
    assert not any(manifest["skipped"].values()) and manifest["docs_read"] == GOOD_FILES + 2


def test_folder_symlink_loops_are_not_entered(tmp_path):
    folder = _good_folder(tmp_path / "src")
    (folder / "sub").mkdir()
    (folder / "sub" / "loop").symlink_to("..")
    (folder / "up").symlink_to(folder)
    manifest, texts = _build(folder, "--out", tmp_path / "out")
    assert manifest["docs_read"] == GOOD_FILES and len(texts) == GOOD_FILES
    _handled()


def test_folder_symlinks_out_of_the_source_are_not_entered(tmp_path):
    folder = _good_folder(tmp_path / "src")
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "keys.py").write_text(SECRET)
    (folder / "vendor").symlink_to(tmp_path / "private")
    manifest, texts = _build(folder, "--out", tmp_path / "out")
    assert manifest["docs_read"] == GOOD_FILES and not any(SECRET in text for text in texts)
    _handled()


UNUSUAL_FILES = {
    "empty file": (b"", "empty_dropped", 1),
    "whitespace-only file": (b" \n\t\n\r\n", "empty_dropped", 1),
    "invalid UTF-8": (b"x = '\xff\xfe\xc3'\n", "undecodable", 3),
    "UTF-16 with its BOM": ("def f():\n    pass\n".encode("utf-16"), "undecodable", 2),
    "random binary": (bytes(range(256)) * 4, "undecodable", 512),
}


@pytest.mark.parametrize("case", list(UNUSUAL_FILES))
def test_empty_and_undecodable_files_are_dropped_or_replaced_and_counted(tmp_path, case):
    content, field, count = UNUSUAL_FILES[case]
    folder = _good_folder(tmp_path / "src")
    (folder / "odd.py").write_bytes(content)
    manifest, texts = _build(folder, "--out", tmp_path / "out")
    counted = manifest["undecodable"]["bytes"] if field == "undecodable" else manifest[field]
    assert counted == count
    if field == "undecodable":
        assert manifest["undecodable"]["docs"] == 1 and any("\ufffd" in text for text in texts)
    _handled()


def test_a_file_name_holding_a_newline_is_kept_under_its_name(tmp_path):
    folder = _good_folder(tmp_path / "src")
    (folder / "two\nlines.py").write_text("print('named oddly')\n")
    _, texts = _build(folder, "--out", tmp_path / "out")
    assert "print('named oddly')\n" in texts
    _handled()


def test_a_folder_of_only_hostile_files_is_an_empty_corpus_naming_what_was_skipped(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    os.mkfifo(folder / "x.py")
    (folder / "loop.py").symlink_to("loop.py")
    (folder / "min.py").write_text(_one_line(MAX_LINE_CHARS + 1))
    line = _refused("corpus", "build", folder, "--out", tmp_path / "out", names="empty corpus")
    assert "3 skipped (1 special_files, 1 symlinks, 1 long_lines)" in line


# --- sources that are not sources ------------------------------------------------------------


def test_a_fifo_given_as_a_jsonl_source_is_refused(tmp_path):
    os.mkfifo(tmp_path / "data.jsonl")
    _refused("corpus", "build", tmp_path / "data.jsonl", "--out", tmp_path / "out", names="not a regular file")


def test_a_fifo_given_as_a_parquet_source_is_refused(tmp_path):
    os.mkfifo(tmp_path / "data.parquet")
    _refused("corpus", "build", tmp_path / "data.parquet", "--out", tmp_path / "out", names="data.parquet")


def test_a_symlink_loop_given_as_a_source_is_refused(tmp_path):
    (tmp_path / "loop.jsonl").symlink_to("loop.jsonl")
    _refused("corpus", "build", tmp_path / "loop.jsonl", "--out", tmp_path / "out", names="loop.jsonl")


def test_a_missing_source_is_refused(tmp_path):
    _refused("corpus", "build", tmp_path / "nope", "--out", tmp_path / "out", names="no such file or folder")


def test_an_unsupported_source_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello\n")
    _refused("corpus", "build", tmp_path / "notes.txt", "--out", tmp_path / "out", names="unsupported source")


# --- JSONL sources -----------------------------------------------------------------------------


def _jsonl(path: Path, *lines: str | bytes) -> Path:
    good = [json.dumps({"text": f"v_{index} = {index}\n"}) for index in range(GOOD_FILES)]
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in [*good, *lines]))
    return path


BAD_JSONL = {
    "200k-deep array": ("[" * 200_000 + "]" * 200_000, "data.jsonl:25: JSON nested deeper than the parser"),
    "200k-deep object": ('{"a":' * 200_000 + "1" + "}" * 200_000, "data.jsonl:25: JSON nested deeper"),
    "deep nesting inside the text value": ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}",
                                           "data.jsonl:25: JSON nested deeper"),
    "text is an int": ('{"text": 5}', "data.jsonl:25: 'text' is a int, not a string"),
    "text is a list": ('{"text": ["a"]}', "'text' is a list, not a string"),
    "text is an object": ('{"text": {"a": 1}}', "'text' is a dict, not a string"),
    "text is a bool": ('{"text": true}', "'text' is a bool, not a string"),
    "text is NaN": ('{"text": NaN}', "'text' is a float, not a string"),
    "a top-level array": ('["text"]', "data.jsonl:25: expected a JSON object, got list"),
    "a top-level string": ('"text"', "expected a JSON object, got str"),
    "a top-level null": ("null", "expected a JSON object, got NoneType"),
    "truncated JSON": ('{"text": "abc', "data.jsonl:25: invalid JSON"),
    "a raw control character in a string": ('{"text": "a\x01b"}', "data.jsonl:25: invalid JSON"),
    "no text column": ('{"body": "x"}', "data.jsonl:25: no column 'text'"),
}


@pytest.mark.parametrize("case", list(BAD_JSONL))
def test_malformed_jsonl_lines_are_refused_naming_file_and_line(tmp_path, case):
    line, names = BAD_JSONL[case]
    source = _jsonl(tmp_path / "data.jsonl", line)
    _refused("corpus", "build", source, "--out", tmp_path / "out", names=names)


def test_an_empty_jsonl_file_is_an_empty_corpus(tmp_path):
    (tmp_path / "data.jsonl").write_text("\n\n   \n")
    _refused("corpus", "build", tmp_path / "data.jsonl", "--out", tmp_path / "out", names="empty corpus")


def test_a_missing_named_text_column_is_refused(tmp_path):
    source = _jsonl(tmp_path / "data.jsonl")
    _refused("corpus", "build", source, "--out", tmp_path / "out", "--text-column", "code",
             names="data.jsonl:1: no column 'code'")


SKIPPED_ROWS = {
    "a JSONL line over 16 MiB": (lambda: json.dumps({"text": "y" * (MAX_JSONL_LINE_BYTES + 1)}), "too_large"),
    "a 2 MiB document": (lambda: json.dumps({"text": "z = 1\n" * (2 * MAX_DOCUMENT_BYTES // 6)}), "too_large"),
    "a document with a 20k-character line": (lambda: json.dumps({"text": "q" * 20_000}), "long_lines"),
}


@pytest.mark.parametrize("case", list(SKIPPED_ROWS))
def test_oversized_jsonl_rows_are_skipped_and_counted(tmp_path, case):
    line, reason = SKIPPED_ROWS[case]
    source = _jsonl(tmp_path / "data.jsonl", line(), json.dumps({"text": "after = True\n"}))
    manifest, texts = _build(source, "--out", tmp_path / "out")
    assert manifest["skipped"][reason] == 1 and "after = True\n" in texts
    _handled()


@pytest.mark.parametrize("line, replaced", [(b'{"text": "bad \xff\xfe byte"}', 2), (b'{"text": "lone \\ud800 half"}', 1)])
def test_undecodable_jsonl_text_is_replaced_and_counted(tmp_path, line, replaced):
    manifest, _ = _build(_jsonl(tmp_path / "data.jsonl", line), "--out", tmp_path / "out")
    assert manifest["undecodable"] == {"bytes": replaced, "docs": 1}
    _handled()


# --- parquet sources -------------------------------------------------------------------------


def _parquet(path: Path, column: pa.Array, name: str = "content") -> Path:
    pq.write_table(pa.table({name: column}), path)
    return path


BAD_PARQUET = {
    "an int column": (pa.array(list(range(GOOD_FILES))), "column 'content' holds int64, not text"),
    "a float column": (pa.array([0.5] * GOOD_FILES), "holds double, not text"),
    "a bool column": (pa.array([True] * GOOD_FILES), "holds bool, not text"),
    "a list column": (pa.array([["a", "b"]] * GOOD_FILES), "column 'content' holds list<"),
    "a struct column": (pa.array([{"a": "x"}] * GOOD_FILES), "holds struct<a: string>, not text"),
}


@pytest.mark.parametrize("case", list(BAD_PARQUET))
def test_wrong_typed_parquet_columns_are_refused_naming_the_column(tmp_path, case):
    column, names = BAD_PARQUET[case]
    source = _parquet(tmp_path / "data.parquet", column)
    _refused("corpus", "build", source, "--out", tmp_path / "out", names=names)


def _good_parquet(path: Path) -> Path:
    return _parquet(path, pa.array([f"w_{index} = {index}\n" for index in range(GOOD_FILES)]))


def test_random_bytes_named_parquet_are_refused(tmp_path):
    (tmp_path / "data.parquet").write_bytes(os.urandom(4096))
    _refused("corpus", "build", tmp_path / "data.parquet", "--out", tmp_path / "out",
             names="data.parquet: not a readable parquet file")


def test_a_truncated_parquet_is_refused(tmp_path):
    source = _good_parquet(tmp_path / "data.parquet")
    source.write_bytes(source.read_bytes()[:-20])
    _refused("corpus", "build", source, "--out", tmp_path / "out", names="data.parquet: not a readable parquet file")


def test_a_parquet_without_a_text_column_lists_its_columns(tmp_path):
    source = _parquet(tmp_path / "data.parquet", pa.array(["x"] * 3), name="body")
    _refused("corpus", "build", source, "--out", tmp_path / "out", names="columns are: body")


def test_an_empty_parquet_is_an_empty_corpus(tmp_path):
    source = _parquet(tmp_path / "data.parquet", pa.array([], type=pa.string()))
    _refused("corpus", "build", source, "--out", tmp_path / "out", names="empty corpus")


@pytest.mark.parametrize("text, reason", [("r = 2\n" * (2 * MAX_DOCUMENT_BYTES // 6), "too_large"),
                                          ("s" * (2 * MAX_LINE_CHARS), "long_lines")])
def test_oversized_parquet_rows_are_skipped_and_counted(tmp_path, text, reason):
    rows = [f"w_{index} = {index}\n" for index in range(GOOD_FILES)] + [text]
    manifest, texts = _build(_parquet(tmp_path / "data.parquet", pa.array(rows)), "--out", tmp_path / "out")
    assert manifest["skipped"][reason] == 1 and len(texts) == GOOD_FILES
    _handled()


def test_undecodable_parquet_binary_is_replaced_and_counted(tmp_path):
    rows = [f"w_{index} = {index}\n".encode() for index in range(GOOD_FILES)] + [b"bad \xff byte"]
    manifest, _ = _build(_parquet(tmp_path / "data.parquet", pa.array(rows, type=pa.binary())), "--out", tmp_path / "out")
    assert manifest["undecodable"] == {"bytes": 1, "docs": 1}
    _handled()


# --- --out -----------------------------------------------------------------------------------


def test_corpus_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    _refused("corpus", "build", _good_folder(tmp_path / "src"), "--out", tmp_path / "out", names="--out")


def test_corpus_out_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    _refused("corpus", "build", _good_folder(tmp_path / "src"), "--out", tmp_path / "file" / "out", names="--out")


def test_corpus_out_that_is_a_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "out")
    _refused("corpus", "build", _good_folder(tmp_path / "src"), "--out", tmp_path / "out", names="--out")


# --- what `tokenize` reads: the corpus folder ------------------------------------------------


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    _build(_good_folder(tmp_path / "src"), "--out", tmp_path / "corpus")
    return tmp_path / "corpus"


def test_a_50_mb_one_line_file_never_reaches_the_tokenizer(tmp_path):
    """The issue's case: skipped by `corpus build`, so `tokenize train` runs in moments."""
    folder = _good_folder(tmp_path / "src")
    (folder / "bundle.min.py").write_text(_one_line(50 << 20))
    _build(folder, "--out", tmp_path / "corpus")
    outcome = run_cli("tokenize", "train", tmp_path / "corpus", "--out", tmp_path / "tokens", "--vocab-size", "300")
    assert outcome.exit_code == 0, outcome.stderr
    _handled()


def _corpus_json(corpus_dir: Path, change: Callable[[dict], object]) -> None:
    path = corpus_dir / "corpus.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _first_shard(data: dict) -> dict:
    return data["splits"]["train"]["shards"][0]


CORPUS_LIES = {
    "a shard path climbing out": (lambda d: _first_shard(d).update(file="../src/module_0.py"),
                                  "field splits.train.shards.0.file: '../src/module_0.py' is not a file name"),
    "an absolute shard path": (lambda d: _first_shard(d).update(file="/etc/passwd"), "'/etc/passwd' is not a file name"),
    "a shard path in a subfolder": (lambda d: _first_shard(d).update(file="sub/train-00000.jsonl"), "is not a file name"),
    "a shard named ..": (lambda d: _first_shard(d).update(file=".."), "'..' is not a file name"),
    "an empty shard name": (lambda d: _first_shard(d).update(file=""), "'' is not a file name"),
    "a shard name that is a number": (lambda d: _first_shard(d).update(file=7),
                                      "field splits.train.shards.0.file is a int, expected str"),
    "docs as a string": (lambda d: d["splits"]["train"].update(docs="many"), "field splits.train.docs is a str"),
    "docs negative": (lambda d: d["splits"]["train"].update(docs=-1), "field splits.train.docs is -1"),
    "no splits": (lambda d: d.pop("splits"), "field splits.train.docs is missing"),
    "shards as an object": (lambda d: d["splits"]["val"].update(shards={"file": "val-00000.jsonl"}),
                            "field splits.val.shards is a dict, expected list"),
    "a shard entry as a string": (lambda d: d["splits"]["train"].update(shards=["train-00000.jsonl"]),
                                  "field splits.train.shards.0.file is missing"),
    "another format": (lambda d: d.update(format="shipkit-corpus/9"), "format 'shipkit-corpus/9'"),
}


@pytest.mark.parametrize("case", list(CORPUS_LIES))
def test_tokenize_refuses_a_lying_corpus_manifest_naming_the_field(corpus_dir, tmp_path, case):
    change, names = CORPUS_LIES[case]
    _corpus_json(corpus_dir, change)
    _refused("tokenize", "train", corpus_dir, "--out", tmp_path / "tokens", "--vocab-size", "300",
             names=names)


def test_tokenize_refuses_a_deeply_nested_corpus_manifest(corpus_dir, tmp_path):
    (corpus_dir / "corpus.json").write_text("[" * 100_000 + "]" * 100_000)
    _refused("tokenize", "train", corpus_dir, "--out", tmp_path / "tokens",
             names="corpus.json: unreadable corpus manifest")


def test_tokenize_refuses_a_fifo_in_place_of_the_corpus_manifest(corpus_dir, tmp_path):
    (corpus_dir / "corpus.json").unlink()
    os.mkfifo(corpus_dir / "corpus.json")
    _refused("tokenize", "train", corpus_dir, "--out", tmp_path / "tokens", names="corpus.json: not a regular file")


def _first_shard_path(corpus_dir: Path) -> Path:
    return corpus_dir / json.loads((corpus_dir / "corpus.json").read_text())["splits"]["train"]["shards"][0]["file"]


SHARD_LIES = {
    "a 2 MiB document": (json.dumps({"text": "d = 4\n" * (2 * MAX_DOCUMENT_BYTES // 6)}),
                         "past what `shipkit corpus build` keeps"),
    "a 50k-character line": (json.dumps({"text": "e" * 50_000}), "a line over 10,000 characters"),
    "not JSON": ("{{{", "invalid JSON"),
    "nested 100k deep": ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON nested deeper"),
    "text is an int": (json.dumps({"text": 3}), "not a corpus document"),
    "no text": (json.dumps({"body": "x"}), "not a corpus document"),
    "a top-level list": (json.dumps(["text"]), "not a corpus document"),
    "a line over 16 MiB": (json.dumps({"text": "f" * (MAX_JSONL_LINE_BYTES + 10)}), "a line over 16,777,216 bytes"),
}


@pytest.mark.parametrize("command", ["train", "encode"])
@pytest.mark.parametrize("case", list(SHARD_LIES))
def test_tokenize_refuses_a_hand_edited_corpus_shard_naming_its_line(corpus_dir, tmp_path, case, command):
    line, names = SHARD_LIES[case]
    shard = _first_shard_path(corpus_dir)
    shard.write_text(line + "\n" + shard.read_text())
    extra = ["--vocab-size", "300"] if command == "train" else ["--tokenizer", _tokenizer(tmp_path)]
    message = _refused("tokenize", command, corpus_dir, "--out", tmp_path / "tokens", *extra, names=names)
    assert f"{shard}:1:" in message


def _tokenizer(tmp_path: Path) -> Path:
    """A trained tokenizer.json (on a separate, clean corpus)."""
    clean = tmp_path / "clean"
    _build(_good_folder(tmp_path / "clean-src"), "--out", clean)
    outcome = run_cli("tokenize", "train", clean, "--out", tmp_path / "tok", "--vocab-size", "300")
    assert outcome.exit_code == 0, outcome.stderr
    return tmp_path / "tok" / "tokenizer.json"


def test_tokenize_refuses_a_missing_corpus_shard(corpus_dir, tmp_path):
    shard = _first_shard_path(corpus_dir)
    shard.unlink()
    _refused("tokenize", "train", corpus_dir, "--out", tmp_path / "tokens", names=f"{shard}: listed in corpus.json")


def test_tokenize_refuses_a_fifo_in_place_of_a_corpus_shard(corpus_dir, tmp_path):
    shard = _first_shard_path(corpus_dir)
    shard.unlink()
    os.mkfifo(shard)
    _refused("tokenize", "train", corpus_dir, "--out", tmp_path / "tokens", names="missing or not a regular file")


@pytest.mark.parametrize("command", ["train", "encode"])
def test_tokenize_out_that_is_a_file_is_refused(corpus_dir, tmp_path, command):
    (tmp_path / "tokens").write_text("not a folder")
    _refused("tokenize", command, corpus_dir, "--out", tmp_path / "tokens", names="--out")


def test_tokenize_refuses_a_vocab_size_beyond_32_bit_ids(corpus_dir, tmp_path):
    _refused("tokenize", "train", corpus_dir, "--out", tmp_path / "tokens", "--vocab-size", str(1 << 64),
             names="--vocab-size")


# --- what the trainer reads: a token folder's manifest.json ----------------------------------


def _tokens_dir(root: Path) -> Path:
    """A small, valid token folder written through ShardWriter (ids below 1000, EOT 0)."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, seed in (("train", 1), ("val", 2)):
        writer = ShardWriter(root / f"{split}-00000.tok", np.dtype("<u2"))
        for doc in np.random.default_rng(seed).integers(1, 999, size=(6, 40)):
            writer.write_docs(np.concatenate([[0], doc]).astype(np.uint16), 1)
        info = writer.close()
        splits[split] = {"tokens": info.tokens, "docs": info.docs, "shards": [info.to_dict()]}
    manifest = {"format": MANIFEST_FORMAT, "eot_id": 0, "vocab_size": 1000, "total_tokens": 0,
                "tokenizer": {"file": "tokenizer.json", "sha256": "0" * 64}, "splits": splits}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _train_shard(data: dict) -> dict:
    return data["splits"]["train"]["shards"][0]


MANIFEST_LIES = {
    "a shard path climbing out": (lambda d: _train_shard(d).update(file="../outside.tok"),
                                  "field splits.train.shards.0.file: '../outside.tok' is not a file name"),
    "an absolute shard path": (lambda d: _train_shard(d).update(file="/etc/passwd"), "'/etc/passwd' is not a file name"),
    "a shard in a subfolder": (lambda d: _train_shard(d).update(file="sub/train-00000.tok"), "is not a file name"),
    "a shard with a backslash": (lambda d: _train_shard(d).update(file="..\\train-00000.tok"), "is not a file name"),
    "a shard named ..": (lambda d: _train_shard(d).update(file=".."), "'..' is not a file name"),
    "an empty shard name": (lambda d: _train_shard(d).update(file=""), "'' is not a file name"),
    "a shard name with a NUL": (lambda d: _train_shard(d).update(file="train\u0000.tok"), "is not a file name"),
    "a null shard name": (lambda d: _train_shard(d).update(file=None),
                          "field splits.train.shards.0.file is a NoneType, expected str"),
    "vocab_size as a string": (lambda d: d.update(vocab_size="1000"), "field vocab_size is a str, expected int"),
    "vocab_size as a bool": (lambda d: d.update(vocab_size=True), "field vocab_size is a bool, expected int"),
    "vocab_size as a float": (lambda d: d.update(vocab_size=1000.0), "field vocab_size is a float, expected int"),
    "vocab_size zero": (lambda d: d.update(vocab_size=0), "field vocab_size is 0, expected at least 1"),
    "vocab_size missing": (lambda d: d.pop("vocab_size"), "field vocab_size is missing"),
    "eot_id negative": (lambda d: d.update(eot_id=-1), "field eot_id is -1, expected at least 0"),
    "eot_id outside the vocabulary": (lambda d: d.update(eot_id=1000), "field eot_id 1000 is outside vocab_size 1000"),
    "eot_id as a string": (lambda d: d.update(eot_id="0"), "field eot_id is a str"),
    "no tokenizer": (lambda d: d.pop("tokenizer"), "field tokenizer.sha256 is missing"),
    "tokenizer sha256 a number": (lambda d: d["tokenizer"].update(sha256=0), "field tokenizer.sha256 is a int"),
    "no splits": (lambda d: d.pop("splits"), "field splits.train.tokens is missing"),
    "no val split": (lambda d: d["splits"].pop("val"), "field splits.val.tokens is missing"),
    "splits as a list": (lambda d: d.update(splits=[d["splits"]["train"]]), "field splits.train.tokens is missing"),
    "shards as an object": (lambda d: d["splits"]["train"].update(shards={"file": "train-00000.tok"}),
                            "field splits.train.shards is a dict, expected list"),
    "shards as a string": (lambda d: d["splits"]["train"].update(shards="train-00000.tok"),
                           "field splits.train.shards is a str, expected list"),
    "a shard entry as a list": (lambda d: d["splits"]["train"].update(shards=[["train-00000.tok"]]),
                                "field splits.train.shards.0.file is missing"),
    "shard tokens negative": (lambda d: _train_shard(d).update(tokens=-1), "field splits.train.shards.0.tokens is -1"),
    "shard tokens as a string": (lambda d: _train_shard(d).update(tokens="246"),
                                 "field splits.train.shards.0.tokens is a str"),
    "shard tokens as a float": (lambda d: _train_shard(d).update(tokens=246.0),
                                "field splits.train.shards.0.tokens is a float"),
    "shard docs missing": (lambda d: _train_shard(d).pop("docs"), "field splits.train.shards.0.docs is missing"),
    "shard sha256 missing": (lambda d: _train_shard(d).pop("sha256"), "field splits.train.shards.0.sha256 is missing"),
    "split docs negative": (lambda d: d["splits"]["val"].update(docs=-3), "field splits.val.docs is -3"),
    "split tokens as a string": (lambda d: d["splits"]["val"].update(tokens="lots"), "field splits.val.tokens is a str"),
    "more shard tokens than the file holds": (lambda d: _train_shard(d).update(tokens=10_000),
                                              "train-00000.tok: 246 tokens but manifest.json lists 10000"),
    "a vocabulary smaller than the ids": (lambda d: d.update(vocab_size=10), "is outside the vocabulary of 10"),
    "another format": (lambda d: d.update(format="shipkit-tokens/2"), "format 'shipkit-tokens/2'"),
}


@pytest.mark.parametrize("case", list(MANIFEST_LIES))
def test_a_lying_token_manifest_is_refused_naming_manifest_json_and_the_field(tmp_path, case):
    change, names = MANIFEST_LIES[case]
    tokens_dir = _tokens_dir(tmp_path / "tokens")
    (tmp_path / "outside.tok").write_bytes((tokens_dir / "train-00000.tok").read_bytes())
    path = tokens_dir / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    line = _refused("audit", tokens_dir, names=names)
    assert "manifest.json" in line


@pytest.mark.parametrize("content, names", [
    ("[" * 100_000 + "]" * 100_000, "unreadable token manifest"),
    ("{\"format\": ", "unreadable token manifest"),
    ("[1, 2]", "format None, expected 'shipkit-tokens/1'"),
])
def test_an_unreadable_token_manifest_is_refused(tmp_path, content, names):
    tokens_dir = _tokens_dir(tmp_path / "tokens")
    (tokens_dir / "manifest.json").write_text(content)
    _refused("audit", tokens_dir, names=names)


def test_a_fifo_in_place_of_the_token_manifest_is_refused(tmp_path):
    tokens_dir = _tokens_dir(tmp_path / "tokens")
    (tokens_dir / "manifest.json").unlink()
    os.mkfifo(tokens_dir / "manifest.json")
    _refused("audit", tokens_dir, names="manifest.json: not a regular file")


def test_the_clean_token_folder_passes_the_audit(tmp_path):
    outcome = run_cli("audit", _tokens_dir(tmp_path / "tokens"))
    assert outcome.exit_code == 0, outcome.stderr
