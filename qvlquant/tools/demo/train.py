"""Train the embedded demo model: ``python -m qvlquant.tools.demo.train [--steps N] [--output DIR]``.

Each step takes one easy-vqa batch (loss on the answer tokens only) and one batch of natural text (next-token loss over
Python standard-library docstrings), so the model both answers questions about images and predicts high-entropy
text, which is what makes it sensitive to quantization. Deterministic: fixed seeds, fixed data order, 2 threads.
Writes the checkpoint (safetensors, bf16) with its processor, the held-out and calibration text, and a JSON report
of what it reached (accuracy, majority baseline, held-out perplexity, training time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import random
import time

import torch

from qvlquant.assets.paths import DATA_DIR, MODEL_DIR
from qvlquant.calib.easyvqa import load_split, majority_baseline
from qvlquant.calib.images import load_image
from qvlquant.tools.demo import build

VISUAL_TOKENS = (build.IMAGE_SIDE // 14 // 2) ** 2  # 16 per image
TEXT_WINDOW = 128


def encode_vqa(tokenizer, items) -> list[tuple[list[int], int]]:
    """(token ids of prompt + answer + <|im_end|>, index where the answer starts) per question."""
    pad = "<|image_pad|>" * VISUAL_TOKENS
    user = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>" + pad
    prompts = [f"{user}<|vision_end|>{it.question}<|im_end|>\n<|im_start|>assistant\n" for it in items]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer([f"{it.answer}<|im_end|>" for it in items], add_special_tokens=False)["input_ids"]
    return [(p + a, len(p)) for p, a in zip(p_ids, a_ids)]


def image_patches(processor, paths: list[str]) -> tuple[dict, torch.Tensor]:
    """Pixel patches of every image, computed once. -> (path -> row, [N, 64, 1176])."""
    index = {p: i for i, p in enumerate(paths)}
    rows = []
    for start in range(0, len(paths), 256):
        imgs = [load_image(p) for p in paths[start:start + 256]]
        out = processor.image_processor(images=imgs, return_tensors="pt")
        rows.append(out["pixel_values"].view(len(imgs), -1, out["pixel_values"].shape[-1]))
    return index, torch.cat(rows)


def vqa_batch_of(encoded, items, rows, patches, pad_id, image_token_id, grid) -> dict:
    n = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), n), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    mask = torch.zeros_like(input_ids)
    for r, (ids, a0) in enumerate(encoded):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, a0: len(ids)] = torch.tensor(ids[a0:])
        mask[r, : len(ids)] = 1
    pixel_values = patches[[rows[it.image_path] for it in items]].flatten(0, 1)  # [B*64, 1176]
    return dict(
        input_ids=input_ids,
        attention_mask=mask,
        labels=labels,
        pixel_values=pixel_values,
        image_grid_thw=grid.repeat(len(items), 1),
        mm_token_type_ids=(input_ids == image_token_id).long(),
    )


@dataclasses.dataclass
class TrainData:
    """Everything a training step draws from: encoded easy-vqa questions, their image patches, the text stream."""

    items: list
    encoded: list
    rows: dict
    patches: torch.Tensor
    grid: torch.Tensor
    stream: torch.Tensor
    pad_id: int
    image_id: int


def load_data(tokenizer, processor, config, train_items, docs_train) -> TrainData:
    from qvlquant.eval.perplexity import token_stream

    rows, patches = image_patches(processor, sorted({it.image_path for it in train_items}))
    grid = torch.tensor([[1, build.IMAGE_SIDE // 14, build.IMAGE_SIDE // 14]])
    return TrainData(train_items, encode_vqa(tokenizer, train_items), rows, patches, grid,
                     token_stream(tokenizer, docs_train), tokenizer.pad_token_id, config.image_token_id)


def fit(model, data: TrainData, steps: int, lr: float, vqa_batch: int = 64, text_batch: int = 16,
        pct_start: float = 0.1, frozen=()) -> float:
    """AdamW with a one-cycle schedule, one easy-vqa batch and one text batch per step, in a fixed order; the
    parameters in ``frozen`` keep their values. -> training seconds."""
    params = [p for p in model.parameters() if not any(p is f for f in frozen)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=pct_start)
    order = torch.randperm(len(data.items), generator=torch.Generator().manual_seed(0)).tolist()
    g = torch.Generator().manual_seed(1)
    t_train = time.time()
    model.train()
    for step in range(steps):
        pick = [order[(step * vqa_batch + j) % len(order)] for j in range(vqa_batch)]
        items = [data.items[i] for i in pick]
        batch = vqa_batch_of([data.encoded[i] for i in pick], items, data.rows, data.patches, data.pad_id,
                             data.image_id, data.grid)
        vqa_loss = model(**batch).loss
        starts = torch.randint(0, data.stream.numel() - TEXT_WINDOW, (text_batch,), generator=g)
        text = torch.stack([data.stream[s:s + TEXT_WINDOW] for s in starts.tolist()])  # [b, window]
        text_loss = model(input_ids=text, labels=text).loss
        opt.zero_grad(set_to_none=True)
        (vqa_loss + text_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:5d}  vqa {vqa_loss.item():.3f}  text {text_loss.item():.3f}  {time.time() - t_train:.0f}s", flush=True)
    model.eval()
    return time.time() - t_train


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)  # what the shipped model was trained with (train_report.json)
    ap.add_argument("--vqa-batch", type=int, default=64)
    ap.add_argument("--text-batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--output", type=pathlib.Path, default=MODEL_DIR)
    ap.add_argument("--data-output", type=pathlib.Path, default=DATA_DIR)
    ap.add_argument("--eval-limit", type=int, default=None, help="test questions to score at the end (default all)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(2)
    t0 = time.time()

    train_items, test_items = load_split("train"), load_split("test")
    docs_train, docs_heldout = build.split_corpus(build.stdlib_docstrings())
    vqa_texts = [it.question + " " + it.answer for it in train_items + test_items]
    tokenizer = build.build_tokenizer(build.build_vocab(docs_train, vqa_texts))
    processor = build.build_processor(tokenizer)
    config = build.build_config(tokenizer)
    from transformers import Qwen2VLForConditionalGeneration

    from qvlquant.eval.perplexity import perplexity, token_stream

    model = Qwen2VLForConditionalGeneration(config).float()
    data = load_data(tokenizer, processor, config, train_items, docs_train)
    print(f"data ready in {time.time() - t0:.0f}s: {len(train_items)} questions, {data.stream.numel()} text tokens")
    train_seconds = fit(model, data, args.steps, args.lr, args.vqa_batch, args.text_batch)
    model = model.to(torch.bfloat16)
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    args.data_output.mkdir(parents=True, exist_ok=True)
    (args.data_output / "heldout.txt").write_text("\n".join(docs_heldout) + "\n", encoding="utf-8")
    (args.data_output / "calib_text.txt").write_text("\n".join(docs_train[::40]) + "\n", encoding="utf-8")

    from qvlquant.eval.easyvqa import evaluate

    model = model.float()
    limit = args.eval_limit or len(test_items)
    acc = evaluate(model, processor, test_items[:limit])
    ppl = perplexity(model, token_stream(tokenizer, docs_heldout))
    base_answer, base_acc = majority_baseline(train_items, test_items[:limit])
    report = {
        "steps": args.steps,
        "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "easyvqa_test_accuracy": round(acc["accuracy"], 2),
        "easyvqa_test_n": acc["n"],
        "majority_answer": base_answer,
        "majority_accuracy": round(base_acc, 2),
        "heldout_perplexity": round(ppl, 2),
        "heldout_docs": len(docs_heldout),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (args.data_output / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
