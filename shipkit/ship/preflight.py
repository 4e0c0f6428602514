"""Nothing is written or deleted outside OUT: the checks `ship` makes before any stage runs (every
input exists, a model's folder holds no symbolic link leading outside OUT and none of the model's
inputs), and the containment test the ledger and every deletion use.
"""

from __future__ import annotations

import os
from pathlib import Path

from shipkit.errors import InputError, ShipkitError
from shipkit.fsutil import check_folder_target
from shipkit.ship.config import ModelSpec, ShipConfig


def check_before_stages(config: ShipConfig) -> None:
    """Raises InputError when OUT is a file, a model's input is missing, or a model's folder holds a
    symbolic link leading outside OUT or would swallow one of its inputs."""
    check_folder_target(config.out, "out")
    for spec in config.models:
        _check_inputs_exist(spec)
        _check_model_folder(config.out, spec)


def _check_inputs_exist(spec: ModelSpec) -> None:
    for source in spec.corpus:
        if not os.path.exists(source):
            raise InputError(f"model {spec.name}: field corpus: {source}: no such file or folder")
    if spec.hf_dir and not os.path.isdir(spec.hf_dir):
        raise InputError(f"model {spec.name}: field hf_dir: {spec.hf_dir}: no such folder")
    if spec.contract and not os.path.isfile(spec.contract):
        raise InputError(f"model {spec.name}: field contract: {spec.contract}: no such file")
    if spec.card_templates:
        from shipkit.card import card_environment

        try:  # checked in full before any stage runs, so a bad template fails now, not after training
            card_environment(spec.card_templates)
        except InputError as error:
            raise InputError(f"model {spec.name}: field card_templates: {error}") from None


def _check_model_folder(out: Path, spec: ModelSpec) -> None:
    """OUT/<name> stays inside OUT (stages write through the folders they find there, and delete
    whole stage folders) and holds none of the model's inputs."""
    root = out / spec.name
    check_folder_target(root, f"model {spec.name}")
    links = [root] if root.is_symlink() else []
    if root.is_dir() and not root.is_symlink():
        for folder, subfolders, files in os.walk(root):  # a link is listed, never entered
            links += [Path(folder) / name for name in subfolders + files if (Path(folder) / name).is_symlink()]
    for link in links:
        target = _real(link)
        if not is_inside(out, target):
            raise InputError(f"{link}: a symbolic link to {target}, outside {out}; ship writes only "
                             "inside its output folder (remove the link)")
    inputs = {"corpus": spec.corpus, "hf_dir": [spec.hf_dir] if spec.hf_dir else [],
              "contract": [spec.contract] if spec.contract else [],
              "card_templates": [spec.card_templates] if spec.card_templates else []}
    for field_name, paths in inputs.items():
        for path in paths:
            if is_inside(root, _real(Path(path))):
                raise InputError(f"model {spec.name}: field {field_name}: {path} lies inside the model's "
                                 f"output folder {root}, which ship rewrites; move it or rename the model")


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symbolic-link loop before Python 3.13
        raise InputError(f"{path}: a symbolic-link loop (remove the link)") from None


def is_inside(folder: Path, path: Path) -> bool:
    """Whether `path` (its last component not followed, if a link) lies strictly inside `folder`."""
    try:
        location, root = path.parent.resolve() / path.name, folder.resolve()
    except (OSError, RuntimeError):  # a symbolic-link loop (RuntimeError before Python 3.13)
        return False
    return location != root and location.is_relative_to(root)


def require_inside(out: Path, path: Path) -> None:
    if not is_inside(out, path):
        raise ShipkitError(f"{path}: lies outside {out}; ship deletes only inside its output folder")

