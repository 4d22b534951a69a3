"""Write qvlquant's calibration batches to disk, so that each peer quantizes from exactly the same tensors.

    python benchmarks/peers/export_batches.py --model demo --num-samples 64 --seed 0 --output /tmp/peer-batches

Runs in qvlquant's venv. The batches are built as qvlquant builds them (``load_samples`` + ``build_batches`` with
the default ``CalibConfig``, the model's own processor): one batch per sample, padded to nothing. Output:
``batch_0000.safetensors`` ... (input_ids, attention_mask, mm_token_type_ids [1, S]; pixel_values [P, D] and
image_grid_thw [1, 3] where the sample has an image) and ``index.json`` (files, count, seed, calibration source,
model folder, token and image counts). Safetensors and JSON only, no pickle, so the peers' venvs read it with
nothing but safetensors.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor

from qvlquant.assets.paths import MODEL_DIR
from qvlquant.calib.dataset import CalibConfig, build_batches
from qvlquant.calib.sources import load_samples


def model_folder(model: str) -> pathlib.Path:
    folder = MODEL_DIR if model == "demo" else pathlib.Path(model)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"--model {model}: no config.json in {folder}; give a model folder or 'demo'")
    return folder.resolve()


def calibration_batches(folder: pathlib.Path, calib: str, num_samples: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """The batches qvlquant's own quantization would see (bench_methods._batches), through the folder's processor."""
    processor = AutoProcessor.from_pretrained(folder)
    samples, names, root = load_samples(calib, num_samples, seed=seed)
    return build_batches(processor, samples, CalibConfig(image_root=root), names)


def write_batches(batches: list[dict[str, torch.Tensor]], out: pathlib.Path, meta: dict) -> dict:
    """One safetensors file per batch plus index.json. -> the index."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, batch in enumerate(batches):
        name = f"batch_{i:04d}.safetensors"
        save_file({k: v.contiguous() for k, v in batch.items()}, str(out / name))
        files.append(name)
    index = {
        **meta,
        "count": len(batches),
        "files": files,
        "num_tokens": int(sum(int(b["attention_mask"].sum()) for b in batches)),
        "num_images": int(sum(len(b["image_grid_thw"]) for b in batches if "image_grid_thw" in b)),
    }
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return index


def read_batches(folder: pathlib.Path) -> list[dict[str, torch.Tensor]]:
    """The batches back, in order (what the peers' runners do, without qvlquant)."""
    index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    return [load_file(str(folder / name)) for name in index["files"]]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo", help="model folder (its processor encodes the samples) or 'demo'")
    ap.add_argument("--calib", default="demo", help="calibration source, as qvlquant's --calib (default: demo)")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", required=True, type=pathlib.Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    folder = model_folder(args.model)
    batches = calibration_batches(folder, args.calib, args.num_samples, args.seed)
    meta = {"model": str(folder), "calib": args.calib, "num_samples": args.num_samples, "seed": args.seed}
    index = write_batches(batches, args.output, meta)
    print(f"{index['count']} batches, {index['num_tokens']} tokens, {index['num_images']} images -> {args.output}")


if __name__ == "__main__":
    main()
