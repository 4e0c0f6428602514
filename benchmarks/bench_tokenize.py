"""Throughput of `shipkit tokenize encode` against raw `tokenizers` encode_batch, same docs, same run.

    python benchmarks/bench_tokenize.py [--work DIR] [--vocab-size 8192] [--repeats 2]

Builds the default corpus (this Python's stdlib) and trains a tokenizer unless WORK already has
them, then times, alternately, `python -m shipkit tokenize encode` in a child process (start-up,
reading JSONL, encoding, writing shards + manifest: the whole command) and one
`Tokenizer.encode_batch` call over all the docs already in memory, plus `encode_batch_fast` (no
offsets) for reference. The machine may be shared, so each is timed `--repeats` times and the
fastest kept; CPU seconds are printed beside wall time. Prints tokens/s of each (document tokens
only, EOTs not counted), the ratio ours/encode_batch (target >= 0.9) and the peak RSS of the
encode command (its own, sampled from /proc).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer

from shipkit.corpus import CORPUS_MANIFEST, build_corpus, iter_texts
from shipkit.layout import TOKENIZER_FILE
from shipkit.tokenize import SPLITS, TokenizerConfig, train_tokenizer

TARGET_RATIO = 0.9
RSS_POLL_SECONDS = 0.05


def peak_rss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mib_of(pid: int) -> float | None:
    """VmHWM (the peak resident set) of a running process, from /proc; None once it has gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def ours(corpus_dir: Path, tokens_dir: Path) -> tuple[int, float, float, float]:
    """(document tokens, wall s, CPU s, peak RSS MiB) of one `shipkit tokenize encode` command.

    The peak RSS is the child's own VmHWM, sampled every RSS_POLL_SECONDS until it exits:
    getrusage's figure for children would include this process's pages at fork time.
    """
    command = [sys.executable, "-m", "shipkit", "tokenize", "encode", str(corpus_dir), "--out", str(tokens_dir),
               "--json"]
    cpu_before, start = cpu_seconds(resource.RUSAGE_CHILDREN), time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak_rss = 0.0
    while child.poll() is None:
        peak_rss = max(peak_rss, _peak_rss_mib_of(child.pid) or 0.0)
        time.sleep(RSS_POLL_SECONDS)
    seconds, cpu = time.perf_counter() - start, cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_before
    if child.returncode:
        raise SystemExit(f"{' '.join(command)} exited {child.returncode}")
    manifest = json.loads(child.stdout.read())
    docs = sum(info["docs"] for info in manifest["splits"].values())
    return manifest["total_tokens"] - docs, seconds, cpu, peak_rss


def raw(tokenizer: Tokenizer, texts: list[str], method: str) -> tuple[int, float, float, float]:
    cpu_before, start = cpu_seconds(resource.RUSAGE_SELF), time.perf_counter()
    encodings = getattr(tokenizer, method)(texts, add_special_tokens=False)
    seconds, cpu = time.perf_counter() - start, cpu_seconds(resource.RUSAGE_SELF) - cpu_before
    return sum(len(encoding.ids) for encoding in encodings), seconds, cpu, peak_rss_mib(resource.RUSAGE_SELF)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "shipkit-bench-tokenize")
    parser.add_argument("--vocab-size", type=int, default=TokenizerConfig.vocab_size)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    corpus_dir, tokens_dir = args.work / "corpus", args.work / "tokens"
    if not (corpus_dir / CORPUS_MANIFEST).exists():
        build_corpus([], corpus_dir)
    if not (tokens_dir / TOKENIZER_FILE).exists():
        train_tokenizer(corpus_dir, tokens_dir, TokenizerConfig(vocab_size=args.vocab_size))
    tokenizer = Tokenizer.from_file(str(tokens_dir / TOKENIZER_FILE))
    tokenizer.encode_special_tokens = True  # as ours does

    texts = [text for split in SPLITS for text in iter_texts(corpus_dir, split)]
    runs: dict[str, list[tuple[int, float, float, float]]] = {
        "shipkit encode": [], "encode_batch": [], "encode_batch_fast": []}
    for _ in range(args.repeats):
        runs["shipkit encode"].append(ours(corpus_dir, tokens_dir))
        runs["encode_batch"].append(raw(tokenizer, texts, "encode_batch"))
        runs["encode_batch_fast"].append(raw(tokenizer, texts, "encode_batch_fast"))
    best = {name: min(timings, key=lambda run: run[1]) for name, timings in runs.items()}
    counts = {run[0] for run in best.values()}
    if len(counts) != 1:
        raise SystemExit(f"token counts differ: {best}")
    text_mib = sum(len(text.encode("utf-8")) for text in texts) / (1 << 20)
    print(f"docs {len(texts)}, text {text_mib:.1f} MiB, tokens {counts.pop()}, "
          f"vocab {tokenizer.get_vocab_size()}, best of {args.repeats}")
    for name, (tokens, seconds, cpu, _) in best.items():
        print(f"{name:18s}: {tokens / seconds:10,.0f} tokens/s  {text_mib / seconds:5.2f} MiB/s  "
              f"({seconds:.1f} s wall, {cpu:.1f} s CPU)")
    ratio = best["encode_batch"][1] / best["shipkit encode"][1]
    print(f"ratio shipkit/encode_batch {ratio:.2f} (target >= {TARGET_RATIO}): "
          f"{'PASS' if ratio >= TARGET_RATIO else 'FAIL'}; "
          f"vs encode_batch_fast {best['encode_batch_fast'][1] / best['shipkit encode'][1]:.2f}")
    print(f"peak RSS of `shipkit tokenize encode`: {max(run[3] for run in runs['shipkit encode']):.0f} MiB; "
          f"of encode_batch with all docs in memory (this process): "
          f"{max(run[3] for run in runs['encode_batch']):.0f} MiB")


if __name__ == "__main__":
    main()
