"""The general.* keys that say where a model came from: its license and the model it derives from.

An imported checkpoint records its upstream in the APR's `producer.source`
(`{"base_model": "Qwen/Qwen2.5-Coder-7B" or a folder name, "license": ...}`). llama.cpp's
converter derives the same keys from a model card's `base_model:` and `license:` front matter
(gguf-py `Metadata.apply_metadata_heuristic`); `source_metadata` applies gguf-py's own helpers to
the recorded values, so an import and a convert_hf_to_gguf.py run of the same folder agree.
general.name stays the release name (gguf_export writes it); see docs/import.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import gguf

UNKNOWN_LICENSE = "unknown"  # what import records when the folder names no license
HF_URL = re.compile(r"https?://huggingface.co/([^/]+/[^/]+)$")
URL_SCHEMES = ("http://", "https://", "ssh://")
HF_BASE_URL = "https://huggingface.co"
BASE_MODEL_FIELDS = ("name", "organization", "version", "repo_url")


def source_metadata(source: Mapping[str, Any]) -> dict[str, Any]:
    """GGUF key -> value: general.license, general.basename and general.base_model.count /
    .0.name / .0.organization / .0.version / .0.repo_url, those the source determines."""
    keys: dict[str, Any] = {}
    license = source.get("license")
    if license and license != UNKNOWN_LICENSE:
        keys[gguf.Keys.General.LICENSE] = ",".join(license) if isinstance(license, list) else license
    base_model = source.get("base_model")
    if not base_model:
        return keys
    entry, model_id = _base_model_entry(str(base_model))
    if model_id is not None:
        basename = gguf.Metadata.get_model_id_components(model_id)[2]
        if basename is not None:
            keys[gguf.Keys.General.BASENAME] = basename
    keys[gguf.Keys.General.BASE_MODEL_COUNT] = 1
    for name in BASE_MODEL_FIELDS:
        if name in entry:
            keys[f"general.base_model.0.{name}"] = entry[name]
    return keys


def add_source_metadata(writer: gguf.GGUFWriter, source: Mapping[str, Any]) -> None:
    """Write `source_metadata(source)` (the APR's producer.source) into `writer`."""
    for key, value in source_metadata(source).items():
        if key == gguf.Keys.General.BASE_MODEL_COUNT:
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, value)


def _base_model_entry(value: str) -> tuple[dict[str, str], str | None]:
    """({name, organization, version, repo_url} as gguf-py fills them, the org/name id or None)."""
    entry: dict[str, str] = {}
    model_id: str | None = value
    if value.startswith(URL_SCHEMES):
        entry["repo_url"] = value
        match = HF_URL.match(value)
        model_id = match.group(1) if match else None
    if model_id is None:
        return entry, None
    full_name, organization, _, _, version, _ = gguf.Metadata.get_model_id_components(model_id)
    if full_name is not None:
        entry["name"] = gguf.Metadata.id_to_title(full_name)
    if organization is not None:
        entry["organization"] = gguf.Metadata.id_to_title(organization)
    if version is not None:
        entry["version"] = version
    if "repo_url" not in entry and organization is not None and full_name is not None:
        entry["repo_url"] = f"{HF_BASE_URL}/{organization}/{full_name}"
    return entry, model_id
