"""Train an embedded demo model: ``python -m qvlquant.tools.demo.train [--family F] [--steps N] [--output DIR]``.

Each step takes one easy-vqa batch (loss on the answer tokens only) and one batch of natural text (next-token loss over
Python standard-library docstrings), so the model both answers questions about images and predicts high-entropy
text, which is what makes it sensitive to quantization. Deterministic: fixed seeds, fixed data order, 2 threads.
Writes the checkpoint (safetensors, bf16) with its processor, the held-out and calibration text, and a JSON report
of what it reached (accuracy, majority baseline, held-out perplexity, training time).

``--family`` picks the architecture (``BEDS``): ``qwen2_vl`` is the demo itself (its tokenizer, processor and text
files are built here); ``qwen3_5`` and ``qwen3_5_moe`` train the same sizes in Qwen3.5's hybrid Gated DeltaNet
architecture, dense or with routed experts (``build.qwen3_5_config``), on the same data in the same order, with the
demo's image processor, chat template and held-out text. Their tokenizer is a byte-level BPE of 2,048 tokens trained
on the same text (``build.build_bpe_tokenizer``: transformers rebuilds any Qwen3.5 folder's tokenizer as Qwen's
byte-level BPE, so the demo's word-level one cannot serve), so their held-out perplexity is per BPE token
(``heldout_tokens`` of them), not comparable with the demo's per-word figure; easy-vqa accuracy is. Their report
(``train_report.json`` in the model folder) also records the load average, and for the MoE the share of the
calibration text's tokens each expert is routed (``expert_token_share``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import random
import sys
import time

import torch

from qvlquant.assets.paths import DATA_DIR, MODEL_DIR, QWEN3_5_DIR, QWEN3_5_MOE_DIR
from qvlquant.calib.easyvqa import load_split, majority_baseline
from qvlquant.calib.images import load_image
from qvlquant.tools.demo import build

VISUAL_TOKENS = (build.IMAGE_SIDE // 14 // 2) ** 2  # 16 per image
TEXT_WINDOW = 128


@dataclasses.dataclass(frozen=True)
class Bed:
    """One embedded model this trainer makes: the transformers class, where it goes, and how long it trains (the
    settings its shipped report was made with)."""

    model_class: str
    output: pathlib.Path
    steps: int
    lr: float = 2e-3
    vqa_batch: int = 64
    text_batch: int = 16
    moe: bool = False
    eval_limit: int | None = None  # easy-vqa test questions scored at the end (the first N; None: all 9,673)


BEDS = {
    "qwen2_vl": Bed("Qwen2VLForConditionalGeneration", MODEL_DIR, 1000),
    "qwen3_5": Bed("Qwen3_5ForConditionalGeneration", QWEN3_5_DIR, 300, vqa_batch=16, text_batch=8,
               eval_limit=1000),
    "qwen3_5_moe": Bed("Qwen3_5MoeForConditionalGeneration", QWEN3_5_MOE_DIR, 300, vqa_batch=16, text_batch=8,
                       moe=True, eval_limit=1000),
}


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
        pct_start: float = 0.1, frozen=(), forward_kwargs: dict | None = None) -> float:
    """AdamW with a one-cycle schedule, one easy-vqa batch and one text batch per step, in a fixed order; the
    parameters in ``frozen`` keep their values; ``forward_kwargs`` go to every training forward (an MoE's
    ``output_router_logits``, which adds its load-balancing loss). -> training seconds."""
    extra = forward_kwargs or {}
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
        vqa_loss = model(**batch, **extra).loss
        starts = torch.randint(0, data.stream.numel() - TEXT_WINDOW, (text_batch,), generator=g)
        text = torch.stack([data.stream[s:s + TEXT_WINDOW] for s in starts.tolist()])  # [b, window]
        text_loss = model(input_ids=text, labels=text, **extra).loss
        opt.zero_grad(set_to_none=True)
        (vqa_loss + text_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:5d}  vqa {vqa_loss.item():.3f}  text {text_loss.item():.3f}  {time.time() - t_train:.0f}s", flush=True)
    model.eval()
    return time.time() - t_train


@torch.inference_mode()
def expert_token_share(model, stream: torch.Tensor, window: int = TEXT_WINDOW) -> list[list[float]]:
    """Per MoE layer, the share (percent) of the routed slots of ``stream``'s tokens that each expert receives from
    its ``mlp.gate`` router's top-k, over non-overlapping windows of ``window`` tokens."""
    routers = [layer.mlp.gate for layer in model.model.language_model.layers]
    counts = [torch.zeros(r.num_experts, dtype=torch.long) for r in routers]

    def counter(row: torch.Tensor):
        def hook(router, args, out):  # out: (router logits, top-k weights, top-k expert indices [tokens, k])
            row.add_(torch.bincount(out[2].flatten(), minlength=router.num_experts))
        return hook

    hooks = [r.register_forward_hook(counter(row)) for r, row in zip(routers, counts)]
    try:
        n = stream.numel() // window
        windows = stream[: n * window].view(n, window)
        for start in range(0, n, 32):
            model(input_ids=windows[start:start + 32])
    finally:
        for h in hooks:
            h.remove()
    return [[round(100.0 * float(c) / float(row.sum()), 2) for c in row] for row in counts]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=sorted(BEDS), default="qwen2_vl", help="which embedded model (default: the demo)")
    ap.add_argument("--steps", type=int, help="default: the bed's (BEDS; what its shipped report was made with)")
    ap.add_argument("--vqa-batch", type=int)
    ap.add_argument("--text-batch", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--output", type=pathlib.Path, help="default: the bed's folder in qvlquant/assets")
    ap.add_argument("--data-output", type=pathlib.Path, default=DATA_DIR, help="the demo's text files (qwen2_vl only)")
    ap.add_argument("--eval-limit", type=int, default=None, help="test questions to score at the end (default: the bed's)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the shipped models' reports say which)")
    args = ap.parse_args(argv)
    bed = BEDS[args.family]
    steps, lr = args.steps or bed.steps, args.lr or bed.lr
    vqa_batch, text_batch = args.vqa_batch or bed.vqa_batch, args.text_batch or bed.text_batch
    output = args.output or bed.output
    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    load_before = os.getloadavg()

    train_items, test_items = load_split("train"), load_split("test")
    docs_train, docs_heldout = build.split_corpus(build.stdlib_docstrings())
    if args.family == "qwen2_vl":
        vqa_texts = [it.question + " " + it.answer for it in train_items + test_items]
        tokenizer = build.build_tokenizer(build.build_vocab(docs_train, vqa_texts))
        processor = build.build_processor(tokenizer)
        config = build.build_config(tokenizer)
    else:  # the demo's text; a byte-level BPE in the form transformers loads for Qwen3.5 (build.build_bpe_tokenizer)
        from transformers import AutoProcessor

        shipped = (DATA_DIR / "heldout.txt").read_text(encoding="utf-8").splitlines()
        if shipped != docs_heldout:
            raise SystemExit(f"this Python's standard library docstrings are not those the demo was trained on "
                             f"({DATA_DIR / 'heldout.txt'} differs from their held-out split): run the Python the "
                             "demo was built with")
        chats = [f"system\nYou are a helpful assistant.\nuser\n{it.question}\nassistant\n{it.answer}"
                 for it in train_items]
        built = build.build_bpe_tokenizer(docs_train, chats)
        config = build.qwen3_5_config(built, moe=bed.moe)
        output.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(output)
        build.build_processor(built).save_pretrained(output)
        processor = AutoProcessor.from_pretrained(output)  # trained with what loaders get from the folder
        tokenizer = processor.tokenizer
        for text in docs_heldout[:100] + chats[:100]:
            if tokenizer(text)["input_ids"] != built(text)["input_ids"]:
                raise SystemExit(f"{output}: transformers loads a tokenizer ({type(tokenizer).__name__}) that splits "
                                 f"{text[:60]!r} unlike the one built: the saved tokenizer is not what it would load")
    import transformers

    from qvlquant.eval.perplexity import perplexity, token_stream

    model = getattr(transformers, bed.model_class)(config).float()
    data = load_data(tokenizer, processor, config, train_items, docs_train)
    print(f"data ready in {time.time() - t0:.0f}s: {len(train_items)} questions, {data.stream.numel()} text tokens")
    train_seconds = fit(model, data, steps, lr, vqa_batch, text_batch,
                        forward_kwargs={"output_router_logits": True} if bed.moe else None)
    load_after = os.getloadavg()
    model = model.to(torch.bfloat16)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    if args.family == "qwen2_vl":
        processor.save_pretrained(output)
        args.data_output.mkdir(parents=True, exist_ok=True)
        (args.data_output / "heldout.txt").write_text("\n".join(docs_heldout) + "\n", encoding="utf-8")
        (args.data_output / "calib_text.txt").write_text("\n".join(docs_train[::40]) + "\n", encoding="utf-8")

    from qvlquant.eval.easyvqa import evaluate

    model = model.float()
    limit = args.eval_limit or bed.eval_limit or len(test_items)
    acc = evaluate(model, processor, test_items[:limit])
    heldout = token_stream(tokenizer, docs_heldout)
    ppl = perplexity(model, heldout)
    base_answer, base_acc = majority_baseline(train_items, test_items[:limit])
    report = {
        "steps": steps,
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
    if args.family == "qwen2_vl":
        (args.data_output / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    else:
        calib = token_stream(tokenizer, (DATA_DIR / "calib_text.txt").read_text(encoding="utf-8").splitlines())
        report = {
            "family": args.family,
            "made_by": " ".join(["python -m qvlquant.tools.demo.train", *(sys.argv[1:] if argv is None else argv)]),
            **report,
            "heldout_tokens": heldout.numel(), "vocab_size": len(tokenizer),
            "lr": lr, "vqa_batch": vqa_batch, "text_batch": text_batch,
            "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "seconds_total": round(time.time() - t0, 1),
        }
        if bed.moe:
            report["router_aux_loss_coef"] = config.text_config.router_aux_loss_coef
            report["expert_token_share"] = expert_token_share(model, calib)
        (output / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
