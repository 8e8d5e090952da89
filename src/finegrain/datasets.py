"""Readers for the evaluation data sets (layouts as in ``../shared/data``)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CaptionSplit:
    """One split of a captioned image set.

    ``captions[i]`` describes ``images[caption_image[i]]``.
    """

    root: Path
    images: list[str]  # file names, relative to root/images
    captions: list[str]
    caption_image: list[int]

    def image_paths(self) -> list[Path]:
        return [self.root / "images" / name for name in self.images]


def load_flickr8k(root: str | Path, split: str) -> CaptionSplit:
    """Read ``splits/<split>.txt`` and ``captions.tsv`` of a Flickr8k-style folder.

    Raises ``FileNotFoundError`` naming the missing file (for example a
    ``test`` split that this copy of the data does not have).
    """
    root = Path(root)
    split_file = root / "splits" / f"{split}.txt"
    if not split_file.exists():
        have = sorted(p.stem for p in (root / "splits").glob("*.txt"))
        raise FileNotFoundError(f"no split '{split}' in {root} (expected {split_file}; available: {', '.join(have) or 'none'})")
    images = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    position = {name: i for i, name in enumerate(images)}
    captions: list[str] = []
    caption_image: list[int] = []
    with open(root / "captions.tsv", newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        if header[:3] != ["image", "caption_id", "caption"]:
            raise ValueError(f"unexpected captions.tsv header: {header}")
        for row in reader:
            if len(row) >= 3 and row[0] in position and row[2].strip():
                captions.append(row[2].strip())
                caption_image.append(position[row[0]])
    return CaptionSplit(root, images, captions, caption_image)
