"""Write the bundled mnist5k digits as an ImageNet-style folder (train/<class>/*.png, val/<class>/*.png).

For a reduced run of the full-scale protocol where no ImageNet is at hand: the ImageNet-layout
presets (224x224, 3 channels) read it through `--data imagefolder:DIR`, which upsamples each
28x28 digit and repeats it over 3 channels. train/ holds mnist5k's train + calib splits (the
imagefolder loader holds its own calib slice out of train/), val/ holds the test split.

    python bench/mnist_imagefolder.py OUT_DIR
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder to create (must not exist yet)")
    args = p.parse_args()

    from spikeprune.data import load_dataset

    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; give a new folder")
    for split, folder in (("train", "train"), ("calib", "train"), ("test", "val")):
        ds = load_dataset("mnist5k", split)
        images, labels = ds.batch(list(range(len(ds))))
        # undo the normalisation back to 8-bit pixels
        pixels = (images * ds.std + ds.mean).clamp(0, 1).mul(255).round().to(torch.uint8)
        for i, (img, label) in enumerate(zip(pixels, labels.tolist())):
            d = out / folder / f"digit{label}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(img[0]), mode="L").convert("RGB").save(d / f"{split}{i:05d}.png")
    n = sum(1 for _ in out.rglob("*.png"))
    print(f"wrote {n} images to {out}/train and {out}/val")


if __name__ == "__main__":
    main()
