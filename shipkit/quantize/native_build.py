"""Compile C sources at run time with the system compiler and load them with ctypes.

The quantizers' C kernels follow ggml-quants.c's scalar float32 code operation by operation, so
the flags forbid what would change a rounding: no fused multiply-add contraction
(`-ffp-contract=off`) and no fast-math. Vectorisation stays on: without fast-math gcc never
reorders a float reduction, it only runs independent lanes side by side. Every library is
`ggml_prelude.h` (ggml's helpers: nearest_int, fp16 conversion, ...) followed by its sources,
compiled as one text. It is cached under `$SHIPKIT_CACHE` (default ~/.cache/shipkit), keyed by
that text (so an edit to the prelude or a source rebuilds it), the flags and the host
(`-march=native`), so it is built once per machine.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

C_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math")
CACHE_DIR = Path(os.environ.get("SHIPKIT_CACHE", Path.home() / ".cache" / "shipkit"))
COMPILE_TIMEOUT_S = 120
PRELUDE = Path(__file__).with_name("ggml_prelude.h")


def load_c_library(sources: Sequence[Path], stem: str) -> ctypes.CDLL | None:
    """The prelude and `sources` compiled in that order as one C file (built on first use), or
    None without a C compiler, a writable cache folder or an x86-64 little-endian host (the
    kernels lean on x86's float -> int conversion of out-of-range values, as ggml does where it
    runs)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or sys.byteorder != "little":
        return None
    # `#line`: a compiler message names the file and line it is about, not the joined text's.
    source = "".join(f'#line 1 "{path.name}"\n{path.read_text()}\n' for path in (PRELUDE, *sources))
    key = source + " ".join(C_FLAGS) + platform.node() + platform.machine()
    library = CACHE_DIR / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if not library.exists():
        try:
            _compile(source, library)
        except (OSError, subprocess.SubprocessError):
            return None
    return ctypes.CDLL(str(library))


def _compile(source: str, library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as build:
        source_file, output = Path(build) / "kernels.c", Path(build) / "kernels.so"
        source_file.write_text(source)
        command = [os.environ.get("CC", "cc"), *C_FLAGS, "-o", str(output), str(source_file), "-lm"]
        subprocess.run(command, check=True, capture_output=True, timeout=COMPILE_TIMEOUT_S)
        os.replace(output, library)  # atomic: a concurrent process sees the old name or the whole file
