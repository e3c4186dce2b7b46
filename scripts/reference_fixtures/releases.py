"""Write tests/fixtures/reference/releases/ with DALLE2-pytorch releases, each in a throwaway environment.

    python3 scripts/reference_fixtures/releases.py [--work /tmp/d2p-releases] [--only 1.1.0,0.23.10]

One base virtual environment holds torch and the dependencies every release shares (pinned below);
each release is installed alone (`pip install --no-deps --target`) into its own folder with what
it needs at its own version (its contemporary ema-pytorch; pydantic 1 or 2; accelerate 0.10 for
0.x), and `generate.py --only releases` runs with that folder first on PYTHONPATH. Nothing is
installed into this project's environment, and nothing here imports dalle2_decoder.

The releases are those that changed the U-Net's module layout or function, the Decoder's sampling
or the trainer's checkpoint format (see dalle2_decoder/models/releases.py and docs/MIGRATING.md),
the last patch of each, and 0.15.4 (LAION's released 1.5B and 1B decoders). `releases.json`
records, per release, what was installed with it, or why it could not be. The cascade fixtures:
0.16.19's and 0.15.4's upsamplers continue 1.15.6's base samples, so 1.15.6 runs first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
OUT = REPO / "tests" / "fixtures" / "reference"

# torch first (from this machine's wheel cache), then the dependencies every release shares, at versions
# all of them import with (each meta.json records what wrote it), then setuptools < 70 (see below).
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
BASE = [
    "pydantic<2",
    "accelerate",
    "click",
    "clip-anytorch",
    "open-clip-torch<3",
    "coca-pytorch",
    "einops",
    "einops-exts",
    "embedding-reader",
    "kornia",
    "packaging",
    "pillow",
    "pytorch-warmup",
    "resize-right",
    "rotary-embedding-torch",
    "tqdm",
    "vector-quantize-pytorch",
    "x-clip",
    "webdataset",
    "fsspec",
    "torchmetrics[image]",
    "safetensors",
]

# release -> what it is installed with besides itself. ema-pytorch: the release current on the day of the
# DALLE2-pytorch release (its checkpoint's EMA entries are that version's). 0.x: accelerate 0.10 (later
# ones return a single prepared object where those releases unpack a list). 1.15.6: pydantic 2.
RELEASES: Dict[str, List[str]] = {
    "1.15.6": ["ema-pytorch==0.2.3", "pydantic>=2,<3", "pydantic-core", "annotated-types", "typing-inspection"],
    "1.14.2": ["ema-pytorch==0.2.3"],
    "1.12.4": ["ema-pytorch==0.2.1"],
    "1.10.9": ["ema-pytorch==0.0.10"],
    "1.8.4": ["ema-pytorch==0.0.10"],
    "1.4.6": ["ema-pytorch==0.0.9"],
    "1.1.0": ["ema-pytorch==0.0.9"],
    "1.0.6": ["ema-pytorch==0.0.9"],
    "0.23.10": ["ema-pytorch==0.0.8", "accelerate==0.10.0"],
    "0.16.19": ["ema-pytorch==0.0.8", "accelerate==0.10.0"],
    "0.15.4": ["ema-pytorch==0.0.8", "accelerate==0.10.0"],
}
CASCADE = {"0.16.19": "1.15.6", "0.15.4": "1.15.6"}  # upsampler release -> base release whose samples it continues


def run(command: List[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, capture_output=True, text=True, **kwargs)


def last_line(done: subprocess.CompletedProcess) -> str:
    lines = [
        line for line in (done.stderr + done.stdout).splitlines() if line.strip() and not line.startswith("WARNING")
    ]
    return lines[-1] if lines else f"exit status {done.returncode}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/d2p-releases"), help="where the environments go")
    parser.add_argument("--only", default=",".join(RELEASES), help="comma-separated releases")
    parser.add_argument("--keep-base", action="store_true", help="use the base environment as it is")
    args = parser.parse_args()
    wanted = [r.strip() for r in args.only.split(",") if r.strip()]
    base = args.work / "base"
    python = base / "bin" / "python"
    if not python.exists():
        done = run([sys.executable, "-m", "venv", str(base)])
        if done.returncode:
            print(f"could not create {base}: {last_line(done)}")
            return 1
    done = None
    if not args.keep_base:
        done = run([str(python), "-m", "pip", "install", "-q", *TORCH])
        if not done.returncode:  # the shared dependencies beside that torch, not another one
            done = run([str(python), "-m", "pip", "install", "-q", *BASE, *TORCH])
    if done is not None and done.returncode:
        print(f"could not install the shared dependencies: {last_line(done)}")
        return 1
    # After torch, which asks for a newer one: the releases import `pkg_resources`, gone from setuptools 70 on.
    if not args.keep_base:
        run([str(python), "-m", "pip", "install", "-q", "setuptools<70"])

    record_path = OUT / "releases" / "releases.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    for release in sorted(wanted, key=lambda r: r not in CASCADE.values()):  # cascade bases first
        folder = args.work / release
        pins = RELEASES.get(release, [])
        if (folder / f"dalle2_pytorch-{release}.dist-info").is_dir():  # kept from an earlier run
            done = subprocess.CompletedProcess([], 0, "", "")
        else:
            done = run(
                [str(python), "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(folder)]
                + [f"dalle2-pytorch=={release}", *pins]
            )
        if done.returncode:
            record[release] = {"installed": False, "why": last_line(done), "with": pins}
            continue
        command = [str(python), str(HERE / "generate.py"), "--only", "releases", "--out", str(OUT)]
        if release in CASCADE:
            command += ["--cascade-base", str(OUT / "releases" / CASCADE[release])]
        done = run(command, env={"PYTHONPATH": str(folder), "PATH": "/usr/bin:/bin", "HOME": str(args.work)})
        if done.returncode:
            record[release] = {"installed": True, "generated": False, "why": last_line(done), "with": pins}
        else:
            record[release] = {"installed": True, "generated": True, "with": pins}
        print(f"{release}: {record[release]}", flush=True)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    ordered = dict(sorted(record.items(), key=lambda item: [int(p) for p in item[0].split(".")]))
    record_path.write_text(json.dumps(ordered, indent=2) + "\n")
    return 0 if all(entry.get("generated") for entry in record.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
