"""The checkpoint report (``qvlquant inspect``): what a quantized checkpoint is, whether it still matches its
manifest, what vLLM decides for it (``qvlquant.checkpoint.vllm``), and whether transformers 5 keeps its vision tower
in full precision. The repair of ``modules_to_not_convert`` is ``qvlquant.checkpoint.repair``.

Reads config.json and the safetensors headers (names, shapes, dtypes); no weights are loaded, though verifying a
qvlquant export's manifest hashes every file. (Named ``inspection`` so that it does not shadow the stdlib ``inspect``.)
transformers and vLLM are imported by the functions that use them, not with this module.
"""

from __future__ import annotations

import pathlib

from qvlquant.checkpoint.qconfig import (
    CheckpointQuant,
    describe_spec,
    read_config,
    read_quantization_config,
)
from qvlquant.checkpoint.vllm import (
    TP_SIZES,
    VLLM_MODELS,
    ask_vllm,
    copied_rules,
    vllm_installed,
    vllm_problems,
)
from qvlquant.families import ModelFamily, family_for
from qvlquant.quant.formats import Fp8Format, Int8Format, Nvfp4Format, PackFormat
from qvlquant.storage.manifest import (
    MANIFEST,
    ManifestError,
    read_manifest,
    verify_manifest,
)
from qvlquant.storage.shards import read_checkpoint_header


def transformers_converts(runtime_name: str, patterns: list[str] | None) -> bool:
    """Whether transformers 5 replaces the module ``runtime_name`` by a quantized one, given ``patterns`` from
    ``modules_to_not_convert``: transformers' own matcher (``quantizers_utils.should_convert_module``), not a copy."""
    from transformers.quantizers.quantizers_utils import (
        should_convert_module,  # heavy: only when asked
    )

    return should_convert_module(runtime_name, patterns or None)


def verification(folder: pathlib.Path) -> dict:
    """{"status": "verified" | "failed" | "no manifest", "files": n listed, "error": why it failed or None}."""
    if not (folder / MANIFEST).exists():
        return {"status": "no manifest", "files": 0, "error": None}
    try:
        verify_manifest(folder)
        return {"status": "verified", "files": len(read_manifest(folder)), "error": None}
    except (ManifestError, OSError) as e:
        return {"status": "failed", "files": 0, "error": str(e)}


def quantized_shapes(header: dict, quant: CheckpointQuant | None, family: ModelFamily) -> dict[str, tuple[int, int]]:
    """Runtime name -> (in, out) of every quantized linear: GPTQ / AWQ ``qweight`` + ``scales``, compressed-tensors
    ``weight_packed`` [out, in * bits / 32] (NVFP4: [out, in / 2] uint8), FP8 ``weight`` [out, in] beside its scale; {} for a full-precision
    checkpoint."""
    if quant is None:
        return {}
    shapes = {}
    for key, (shape, _) in header.items():
        module = key.rsplit(".", 1)[0]
        name = family.to_runtime(module + ".")[:-1]
        spec = quant.spec_for(name) if key.endswith((".qweight", ".weight_packed")) else None
        bits = (spec or quant.spec).bits  # a packed linear the config leaves unquantized: ``module_settings`` says so
        if key.endswith(".qweight"):
            if module + ".scales" not in header:
                raise ValueError(f"{key} has no {module}.scales beside it: not a GPTQ / AWQ checkpoint")
            n = header[module + ".scales"][0][1]
            k = shape[0] * 32 // bits if quant.pack_format is PackFormat.GPTQ else shape[0]
        elif key.endswith(".weight_packed"):
            per = 2 if isinstance(quant.pack_format, Nvfp4Format) else 32 // bits  # NVFP4: two codes a uint8
            n, k = shape[0], shape[1] * per
        elif isinstance(quant.pack_format, (Fp8Format, Int8Format)) and \
                key.endswith("." + quant.pack_format.scale_name):
            n, k = header[module + ".weight"][0]  # FP8 / INT8 W8A8: e4m3 or int8 weight [out, in] beside its scale
        else:
            continue
        shapes[name] = (k, n)
    return shapes


