"""Building blocks of the embedded demo model: its text corpus, tokenizer, processor and config.

The demo is a small model of the real Qwen2-VL architecture (``Qwen2VLForConditionalGeneration``) with a real
``Qwen2VLProcessor``. Its tokenizer is a word-level vocabulary trained here, carrying Qwen2-VL's special tokens and
ChatML chat template. Natural text comes from the docstrings of the Python standard library (read with ``ast``,
nothing imported), split 95/5 into train and held-out text.
"""

from __future__ import annotations

import ast
import collections
import pathlib
import re
import sysconfig

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
]
WORD_PATTERN = r"\w+|[^\w\s]"
IMAGE_SIDE = 112  # pixels; 112 / 14 = 8 patches per side, 2x2 merge -> 16 visual tokens per image
VOCAB_WORDS = 2000

# ChatML as in Qwen2-VL's own template: a default system turn, images as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def stdlib_docstrings() -> list[str]:
    """Docstrings (>= 8 words) of the running Python's standard library, in a fixed file order."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "idlelib", "lib2to3", "__phello__", "turtledemo")
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if any(s in rel for s in skip):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= 8:
                    docs.append(" ".join(doc.split()))
    return docs


def split_corpus(docs: list[str]) -> tuple[list[str], list[str]]:
    """95/5 split: every 20th docstring is held out."""
    train = [d for i, d in enumerate(docs) if i % 20 != 19]
    heldout = [d for i, d in enumerate(docs) if i % 20 == 19]
    return train, heldout


def words(text: str) -> list[str]:
    return re.findall(WORD_PATTERN, text.lower())


def build_vocab(train_docs: list[str], vqa_texts: list[str], n_words: int = VOCAB_WORDS) -> list[str]:
    """Special tokens, every word of the VQA questions/answers/chat template, then the most frequent corpus words."""
    fixed = SPECIAL_TOKENS + ["system", "user", "assistant"] + words("You are a helpful assistant.")
    vqa_words = sorted({w for t in vqa_texts for w in words(t)})
    counts = collections.Counter(w for d in train_docs for w in words(d))
    vocab = list(dict.fromkeys(fixed + vqa_words))
    for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= len(SPECIAL_TOKENS) + n_words:
            break
        if w not in vocab:
            vocab.append(w)
    return vocab


def build_tokenizer(vocab: list[str]):
    """A fast tokenizer over a word-level model, with Qwen2-VL's special tokens as added tokens."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated")]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<unk>", "<|endoftext|>", "<|im_end|>")],
        padding_side="left",
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# Qwen's pre-tokenizer (transformers' Qwen3_5Tokenizer): what every Qwen3.5 / Qwen3.5-MoE folder's text is split by
QWEN_PRETOKENIZE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
                    r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
BPE_VOCAB = 2048


def build_bpe_tokenizer(train_docs: list[str], vqa_chats: list[str], vocab_size: int = BPE_VOCAB):
    """A byte-level BPE of ``vocab_size`` tokens (the demo's special tokens first, at the demo's ids), trained on the
    demo's training text and ``vqa_chats`` (easy-vqa turns as the model sees them), with the demo's chat template.

    Why not the demo's word-level tokenizer: transformers 5 loads the tokenizer of every folder whose config says
    qwen3_5 / qwen3_5_moe as ``Qwen3_5Tokenizer``, which keeps only tokenizer.json's vocabulary and merges and
    rebuilds the rest (Qwen's pre-tokenizer regex, byte-level, NFC). This tokenizer is built in exactly that form,
    so what transformers (and vLLM, through it) load is what the model was trained with."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = [t for t in SPECIAL_TOKENS if t != "<unk>"]  # byte-level: every string has tokens, no unknown
    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated", invert=False),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train_docs + vqa_chats, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=[t for t in special if t not in ("<|endoftext|>", "<|im_end|>")],
        padding_side="left",
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tokenizer):
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    pixels = IMAGE_SIDE * IMAGE_SIDE
    image_processor = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels)
    return Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer):
    """4 decoder layers, hidden 256 (2 x 128), intermediate 512, 4 heads / 2 KV heads, a 2-block vision tower."""
    from transformers import Qwen2VLConfig

    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )
    vision = dict(depth=2, embed_dim=128, hidden_size=256, num_heads=4, mlp_ratio=2)
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def qwen3_5_config(tokenizer, moe: bool = False):
    """The demo's sizes in the Qwen3.5 architecture: 4 decoder layers of hidden 256 (three Gated DeltaNet layers,
    then a gated full-attention one, as ``layer_types`` gives with Qwen3.5's full_attention_interval of 4), 4 heads /
    2 KV heads of 64, and the Qwen3.5 DeltaNet's proportions (16 key heads, twice as many value heads, one head size;
    32 value heads make the fused b/a projection 64 wide, vLLM's smallest quantized output). The MLP: dense 512, or
    (``moe``) 16 routed experts of 128, top 2, beside a shared expert of 128 (128: one GPTQ group of the down
    projections' input). A 2-block vision tower with 14-pixel patches, as the demo's processor cuts them. No MTP
    head: transformers 5 has no module for it (its config has no mtp_num_hidden_layers), so it can be neither
    trained nor saved here."""
    from transformers import Qwen3_5Config, Qwen3_5MoeConfig

    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [3, 3, 2], "mrope_interleaved": True},
        linear_num_key_heads=16,
        linear_key_head_dim=16,
        linear_num_value_heads=32,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        tie_word_embeddings=True,
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )
    if moe:
        text.update(num_experts=16, num_experts_per_tok=2, moe_intermediate_size=128, shared_expert_intermediate_size=128)
    else:
        text.update(intermediate_size=512)
    vision = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=256,
                  num_position_embeddings=(IMAGE_SIDE // 14) ** 2, patch_size=14)
    return (Qwen3_5MoeConfig if moe else Qwen3_5Config)(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
