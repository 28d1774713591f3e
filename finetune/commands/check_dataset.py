"""Report every problem of a moshi-finetune dataset before training; exit code 0 only when clean.

    python scripts/check_dataset.py data/train.jsonl [more.jsonl ...] [--tokenizer tokenizer.model]
                                    [--header-only]

Checks: manifest lines that are not UTF-8, malformed or have a bad duration; missing, unreadable or
truncated audio (every file is decoded; --header-only reads only wav headers, faster but blind to
truncation); mono files; manifest durations that disagree with the audio; missing or malformed
alignment files (times that are not numbers, bad spans); words that end after the audio; empty
transcripts; and with --tokenizer, words the tokenizer maps to nothing or to its unknown id (counted
over the manifest, with the most frequent examples).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune.data.check import check_manifest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifests", nargs="+", type=Path)
    p.add_argument("--tokenizer", type=Path, help="sentencepiece model: check how every word tokenizes")
    p.add_argument("--header-only", action="store_true", help="read wav headers instead of decoding audio")
    args = p.parse_args()
    tokenizer = None
    if args.tokenizer is not None:
        import sentencepiece

        if not args.tokenizer.is_file():
            p.error(f"--tokenizer: {args.tokenizer} does not exist")
        tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(args.tokenizer))
    total = 0
    for m in args.manifests:
        problems = check_manifest(m, tokenizer, decode=not args.header_only)
        for line in problems:
            print(line)
        total += len(problems)
        print(f"{m}: {'clean' if not problems else f'{len(problems)} problem(s)'}", file=sys.stderr)
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
