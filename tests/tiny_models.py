"""Tiny random-weight models of each supported family, built from their transformers config classes, with a
hand-made multimodal batch (two rows, right padding, one 4x4-patch image each)."""

import torch

TEXT = dict(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1, bos_token_id=0, eos_token_id=2, pad_token_id=0)
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]}
IDS = dict(image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4)


def tiny_model(model_type: str):
    import transformers as tf

    torch.manual_seed(0)
    if model_type == "qwen2_vl":
        cfg = tf.Qwen2VLConfig(text_config=dict(TEXT, rope_parameters=MROPE),
                               vision_config=dict(depth=2, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2), **IDS)
        model = tf.Qwen2VLForConditionalGeneration(cfg)
    elif model_type == "qwen2_5_vl":
        cfg = tf.Qwen2_5_VLConfig(text_config=dict(TEXT, rope_parameters=MROPE),
                                  vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                                                     out_hidden_size=128, fullatt_block_indexes=[1]), **IDS)
        model = tf.Qwen2_5_VLForConditionalGeneration(cfg)
    elif model_type == "qwen3_vl":
        cfg = tf.Qwen3VLConfig(text_config=dict(TEXT, head_dim=64, rope_parameters=dict(MROPE, mrope_interleaved=True)),
                               vision_config=dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=2,
                                                  out_hidden_size=128, deepstack_visual_indexes=[0, 1],
                                                  num_position_embeddings=64, patch_size=16), **IDS)
        model = tf.Qwen3VLForConditionalGeneration(cfg)
    elif model_type == "qwen3_5":
        model = tf.Qwen3_5ForConditionalGeneration(qwen3_5_config())
        with torch.no_grad():  # zero-centred norms start at 0 (a scale of 1): give them values, as training does
            for name, p in model.named_parameters():
                if name.endswith(("layernorm.weight", "norm.weight")) and "visual" not in name:
                    p.normal_(0.0, 0.1)
    else:
        raise ValueError(model_type)
    return model.float().eval()


def qwen3_5_config(vocab_size: int = 300, patch_size: int = 16, layers: int = 4):
    """Qwen3.5 (dense): a Gated DeltaNet layer three times, then a gated full-attention layer; 32 value heads make
    the DeltaNet's fused b/a projection 64 wide (vLLM's smallest quantized output)."""
    import transformers as tf

    text = dict(TEXT, vocab_size=vocab_size, num_hidden_layers=layers, head_dim=64,
                rope_parameters=dict(MROPE, mrope_interleaved=True, mrope_section=[2, 3, 3], partial_rotary_factor=0.25),
                linear_num_key_heads=16, linear_key_head_dim=4, linear_num_value_heads=32, linear_value_head_dim=4,
                linear_conv_kernel_dim=4)
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                  num_position_embeddings=64, patch_size=patch_size)
    return tf.Qwen3_5Config(text_config=text, vision_config=vision, **IDS)


def qwen3_5_moe_config(vocab_size: int = 300, patch_size: int = 16, layers: int = 4, experts: int = 8, top_k: int = 2):
    """Qwen3.5-MoE: the Qwen3.5 layers above with a sparse MoE block (``experts`` routed experts, top ``top_k``, and a
    shared expert) as every layer's MLP."""
    import transformers as tf

    dense = qwen3_5_config(vocab_size, patch_size, layers)
    text = dict(dense.text_config.to_dict(), num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=128,
                shared_expert_intermediate_size=128)
    for key in ("model_type", "architectures", "transformers_version", "intermediate_size"):
        text.pop(key, None)
    return tf.Qwen3_5MoeConfig(text_config=text, vision_config=dense.vision_config.to_dict(), **IDS)


def qwen3_vl_moe_config(vocab_size: int = 300, patch_size: int = 16, layers: int = 3, experts: int = 8, top_k: int = 2,
                        mlp_only_layers=(1,), decoder_sparse_step: int = 1):
    """Qwen3-VL-MoE: Qwen3-VL (DeepStack after layers 0 and 1) whose layers hold a sparse MoE block (``experts``
    routed experts 256 wide, top ``top_k``, no shared expert) or, those ``mlp_only_layers`` lists or
    ``decoder_sparse_step`` skips, a dense MLP (256 wide). No fused expert tensor is square (transformers 5.24 keeps
    a square one as stored, so it would load a transposed checkpoint's wrongly)."""
    import transformers as tf

    text = dict(TEXT, vocab_size=vocab_size, num_hidden_layers=layers, head_dim=64,
                rope_parameters=dict(MROPE, mrope_interleaved=True), num_experts=experts, num_experts_per_tok=top_k,
                moe_intermediate_size=256, mlp_only_layers=list(mlp_only_layers),
                decoder_sparse_step=decoder_sparse_step)
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                  deepstack_visual_indexes=[0, 1], num_position_embeddings=64, patch_size=patch_size)
    return tf.Qwen3VLMoeConfig(text_config=text, vision_config=vision, **IDS)


