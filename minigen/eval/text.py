"""Text inputs of the evaluations: files named by path, directory or glob, read as UTF-8, and the
essay clean-up the needle haystack and the task builder share."""
from __future__ import annotations

import glob
import re
from pathlib import Path


def text_files(specs: list[str], flag: str = "--text") -> list[Path]:
    """The files named by specs: each a file, a directory (its *.txt, sorted) or a glob pattern."""
    out: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            got = sorted(p.glob("*.txt"))
            if not got:
                raise FileNotFoundError(f"{flag} {spec}: the directory has no *.txt files")
            out += got
        elif any(c in spec for c in "*?["):
            got = sorted(Path(f) for f in glob.glob(spec) if Path(f).is_file())
            if not got:
                raise FileNotFoundError(f"{flag} {spec}: no file matches the pattern")
            out += got
        else:
            hint = "; `make data` fetches data/essays and data/shakespeare" if "data" in p.parts else ""
            raise FileNotFoundError(f"{flag} {spec}: no such file or directory{hint}")
    return list(dict.fromkeys(out))


def read_text(path: Path) -> str:
    """The file as UTF-8 text; a file that is not UTF-8 is refused (scoring U+FFFD replacement
    characters would be scoring something else), naming the first bad byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); convert it, "
                         f"e.g. iconv -f latin1 -t utf-8") from None


MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"


def clean_essay(text: str) -> str:
    """One essay as one paragraph. The archive lost its paragraph breaks ("once.Like chess"): a
    space goes back after a sentence end glued to a capital, line wraps become spaces, and the
    banner and date line ("May 2004When ...") go."""
    text = re.sub(r"^\s*Want to start a startup\?\s*Get funded by\s*Y Combinator\.", "", text)
    text = re.sub(rf"^\s*(?:{MONTHS}) \d{{4}}(?:,? *\(?rev\. (?:{MONTHS}) \d{{4}}\)?)?", "", text)
    text = re.sub(r"([.?!][)\"]?)(?=[A-Z])", r"\1 ", text)
    return re.sub(r"\s+", " ", text).strip()
