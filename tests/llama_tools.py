"""llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity) as references.

llama-cpp-python's API cannot pass an importance matrix, so the whole-file references are the
tools themselves, built from the llama.cpp tree vendored in the installed llama-cpp-python's
sdist (the same ggml as the Python package). Where they come from, first found wins:
1. $SHIPKIT_LLAMA_TOOLS, a folder holding them;
2. /tmp/lcpp-build/bin, where /work/shared/LLAMA-TOOLS.md builds them;
3. ~/.cache/shipkit/llama-tools/<llama-cpp-python version>/, built there once per machine
   (a locked, static build in a temporary sibling folder, renamed into place when complete).
A machine without cmake or a C++ compiler skips the tests that need them; anything else that
goes wrong is a failure, so CI cannot pass by skipping.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
from tokenizer_helpers import llama_cpp_source

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
TOOLS_ENV = "SHIPKIT_LLAMA_TOOLS"
PREBUILT = Path("/tmp/lcpp-build/bin")
CACHE_ENV = "SHIPKIT_LLAMA_TOOLS_CACHE"  # where builds are cached [default: ~/.cache/shipkit/llama-tools]
DEFAULT_CACHE = Path.home() / ".cache" / "shipkit" / "llama-tools"
# Static libraries: the binaries then hold no path into the build folder, which is renamed.
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_TOOLS=ON", "-DGGML_NATIVE=ON")
COMPILERS = ("c++", "g++", "clang++")
LOG_TAIL_CHARS = 3000  # of a failed build's output, in the failure message


def llama_tool(name: str) -> Path:
    """The path of llama.cpp tool `name` (one of TOOLS), building the tools if need be."""
    assert name in TOOLS, f"{name} is not one of {TOOLS}"
    if os.environ.get(TOOLS_ENV):
        tool = Path(os.environ[TOOLS_ENV]) / name
        if not _is_executable(tool):
            pytest.fail(f"${TOOLS_ENV}={os.environ[TOOLS_ENV]} holds no executable {name}")
        return tool
    if all(_is_executable(PREBUILT / tool) for tool in TOOLS):
        return PREBUILT / name
    return built_tools(_cache_root()) / name


def built_tools(cache_root: Path) -> Path:
    """The bin folder of the tools built under `cache_root/<version>`, built now if missing."""
    release = version("llama-cpp-python")
    target = cache_root / release
    if _complete(target):
        return target / "bin"
    _require_toolchain()
    cache_root.mkdir(parents=True, exist_ok=True)
    with _locked(cache_root / f".{release}.lock"):
        if not _complete(target):  # another process may have built it while we waited
            _build(target)
    return target / "bin"


def run_tool(name: str, *args: str | os.PathLike[str], cwd: Path | None = None) -> str:
    """Run llama.cpp tool `name`; its combined output, or a test failure quoting it."""
    result = subprocess.run([str(llama_tool(name)), *map(str, args)], cwd=cwd, capture_output=True,
                            text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{name} {' '.join(map(str, args))} failed:\n{output[-LOG_TAIL_CHARS:]}"
    return output


def _cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _complete(target: Path) -> bool:
    return all(_is_executable(target / "bin" / tool) for tool in TOOLS)


def _require_toolchain() -> None:
    if shutil.which("cmake") is None:
        pytest.skip("llama.cpp's tools cannot be built here: no cmake on PATH")
    if not any(shutil.which(compiler) for compiler in COMPILERS):
        pytest.skip(f"llama.cpp's tools cannot be built here: no C++ compiler ({', '.join(COMPILERS)})")


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(target: Path) -> None:
    """Configure and build the tools in a temporary sibling of `target`, then move their bin
    folder into place."""
    source = llama_cpp_source()
    if source is None:
        pytest.fail("the llama-cpp-python sdist (llama.cpp's source) could not be downloaded")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    jobs = str(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as scratch:
        build = Path(scratch) / "build"
        _run(["cmake", "-S", str(source), "-B", str(build), *generator, *CMAKE_OPTIONS], "configure")
        _run(["cmake", "--build", str(build), "--target", *TOOLS, "-j", jobs], "build")
        finished = Path(scratch) / "finished"  # only the binaries are kept, not the objects
        finished.mkdir()
        os.replace(build / "bin", finished / "bin")
        shutil.rmtree(target, ignore_errors=True)  # a partial folder left by hand
        os.replace(finished, target)


def _run(command: list[str], step: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-LOG_TAIL_CHARS:]
        pytest.fail(f"llama.cpp tools {step} failed ({' '.join(command)}):\n{output}")
