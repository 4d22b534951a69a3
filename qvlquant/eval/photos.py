"""Held-out real photographs for comparing a quantized model with its base: the sample photos that scikit-image
(``skimage/data``, BSD-3) and matplotlib (``mpl-data/sample_data``) ship inside their wheels, found on disk without
importing either package, each asked easy-vqa's questions.

Nothing here is scored against an answer (the demo never saw a photograph): the measure is how far the quantized
model's answer-token distribution moves from the base's on images unlike its calibration data
(``qvlquant.eval.compare.mean_kl``).
"""

from __future__ import annotations

import importlib.util
import pathlib

from qvlquant.calib.easyvqa import VqaItem

SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png", "coins.png", "moon.png",
                  "brick.png", "grass.png", "gravel.png", "color.png", "page.png")
MATPLOTLIB_PHOTOS = ("grace_hopper.jpg",)
QUESTIONS = ("What shape is in the image?", "What color is the shape?", "Is there a circle in the image?",
             "Does the image contain a triangle?", "Is the shape blue?", "What is the color of the shape?",
             "Is there a red shape?", "Is there not a rectangle in the image?")


def _package_dir(name: str) -> pathlib.Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def photo_paths() -> list[str]:
    """Paths of the bundled photos that are installed (scikit-image's first, then matplotlib's)."""
    found = []
    for package, folder, names in (("skimage", "data", SKIMAGE_PHOTOS),
                                   ("matplotlib", "mpl-data/sample_data", MATPLOTLIB_PHOTOS)):
        root = _package_dir(package)
        if root is not None:
            found += [str(root / folder / n) for n in names if (root / folder / n).is_file()]
    return found


def photo_items(questions: tuple[str, ...] = QUESTIONS) -> list[VqaItem]:
    """Every installed photo with every question (answers empty: nothing is scored against them). An error when
    no photo is installed, naming what to install."""
    paths = photo_paths()
    if not paths:
        raise FileNotFoundError("no bundled photographs found: pip install scikit-image (its skimage/data photos) "
                                "or matplotlib")
    return [VqaItem(question=q, answer="", image_path=p) for p in paths for q in questions]
