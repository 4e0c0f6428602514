"""Library errors name the field at fault (what a Python caller or a ship.toml user wrote); the
command layer spells that field as the flag the command-line user typed."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from shipkit.cli import main
from shipkit.commands.common import flag_spelling
from shipkit.errors import InputError, IntegrityError
from shipkit.tokenize import TokenizerConfig, train_tokenizer
from shipkit.train.presets import get_preset


def test_flag_spelling_replaces_a_leading_field_only() -> None:
    for message, shown in [("vocab_size 100 is too small", "--vocab-size 100 is too small"),
                           ("vocab_size: too small", "--vocab-size: too small"),
                           ("vocab_sizes 100: another field", "vocab_sizes 100: another field"),
                           ("corpus: vocab_size 100", "corpus: vocab_size 100")]:
        with pytest.raises(InputError) as error, flag_spelling(vocab_size="--vocab-size"):
            raise InputError(message)
        assert str(error.value) == shown


def test_flag_spelling_keeps_the_error_class() -> None:
    with pytest.raises(IntegrityError, match="^--out x: corrupt$"), flag_spelling(out_dir="--out"):
        raise IntegrityError("out_dir x: corrupt")


def test_library_error_names_the_field_and_the_cli_the_flag(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="^vocab_size 100 is too small"):
        train_tokenizer(tmp_path / "corpus", tmp_path / "tokens", TokenizerConfig(vocab_size=100))
    result = CliRunner().invoke(main, ["tokenize", "train", str(tmp_path / "corpus"), "--out",
                                       str(tmp_path / "tokens"), "--vocab-size", "100"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --vocab-size 100 is too small")


def test_unknown_preset_names_the_field_and_the_choices() -> None:
    with pytest.raises(InputError, match="^preset: unknown preset 'huge' \\(one of tiny, model-2\\)$"):
        get_preset("huge")


def test_a_bad_set_item_is_spelled_as_the_set_flag(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                                       "--set", "lr=fast"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --set lr: expected a float, got 'fast'"
