"""Write a random-weight checkpoint of the real Qwen2-VL-2B or -7B shape, for speed, memory and scale tests.

The released configs as ``qvlquant bench`` builds them (text model, the 32-block vision tower, vocabulary), bf16
safetensors in 5 GiB shards with an index, and a processor: the embedded demo's (its word-level tokenizer carries
the Qwen special tokens; the config's image / video / vision marker ids are set to that tokenizer's, so real
multimodal calibration batches run through the model). Speed and memory do not depend on weight values; accuracy
does, so nothing about accuracy is measured on these. Each tensor is generated when its turn comes and written
at once (``qvlquant.storage.shards.write_safetensors``): the script holds one tensor, never the model.

    python benchmarks/make_random_checkpoint.py --shape qwen2-vl-7b --output /tmp/qwen2-vl-7b-random
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

import torch

from qvlquant.assets.paths import MODEL_DIR
from qvlquant.checkpoint.export import plan_shards
from qvlquant.engine.skeleton import build_skeleton
from qvlquant.families import QWEN2_VL
from qvlquant.storage.shards import INDEX, write_safetensors
from qvlquant.tools.bench import SHAPES, VISION

PROCESSOR_FILES = ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json")


def real_config(shape: str):
    """The released architecture's config, with the demo tokenizer's special-token ids."""
    from transformers import Qwen2VLConfig

    demo = json.loads((MODEL_DIR / "config.json").read_text())
    text = dict(SHAPES[shape], bos_token_id=demo["text_config"].get("bos_token_id", 0),
                eos_token_id=demo["text_config"].get("eos_token_id", 1), pad_token_id=0)
    tie = text.pop("tie_word_embeddings")
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6,
                               "mrope_section": [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]}
    ids = {k: demo[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    config = Qwen2VLConfig(text_config=text, vision_config=dict(VISION[shape], hidden_size=text["hidden_size"]),
                           tie_word_embeddings=tie, **ids)
    config.dtype = "bfloat16"
    return config


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Norm weights 1, biases 0, everything else N(0, 0.02), in bf16; the same name always gives the same values."""
    if len(shape) == 1 and ("norm" in name or ".ln_" in name) and name.endswith(".weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)


def write_checkpoint(shape: str, output: pathlib.Path, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    config = real_config(shape)
    skeleton = build_skeleton(config, QWEN2_VL, torch.bfloat16)
    names = [n for n in skeleton.state_dict() if not (config.tie_word_embeddings and n == "lm_head.weight")]
    shapes = {QWEN2_VL.to_disk(n): tuple(t.shape) for n, t in skeleton.state_dict().items() if n in names}
    entries = [(k, torch.bfloat16, s) for k, s in shapes.items()]
    output.mkdir(parents=True, exist_ok=False)
    shards = plan_shards(entries, max_shard_bytes)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    seeds = {k: i for i, k in enumerate(shapes)}
    weight_map = {}
    for name, shard in zip(files, shards):
        write_safetensors(output / name, shard, lambda k: random_tensor(k, shapes[k], seeds[k]), {"format": "pt"})
        weight_map.update({e[0]: name for e in shard})
        print(f"wrote {name}", flush=True)
    total = sum(2 * int(torch.Size(s).numel()) for s in shapes.values())
    (output / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(output)
    for f in PROCESSOR_FILES:
        if (MODEL_DIR / f).exists():
            shutil.copy(MODEL_DIR / f, output / f)
    return files


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=["qwen2-vl-2b", "qwen2-vl-7b"], required=True)
    p.add_argument("--output", required=True, help="a new folder")
    args = p.parse_args()
    files = write_checkpoint(args.shape, pathlib.Path(args.output))
    print(f"{args.shape}: {len(files)} shard(s) in {args.output}")


if __name__ == "__main__":
    main()
