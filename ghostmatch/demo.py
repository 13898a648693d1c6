"""``python -m ghostmatch.demo``: index sample photos, run a query and a duplicate search.

The photos are scikit-image's sample images plus copies the demo makes of some of them
(re-encoded, resized, cropped, flipped), so the duplicate search has something to find.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

SAMPLES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "cat",
    "camera",
    "hubble_deep_field",
    "immunohistochemistry",
    "motorcycle_left",
    "motorcycle_right",
)


def make_photos(folder: Path) -> list[Path]:
    """Write the sample photos and a few copies of them into ``folder``."""
    from PIL import Image, ImageOps
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for name in SAMPLES:
        try:
            pixels = getattr(data, name)()
        except Exception:  # some samples are fetched on demand; skip those offline
            continue
        image = Image.fromarray(pixels).convert("RGB")
        path = folder / f"{name}.jpg"
        image.save(path, quality=92)
        made.append(path)
    copies = folder / "copies"
    copies.mkdir(exist_ok=True)
    chelsea = Image.open(folder / "chelsea.jpg")
    chelsea.save(copies / "chelsea_q30.jpg", quality=30)
    chelsea.resize((chelsea.width // 2, chelsea.height // 2)).save(copies / "chelsea_half.jpg")
    coffee = Image.open(folder / "coffee.jpg")
    w, h = coffee.size
    coffee.crop((w // 10, h // 10, w - w // 10, h - h // 10)).save(copies / "coffee_crop.jpg")
    ImageOps.mirror(Image.open(folder / "astronaut.jpg")).save(copies / "astronaut_flip.jpg")
    return made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="ghostmatch-demo-"))
    photos = work / "photos"
    index = work / "index"
    make_photos(photos)
    ghostmatch = [sys.executable, "-m", "ghostmatch.cli.app"]
    steps = [
        ["index", str(photos), "--index", str(index)],
        ["query", str(photos / "copies" / "chelsea_half.jpg"), "-k", "3", "--index", str(index)],
        ["dupes", "--index", str(index)],
        ["info", "--index", str(index)],
    ]
    for step in steps:
        print(f"\n$ ghostmatch {' '.join(step)}", flush=True)
        code = subprocess.call(ghostmatch + step)
        if code != 0:
            return code
    print(f"\ndemo files are in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
