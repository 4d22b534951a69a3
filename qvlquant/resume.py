"""Resuming an interrupted quantization from the last finished decoder layer.

After each layer, its full state (quantized weights in place, folded AWQ scales included) and its codes are saved
into ``.<output>.partial/`` beside the output, each file written then renamed, under a fingerprint of the model,
the calibration data and the settings. A rerun with the same fingerprint restores the finished layers and replays
them to rebuild the next layer's inputs; a different fingerprint is refused rather than mixed in. The folder is
removed once the export is in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qvlquant.quant.formats import QuantizedWeight
from qvlquant.quant.rtn import QuantSpec

FIELDS = ("q", "scale", "zero", "g_idx", "input_scale", "output_scale")


def fingerprint(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(folder: pathlib.Path) -> dict:
    """config.json's hash and the names and sizes of the weight files (hashing tens of GB would cost minutes)."""
    return {
        "config": hashlib.sha256((folder / "config.json").read_bytes()).hexdigest(),
        "weights": sorted((p.name, p.stat().st_size) for p in folder.glob("*.safetensors")),
    }


class LayerCheckpoints:
    def __init__(self, folder: str | os.PathLike, print_: str):
        self.folder = pathlib.Path(folder)
        self.fingerprint = print_
        stamp = self.folder / "fingerprint.json"
        if stamp.exists():
            found = json.loads(stamp.read_text()).get("fingerprint")
            if found != print_:
                raise ValueError(
                    f"{self.folder} holds a partial run of a different model, calibration set or settings; "
                    "delete it to start over, or rerun with the same settings to resume"
                )


    def path(self, i: int) -> pathlib.Path:
        return self.folder / f"layer_{i:04d}.safetensors"

    def has(self, i: int) -> bool:
        return self.path(i).exists()

    def save(self, i: int, layer: torch.nn.Module, weights: dict[str, QuantizedWeight], info: dict) -> None:
        if not (self.folder / "fingerprint.json").exists():  # created with the first finished layer
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / "fingerprint.json").write_text(json.dumps({"fingerprint": self.fingerprint}) + "\n")
        # clones: AWQ's scales are one tensor shared by the linears of a group, and safetensors refuses shared memory
        tensors = {f"state.{k}": v.detach().clone() for k, v in layer.state_dict().items()}
        for name, w in weights.items():
            for field in FIELDS:
                t = getattr(w, field)
                if t is not None:
                    tensors[f"w.{name}.{field}"] = t.detach().clone()
        tmp = self.path(i).with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"info": json.dumps(info)})
        os.replace(tmp, self.path(i))

    def load(self, i: int, layer: torch.nn.Module, spec: QuantSpec) -> tuple[dict[str, QuantizedWeight], dict]:
        with safe_open(str(self.path(i)), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            info = json.loads(f.metadata()["info"])
        layer.load_state_dict({k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")})
        weights = {}
        for name in sorted({k.split(".", 1)[1].rsplit(".", 1)[0] for k in tensors if k.startswith("w.")}):
            fields = {f: tensors.get(f"w.{name}.{f}") for f in FIELDS}
            weights[name] = QuantizedWeight(spec=spec, **fields)
        return weights, info

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