def qwen3_vl_moe_checkpoint(folder, transposed: bool = True, **config):
    """A bf16 checkpoint folder of a tiny Qwen3-VL-MoE with the demo's processor files (its tokenizer's 2008 tokens,
    14-pixel patches), written as the published checkpoints are: each layer's experts fused and ``transposed``
    (``mlp.experts.gate_up_proj`` [E, H, 2I], ``down_proj`` [E, I, H]; transformers' ``save_pretrained`` writes its
    runtime [E, 2I, H] / [E, H, I]), and the expert count as ``num_experts`` (transformers writes
    ``num_local_experts``). -> the float32 model it holds."""
    import json
    import pathlib
    import shutil

    import transformers as tf
    from safetensors.torch import load_file, save_file

    from qvlquant.assets.paths import MODEL_DIR

    torch.manual_seed(0)
    model = tf.Qwen3VLMoeForConditionalGeneration(qwen3_vl_moe_config(vocab_size=2008, patch_size=14, **config))
    folder = pathlib.Path(folder)
    model.to(torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        shutil.copyfile(MODEL_DIR / name, folder / name)
    tensors = load_file(folder / "model.safetensors")
    if transposed:
        tensors = {k: v.transpose(1, 2).contiguous() if k.endswith(("experts.gate_up_proj", "experts.down_proj")) else v
                   for k, v in tensors.items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["num_experts"] = cfg["text_config"].pop("num_local_experts")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return model.float().eval()


def tiny_batch(model, lengths=(20, 14), seed=0) -> dict:
    """Rows: [text..., <vision_start>, 4 x <image_pad>, <vision_end>, text...], right-padded to the longest."""
    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    patch = vc.patch_size
    features = vc.in_channels * vc.temporal_patch_size * patch * patch
    rows, masks = [], []
    n = max(lengths)
    for length in lengths:
        text = torch.randint(10, 300, (length - 6,), generator=g)
        ids = torch.cat([text[:3], torch.tensor([3, 5, 5, 5, 5, 4]), text[3:]])
        rows.append(torch.cat([ids, torch.zeros(n - len(ids), dtype=torch.long)]))
        masks.append(torch.tensor([1] * len(ids) + [0] * (n - len(ids))))
    input_ids = torch.stack(rows)
    return dict(
        input_ids=input_ids,
        attention_mask=torch.stack(masks),
        mm_token_type_ids=(input_ids == 5).long(),
        pixel_values=torch.randn(16 * len(lengths), features, generator=g),
        image_grid_thw=torch.tensor([[1, 4, 4]] * len(lengths)),
    )


MTP_KEYS = {  # a few tensors of the MTP head, as Qwen3.5 checkpoints hold it (transformers does not load it)
    "mtp.fc.weight": ((128, 256), torch.bfloat16),
    "mtp.layers.0.mlp.down_proj.weight": ((128, 256), torch.bfloat16),
    "mtp.norm.weight": ((128,), torch.float32),
}


def qwen3_5_checkpoint(folder, layers: int = 4, moe: bool = False):
    """A bf16 checkpoint folder of a tiny Qwen3.5 (dense, or ``moe``: Qwen3.5-MoE, whose experts transformers saves
    one tensor per expert) with the demo's processor files (its tokenizer's 2008 tokens, 14-pixel patches) and an
    MTP head's tensors. -> the float32 model it holds."""
    import pathlib
    import shutil

    import transformers as tf
    from safetensors.torch import load_file, save_file

    from qvlquant.assets.paths import MODEL_DIR

    torch.manual_seed(0)
    if moe:
        model = tf.Qwen3_5MoeForConditionalGeneration(qwen3_5_moe_config(vocab_size=2008, patch_size=14, layers=layers))
    else:
        model = tf.Qwen3_5ForConditionalGeneration(qwen3_5_config(vocab_size=2008, patch_size=14, layers=layers))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("layernorm.weight", "norm.weight")) and "visual" not in name:
                p.normal_(0.0, 0.1)
    folder = pathlib.Path(folder)
    model.to(torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        shutil.copyfile(MODEL_DIR / name, folder / name)
    tensors = load_file(folder / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    tensors.update({k: torch.randn(shape, generator=g).to(dtype) for k, (shape, dtype) in MTP_KEYS.items()})
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return model.float().eval()
