"""Write the KJV haystacks under data/haystacks/kjv/ from Debian's `bible-kjv` (public-domain text).

Run once (needs `apt-get install -y bible-kjv bible-kjv-text`); the output is committed so that
tests need no system package. Each part is a run of narrative chapters, one paragraph per chapter,
verse numbers removed.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

PARTS = {
    "part1.txt": ["Gen37:1-Gen45:28"],                      # Joseph and his brothers
    "part2.txt": ["Ruth1:1-Ruth4:22", "Esth1:1-Esth7:10"],  # Ruth; Esther
    "part3.txt": ["Dan1:1-Dan6:28"],                        # Daniel
}
VERSE = re.compile(r"^(\S+?)(\d+):(\d+) (.*)$")


def chapters(ref: str) -> list[str]:
    """The chapters of a `bible -f` range, each as one paragraph of its verses."""
    out = subprocess.run(["bible", "-f", ref], check=True, capture_output=True, text=True).stdout
    paragraphs: dict[str, list[str]] = {}
    for line in out.splitlines():
        match = VERSE.match(line.strip())
        if match:
            book, chapter, _, text = match.groups()
            paragraphs.setdefault(f"{book}{chapter}", []).append(text.strip())
    return [" ".join(verses) for verses in paragraphs.values()]


def main() -> None:
    folder = Path(__file__).resolve().parent / "kjv"
    folder.mkdir(exist_ok=True)
    for name, refs in PARTS.items():
        text = "\n\n".join(p for ref in refs for p in chapters(ref)) + "\n"
        (folder / name).write_text(text)
        print(f"{name}: {len(text):,} characters from {', '.join(refs)}")


if __name__ == "__main__":
    main()