def module_settings(header: dict, quant: CheckpointQuant | None, family: ModelFamily) -> dict[str, int]:
    """How many decoder-layer linears the config gives each setting ("W8 g128 sym", "not quantized":
    ``CheckpointQuant.spec_for``), and how many of them the checkpoint holds otherwise ("... held packed" /
    "... held as a plain weight"); {} for a full-precision checkpoint."""
    if quant is None:
        return {}
    counts: dict[str, int] = {}
    for key in header:
        module, _, leaf = key.rpartition(".")
        name = family.to_runtime(module + ".")[:-1]
        if leaf not in ("qweight", "weight_packed", "weight") or not family.is_layer_key(name) \
                or not name.endswith(tuple("." + linear for linear in family.linears)):
            continue
        spec = quant.spec_for(name)
        setting = quant.pack_format.label if spec is not None and hasattr(quant.pack_format, "label") \
            else describe_spec(spec)
        scaled = isinstance(quant.pack_format, (Fp8Format, Int8Format))  # FP8 / W8A8: ``weight`` beside its scale
        plain = leaf == "weight" and not (scaled and f"{module}.{quant.pack_format.scale_name}" in header)
        if plain != (quant.spec_for(name) is None):
            setting += " but held as a plain weight" if plain else " but held packed"
        counts[setting] = counts.get(setting, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def quantization_settings(quant: CheckpointQuant | None) -> dict:
    """The settings the report shows, read by ``read_quantization_config``; {} for a full-precision checkpoint."""
    if quant is None:
        return {}
    return {**quant.summary(), "desc_act": quant.act_order, "format": quant.checkpoint_format}


def inspect_checkpoint(folder: str | pathlib.Path) -> dict:
    """The report; ``verification`` says whether a qvlquant export still matches its manifest (the rest is read from
    the files as they are, so it is only trustworthy when that is "verified" or the folder is not ours). ``vllm``:
    what vLLM's own classes decide (``ask_vllm``) where vLLM is installed, else the copied rules; ``marlin`` (kept
    for the CLI): per TP size, every reason vLLM would refuse or mis-load the export."""
    folder = pathlib.Path(folder)
    verified = verification(folder)
    config = read_config(folder)  # every field read below, checked for its type
    family = family_for(config.get("model_type", "?")).bind(config)
    quant = read_quantization_config(config.get("quantization_config"), str(folder / "config.json"))
    header = read_checkpoint_header(folder)
    shapes = quantized_shapes(header, quant, family)
    settings = module_settings(header, quant, family)
    plain = sorted(m for m in (family.to_runtime(k[: -len(".weight")] + ".")[:-1] for k, (s, _) in header.items()
                               if k.endswith(".weight") and len(s) == 2) if m not in shapes)  # FP8 keeps .weight
    vision = [m for m in plain if m.startswith(family.vision_tower + ".")]
    awq = quant is not None and quant.method == "awq"
    exposed = [m for m in vision if transformers_converts(m, list(quant.not_converted))] if awq else []
    vllm = {}
    if shapes:
        asked = vllm_installed() and config.get("model_type") in VLLM_MODELS
        vllm = ask_vllm(folder, config, family) if asked else copied_rules(quant, shapes, vision, family, config)
    return {
        "folder": str(folder),
        "verification": verified,
        "model_type": config.get("model_type"),
        "quantization": quantization_settings(quant),
        "quantized_linears": len(shapes),
        "module_settings": settings,
        "unquantized_linears": len(plain),
        "vision_linears": len(vision),
        "vision_exposed_in_transformers": exposed,
        "vllm": vllm,
        "marlin": {tp: vllm_problems(vllm, tp) for tp in TP_SIZES} if vllm else {},
    }
