"""What vLLM makes of a quantized checkpoint: its own quantization classes asked on a CPU (a GPU of
``VLLM_CAPABILITY`` and tensor-parallel groups faked, no kernel run) where vLLM is installed, else a COPY of vLLM
``VLLM_CHECKED``'s rules. transformers and vLLM are imported by the functions that use them."""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
import pathlib
import re
import types

import torch

from qvlquant.checkpoint.qconfig import (
    CheckpointQuant,
    describe_spec,
    read_quantization_config,
)
from qvlquant.engine.experts import unfuse_experts
from qvlquant.families import QWEN2_VL, ModelFamily, family_for
from qvlquant.quant.formats import Nvfp4Format
from qvlquant.quant.spec import QuantSpec
from qvlquant.storage.shards import DTYPES, read_checkpoint_header

MARLIN_GROUPS = (-1, 32, 64, 128)
VLLM_CHECKED = "0.33.0"  # the release whose code the conformance tests ran and whose rules the fallback copies
VLLM_CAPABILITY = (9, 0)  # the GPU vLLM's kernel-support checks are asked about (sm_90, an H100): no GPU needed
TP_SIZES = (1, 2, 4, 8)


def copied_config_refusals(quant: CheckpointQuant) -> list[str]:
    """A COPY of vLLM 0.33's rules (fallback when vLLM is not installed; ``ask_vllm`` asks its own classes): why
    it refuses the config itself, judged for the base setting and every per-module override (GPTQ ``dynamic``,
    compressed-tensors name / regex groups). GPTQ: 4/8-bit symmetric only, act-order (``desc_act``) refused;
    groups -1/32/64/128. (AWQ's, 4-bit only, is not repeated: ``read_quantization_config`` refuses other AWQ
    widths.)"""
    settings = [("", quant.spec, quant.act_order)]
    settings += [(f" (override {r.pattern!r})", r.spec, r.act_order) for r in quant.overrides if r.spec is not None]
    problems = []
    for where, spec, act_order in settings:
        bits, group, sym = spec.bits, spec.group_size, spec.sym
        if quant.method == "gptq" and (bits, sym) not in ((4, True), (8, True)):
            problems.append(f"GPTQ needs bits 4 or 8 with sym=true, got bits {bits}, sym {sym}{where}")
        if quant.method == "gptq" and act_order and group != -1:
            problems.append(f"GPTQ act-order (desc_act=true) is refused by vLLM 0.33{where}: export with "
                            "--static-groups")
        if group not in MARLIN_GROUPS and not isinstance(quant.pack_format, Nvfp4Format):  # NVFP4: its own 16
            problems.append(f"group_size {group} not in {MARLIN_GROUPS}{where}")
    return problems


def fused_shard_problems(quant: CheckpointQuant, layers: set[str], family: ModelFamily) -> list[str]:
    """vLLM runs q/k/v, gate/up and an MoE layer's experts (the family's ``fused`` entries) as one layer of one
    setting: shards of different settings are refused (a partly skipped group: GPTQ's ``is_layer_gptq_quantized``,
    compressed-tensors' ``should_ignore_layer``) or read with one shard's (a partly overridden group: vLLM checks
    nothing there; its MoE layer takes expert 0's setting, or GPTQ's rule for the layer). ``layers``: runtime paths
    of decoder layers."""
    problems = []
    for layer in sorted(layers):
        for fused, group in family.at(family.index_of(layer)).fused:
            settings = {name: describe_spec(quant.spec_for(f"{layer}.{name}")) for name in group}
            if len(set(settings.values())) <= 1:
                continue
            if len(group) <= 4:
                problems.append(f"{layer}: vLLM fuses {', '.join(group)} into one linear of one setting, the "
                                f"config gives them {', '.join(f'{n} {v}' for n, v in settings.items())}")
            else:
                counts = {v: sum(1 for x in settings.values() if x == v) for v in dict.fromkeys(settings.values())}
                problems.append(f"{layer}: vLLM runs {fused} ({len(group)} linears) as one layer of one setting, "
                                f"the config gives them {', '.join(f'{v} ({n} linears)' for v, n in counts.items())}")
    return problems


def copied_experts_problems(quant: CheckpointQuant, shapes: dict[str, tuple[int, int]], tp: int,
                            family: ModelFamily) -> list[str]:
    """A COPY of vLLM 0.33's rules (fallback) for the MoE layers at tensor-parallel size ``tp``: every expert is
    split over the ranks along its intermediate size (gate/up outputs, down inputs). More ranks than experts are
    refused. Block FP8 (``Fp8MoEMethod``) takes a share of whole 128-blocks, else refines the blocks to the largest
    common divisor of 128, the share and the hidden size (32 or more: Triton's kernel), else refuses.
    compressed-tensors refuses a rank's share that splits a group of the layer's setting. GPTQ / AWQ run
    Marlin's MoE kernel when the hidden size is a multiple of 128 and the share holds whole groups of the config's
    base setting, else vLLM's MoeWNA16 at that base setting: it halves the group until it divides the share and the
    hidden size (refused below 32), reads AWQ's ``modules_to_not_convert`` but no GPTQ ``dynamic`` rule, so a GPTQ
    MoE layer skipped or given another setting is then misread."""
    problems = []
    seen = set()
    for name, (k, n) in sorted(shapes.items()):
        if not family.is_layer_key(name):
            continue
        index, _, inside = name[len(family.decoder_layers) + 1:].partition(".")
        layer = f"{family.decoder_layers}.{index}"
        if family.expert_of(inside) is None or not inside.endswith("." + family.expert_linears[2]) or layer in seen:
            continue  # one check per layer, from an expert's down projection (in: the intermediate size)
        seen.add(layer)
        vname, share, spec = f"{layer}.{family.experts}", k // tp, quant.spec_for(name)
        if tp > family.expert_count:
            problems.append(f"{vname}: tensor-parallel size {tp} is greater than the number of experts "
                            f"{family.expert_count}")
        elif k % tp:
            problems.append(f"{vname}: intermediate size {k} does not split over tp={tp}")
        elif quant.method == "fp8":  # block FP8: whole blocks, or blocks refined to a divisor of 32 or more
            block = quant.spec.group_size
            if share % block and math.gcd(block, share, n) < 32:
                problems.append(f"{vname}: its intermediate share of {share} at tp={tp} is no whole number of "
                                f"{block}-blocks, and no block of 32 or more divides it and the hidden size {n} "
                                "(vLLM's Fp8MoEMethod refines the blocks only so far)")
        elif quant.method == "compressed-tensors":
            if spec is not None and spec.group_size > 0 and share % spec.group_size:
                problems.append(f"{vname}: its intermediate share of {share} at tp={tp} splits a quantization group "
                                f"of {spec.group_size}")
        elif n % 128 or (quant.spec.group_size > 0 and share % quant.spec.group_size):  # Marlin's MoE kernel: no
            if spec is None and quant.method == "awq":
                continue  # MoeWNA16 reads AWQ's modules_to_not_convert
            if describe_spec(spec) != describe_spec(quant.spec):
                problems.append(f"{vname}: at tp={tp} vLLM falls back to MoeWNA16, which builds it "
                                f"{describe_spec(quant.spec)} (no dynamic rule read); the config gives it "
                                f"{describe_spec(spec)}")
            group = quant.spec.group_size
            while group >= 32 and (share % group or n % group):
                group //= 2
            if group < 32:
                problems.append(f"{vname}: no group of 32 or more divides its intermediate share of {share} at "
                                f"tp={tp} (vLLM's MoeWNA16)")
    return problems


def marlin_problems(quant: CheckpointQuant, shapes: dict[str, tuple[int, int]], tp: int,
                    family: ModelFamily = QWEN2_VL, heads: tuple[int, int] | None = None) -> list[str]:
    """A COPY of vLLM 0.33's rules (fallback): ``copied_config_refusals`` and why it refuses the shapes at
    tensor-parallel size ``tp``. ``heads`` (attention heads, KV heads): query heads split evenly, KV heads are
    replicated when ``tp`` >= their count; outputs split evenly; an input split must hold whole groups
    (misaligned kernel tiles are padded, so that is the only shape rule left). Which linears split along outputs
    or inputs comes from the family (``column_parallel`` / ``row_parallel``)."""
    problems = copied_config_refusals(quant)
    layers = {f"{family.decoder_layers}.{n[len(family.decoder_layers) + 1:].split('.', 1)[0]}" for n in shapes
              if family.is_layer_key(n)}
    problems += fused_shard_problems(quant, layers, family) + copied_experts_problems(quant, shapes, tp, family)
    if heads is not None:
        num_heads, num_kv = heads
        kv_ok = tp % num_kv == 0 if tp >= num_kv else num_kv % tp == 0
        if num_heads % tp or not kv_ok:
            problems.append(f"{num_heads} attention heads / {num_kv} KV heads do not split over tp={tp}")
    for name, (k, n) in sorted(shapes.items()):
        if family.experts and f".{family.experts}." in name:
            continue  # copied_experts_problems: vLLM's MoE layer has rules of its own
        spec = quant.spec_for(name)
        group = spec.group_size if spec is not None else -1  # an unquantized input split needs no whole groups
        row = any(name.endswith("." + p) for p in family.row_parallel)
        kv = heads is not None and name.endswith(("k_proj", "v_proj"))  # split by heads, or replicated
        column = any(name.endswith("." + p) for p in family.column_parallel) and not kv
        if (row and (k % tp or (group > 0 and (k // tp) % group))) or (column and n % tp):
            problems.append(f"{name}: in {k} / out {n} does not split over tp={tp} "
                            f"({'inputs into whole groups of ' + str(group) if row else 'outputs evenly'})")
    return problems


def copied_vision_decision(quant: CheckpointQuant, vision: list[str]) -> list[str]:
    """A COPY of vLLM 0.33's rules (fallback): the vision linears it would treat as quantized. GPTQ: a name
    containing any ``modules_in_block_to_quantize`` entry; AWQ: none containing a ``modules_to_not_convert``
    entry; FP8 (``fp8``): none named exactly in ``modules_to_not_convert``; compressed-tensors: none matched by
    ``ignore`` (``re:`` entries as regexes)."""
    names = [n.removeprefix("model.") for n in vision]  # vLLM's mapper: model.visual.* -> visual.*
    if quant.method == "gptq":  # then the first dynamic rule that matches: "-:" leaves it unquantized
        first = lambda n: next((r for r in quant.overrides if re.match(r.pattern, n)), None)  # noqa: E731
        return [n for n in names if (not quant.in_block or any(e in n for e in quant.in_block))
                and (first(n) is None or first(n).spec is not None)]
    if quant.method == "awq":
        return [n for n in names if not any(e in n for e in quant.not_converted)]
    if quant.method == "fp8":  # Fp8Config: exact names only, after the same mapper (model.visual.* -> visual.*)
        ignored = {e.removeprefix("model.") for e in quant.not_converted}
        return [n for n in names if n not in ignored]
    return [n for n in names if not any(re.fullmatch(e[3:], n) if e.startswith("re:") else e == n
                                        for e in quant.ignore)]


def copied_rules(quant: CheckpointQuant, shapes: dict, vision: list[str], family: ModelFamily, config: dict) -> dict:
    """The fallback report, in the shape of ``ask_vllm``'s, from the copied rules."""
    text = config.get("text_config") or config
    heads = (text["num_attention_heads"], text["num_key_value_heads"]) if "num_attention_heads" in text else None
    tp = {n: marlin_problems(quant, shapes, n, family, heads) for n in TP_SIZES}
    refused = copied_config_refusals(quant)
    return {"checked_by": f"a COPY of vLLM {VLLM_CHECKED}'s rules in qvlquant (vLLM is not installed here; "
                          "install vLLM in a venv of its own, docs/VLLM.md, to ask vLLM's own classes)",
            "method": quant.method, "refused": "; ".join(refused) or None, "layers": {}, "settings": {},
            "vision_quantized": copied_vision_decision(quant, vision), "tp": tp, "kernels": {}}


def vllm_compatibility_warnings(quantization_config: dict, family: ModelFamily) -> list[str]:
    """What to warn about at quantize time, before any work: the reasons vLLM (its own ``from_config`` when it is
    installed, else the copied rules) refuses the ``quantization_config`` qvlquant will write
    (``export.quantization_config``). [] when vLLM accepts it."""
    if vllm_installed() and family.name in VLLM_MODELS:
        from vllm.model_executor.layers.quantization import (
            get_quantization_config,  # optional: the vllm extra
        )

        method = {"gptq": "auto_gptq", "awq": "auto_awq"}.get(quantization_config.get("quant_method"),
                                                            quantization_config.get("quant_method"))
        try:
            with pretend_gpu(1):
                get_quantization_config(method).from_config(copy.deepcopy(quantization_config))
        except (ValueError, KeyError) as e:
            return [f"vLLM {vllm_installed()} will refuse this export: {e}"]
        return []
    quant = read_quantization_config(quantization_config, "the export's config.json")
    return [f"vLLM {VLLM_CHECKED} (copied rules) will refuse this export: {p}" for p in copied_config_refusals(quant)]


# --- vLLM, asked through its own classes -------------------------------------------------------------------------
# Where vLLM builds each family: (module, multimodal class, module, language-model class inside it)
VLLM_MODELS = {
    "qwen2_vl": ("qwen2_vl", "Qwen2VLForConditionalGeneration", "qwen2", "Qwen2ForCausalLM"),
    "qwen2_5_vl": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "qwen2", "Qwen2ForCausalLM"),
    "qwen3_vl": ("qwen3_vl", "Qwen3VLForConditionalGeneration", "qwen3_vl", "Qwen3LLMForCausalLM"),
    "qwen3_5": ("qwen3_5", "Qwen3_5ForConditionalGeneration", "qwen3_5", "Qwen3_5ForCausalLM"),
    "qwen3_5_moe": ("qwen3_5", "Qwen3_5MoeForConditionalGeneration", "qwen3_5", "Qwen3_5MoeForCausalLM"),
    "qwen3_vl_moe": ("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", "qwen3_vl_moe", "Qwen3MoeLLMForCausalLM"),
}


def vllm_installed() -> str | None:
    """vLLM's version when it imports here, else None."""
    try:
        import vllm  # optional: the vllm extra
    except ImportError:
        return None
    return vllm.__version__


@contextlib.contextmanager
def pretend_gpu(tp: int, capability: tuple[int, int] = VLLM_CAPABILITY):
    """vLLM's platform reports a CUDA device of ``capability`` and a tensor-parallel group of ``tp`` ranks (this
    process rank 0; data-, context- and expert-parallel groups of one rank, which vLLM's MoE layers read) while the
    block runs, so its quantization classes take the decisions they take on a GPU server; everything is put back
    afterwards. Only construction-time decisions are asked: no kernel runs."""
    from vllm.config import VllmConfig, set_current_vllm_config  # optional: the vllm extra
    from vllm.distributed import parallel_state  # optional: the vllm extra
    from vllm.model_executor.layers.quantization import (
        get_quantization_config,  # optional: the vllm extra
    )
    from vllm.platforms import current_platform  # optional: the vllm extra
    from vllm.platforms.interface import (  # optional: the vllm extra
        DeviceCapability,
        PlatformEnum,
    )

    get_quantization_config("gptq")  # imports every method's module while the platform is still the real one
    fake = {"_enum": PlatformEnum.CUDA, "device_type": "cuda", "device_name": "cuda",
            "get_device_capability": lambda device_id=0: DeviceCapability(*capability),
            # a classmethod on the platform's class reading the class's own get_device_capability: faked beside it
            # (the NVFP4 kernels ask it)
            "has_device_capability": lambda wanted, device_id=0: (
                capability >= tuple(wanted) if isinstance(wanted, tuple)
                else DeviceCapability(*capability).to_int() >= wanted),
            # CUDA's rule (``CudaPlatformBase.supports_fp8``): FP8 from sm_89. Triton's FP8 MoE kernels ask it; left
            # to the CPU platform's False, every FP8 MoE layer a Triton kernel alone can run looked refused
            "supports_fp8": lambda: capability >= (8, 9)}
    saved = {k: current_platform.__dict__[k] for k in fake if k in current_platform.__dict__}
    groups = ("_TP", "_DP", "_PCP", "_EP")
    saved_groups = {g: getattr(parallel_state, g) for g in groups}
    saved_ops = _fake_cutlass_queries()
    current_platform.__dict__.update(fake)
    one = types.SimpleNamespace(world_size=1, rank_in_group=0, device_group=types.SimpleNamespace(size=lambda: 1))
    for g in groups[1:]:
        setattr(parallel_state, g, getattr(parallel_state, g) or one)
    # device: where vLLM's MoeWNA16 loader moves a tensor first (the meta device: inspect loads empty tensors)
    parallel_state._TP = types.SimpleNamespace(world_size=tp, rank_in_group=0, device=torch.device("meta"))
    try:
        # a default engine config for the block: FP8's linear methods read the model's dtype from it and build
        # vLLM's QuantFP8 op, which reads the rest
        engine = VllmConfig()
        object.__setattr__(engine, "model_config", types.SimpleNamespace(dtype=torch.bfloat16, hf_text_config=None))
        with set_current_vllm_config(engine):
            yield
    finally:
        for key, value in saved_ops.items():
            owner, name = key if isinstance(key, tuple) else (_custom_ops(), key)
            setattr(owner, name, value)
        for g, group in saved_groups.items():
            setattr(parallel_state, g, group)
        for k in fake:
            current_platform.__dict__.pop(k, None)
        current_platform.__dict__.update(saved)


def _custom_ops():
    return importlib.import_module("vllm._custom_ops")


def _fake_cutlass_queries() -> dict:
    """FP8 and NVFP4 (W4A4) kernel choice asks vLLM's compiled CUDA ops whether CUTLASS runs FP8 (per-tensor /
    per-token, and 128x128 blocks) or FP4 on the device; a CPU build has no such ops. Where they are missing, answer
    as a CUDA 12.8+ build of vLLM 0.33 does (FP8 from sm_89, blocks from sm_90, FP4 from sm_100: a COPY of its build
    rules). -> what was replaced."""
    ops = _custom_ops()
    if hasattr(torch.ops._C, "cutlass_scaled_mm_supports_fp8"):
        return {}
    saved = {k: ops.__dict__[k] for k in ("cutlass_scaled_mm_supports_fp8", "cutlass_scaled_mm_supports_block_fp8")}
    ops.cutlass_scaled_mm_supports_fp8 = lambda capability: capability >= 89
    ops.cutlass_scaled_mm_supports_block_fp8 = lambda capability: capability >= 90
    # NVFP4's query is imported by name into nvfp4_utils: replaced there
    fp4 = importlib.import_module("vllm.model_executor.layers.quantization.utils.nvfp4_utils")
    saved[(fp4, "cutlass_scaled_mm_supports_fp4")] = fp4.__dict__["cutlass_scaled_mm_supports_fp4"]
    fp4.cutlass_scaled_mm_supports_fp4 = lambda capability: capability >= 100
    return saved


def vllm_model_classes(model_type: str) -> tuple[type, type]:
    """vLLM's multimodal model class and the language-model class it builds inside."""
    outer_mod, outer, inner_mod, inner = VLLM_MODELS[model_type]
    load = lambda mod, name: getattr(importlib.import_module(f"vllm.model_executor.models.{mod}"), name)  # noqa: E731
    return load(outer_mod, outer), load(inner_mod, inner)


def vllm_quant_config(folder: pathlib.Path, model_type: str, classes: tuple[type, ...] | None = None):
    """What vLLM's loader makes of the checkpoint's ``quantization_config``: its override chain picks the method
    (``ModelConfig._verify_quantization``), ``get_quant_config`` builds it (``from_config``), ``maybe_update_config``
    reads the checkpoint, and the model classes apply their name mappers and fused-module lists as vLLM's loader
    does (``configure_quant_config`` for the top class, ``SupportsQuant`` for the classes built inside).
    ``classes``: the top class and those built inside, when vLLM builds others than the family's model from the
    checkpoint (Qwen3.5's MTP drafter, ``Qwen3_5MTP``). -> (method name, vLLM's quantization config object).
    Raises what vLLM raises (a refused config)."""
    from transformers import AutoConfig
    from vllm.config.model import ModelConfig  # optional: the vllm extra
    from vllm.model_executor.model_loader.utils import (
        configure_quant_config,  # optional: the vllm extra
    )
    from vllm.model_executor.model_loader.weight_utils import (
        get_quant_config,  # optional: the vllm extra
    )
    from vllm.model_executor.models.interfaces import (
        SupportsQuant,  # optional: the vllm extra
    )

    hf = AutoConfig.from_pretrained(folder)
    text = getattr(hf, "text_config", hf)
    arch = types.SimpleNamespace(quantization_config=hf.quantization_config,
                                 total_num_attention_heads=text.num_attention_heads,
                                 total_num_kv_heads=text.num_key_value_heads)
    model_config = types.SimpleNamespace(quantization=None, quantization_config=None, hf_config=hf, hf_overrides={},
                                         allow_deprecated_quantization=False, model_arch_config=arch)
    ModelConfig._verify_quantization(model_config)
    quant = get_quant_config(model_config, None)
    quant.maybe_update_config(str(folder), hf_config=hf)
    classes = classes or vllm_model_classes(model_type)
    outer = classes[0]
    for cls in classes:
        if issubclass(cls, SupportsQuant):  # what SupportsQuant.__new__ does when vLLM builds the class
            view = types.SimpleNamespace(quant_config=quant, hf_to_vllm_mapper=cls.hf_to_vllm_mapper,
                                         packed_modules_mapping=getattr(cls, "packed_modules_mapping", None))
            SupportsQuant._maybe_apply_model_mapping(view)
        elif cls is outer:
            configure_quant_config(quant, cls)
            quant.packed_modules_mapping = dict(quant.packed_modules_mapping)  # later updates stay off vLLM's class
    return model_config.quantization, quant


def checkpoint_linears(folder: pathlib.Path) -> dict[str, tuple[int, int]]:
    """Runtime name -> (in, out) of every nn.Linear of the model transformers builds from config.json (on the meta
    device: no memory, no weights), with an MoE layer's experts as one linear each, named as the checkpoint stores
    them (``mlp.experts.5.up_proj``); lm_head and the family's ``kept`` linears (routers: vLLM builds them without a
    quantization config) excepted."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(folder)
    family = family_for(config.model_type).bind(config)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    unfuse_experts(model, family)
    kept = tuple(f".{name}" for name in family.kept)
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name != "lm_head"
            and not (family.is_layer_key(name) and name.endswith(kept))}


def vllm_names(linears: dict, family: ModelFamily, outer, quant) -> dict[str, list[str]]:
    """vLLM's module name -> the runtime names of its shards: checkpoint names through the model's
    ``hf_to_vllm_mapper``, then q/k/v and gate/up fused as ``packed_modules_mapping`` says or, in the decoder layers,
    as the family's ``fused`` says vLLM's model builds them (Qwen3-VL-MoE's dense MLP is one ``gate_up_proj``,
    though its quantization config is never told so), and each expert's linears into its layer's MoE layer
    (``...mlp.experts``) as vLLM's expert mapping (``RoutedExperts.build_expert_params_mapping``) reads their
    checkpoint names."""
    mapper = outer.hf_to_vllm_mapper.get_rename_mapper()
    fused_of = {shard: fused for fused, shards in quant.packed_modules_mapping.items() for shard in shards}
    experts = _expert_mapping(family)
    out: dict[str, list[str]] = {}
    for name in linears:
        vname = mapper.apply_list([family.to_disk(name + ".")[:-1]])[0]
        expert = next((w for _, w in experts if w in vname + "."), None) if family.is_layer_key(name) else None
        if expert is not None:  # "experts.5.up_proj." -> the MoE layer "...mlp.experts"
            out.setdefault(vname[: (vname + ".").index(expert)] + "experts", []).append(name)
            continue
        head, leaf = vname.rsplit(".", 1)
        out.setdefault(f"{head}.{fused_of.get(leaf) or _built_fused(family, name) or leaf}", []).append(name)
    return out


def _built_fused(family: ModelFamily, name: str) -> str | None:
    """The leaf name of the fused layer vLLM's model builds the decoder linear ``name`` into (the family's
    ``fused``: ``gate_up_proj`` for ``...layers.1.mlp.gate_proj``); None outside the decoder layers or unfused."""
    if not family.is_layer_key(name):
        return None
    index, _, inside = name[len(family.decoder_layers) + 1:].partition(".")
    fused = family.at(int(index)).fused_name(inside)
    return fused.rsplit(".", 1)[-1] if fused else None


def _expert_mapping(family: ModelFamily) -> list[tuple[str, str]]:
    """vLLM's MoE layer's own mapping from the per-expert checkpoint names it loads to its parameters:
    [("experts.w13_", "experts.5.up_proj."), ...]; [] for a family without experts."""
    if not family.experts:
        return []
    from vllm.model_executor.layers.fused_moe.routed_experts import (
        RoutedExperts,  # optional: the vllm extra
    )

    gate, up, down = family.expert_linears
    return [(param, weight) for param, weight, _, _ in RoutedExperts.build_expert_params_mapping(gate, down, up,
                                                                                              family.expert_count)]


def is_moe_layer(vname: str, family: ModelFamily) -> bool:
    """Whether the vLLM module ``vname`` is an MoE layer's experts (one FusedMoE layer of every expert)."""
    return bool(family.experts) and vname.endswith("." + family.experts.rsplit(".", 1)[-1]) and \
        ".layers." in vname and not vname.startswith("visual")


def build_vllm_experts(shards: list[str], linears: dict, family: ModelFamily, quant, vname: str, dtype,
                       device: str = "meta"):
    """One MoE layer's experts as vLLM builds them (``FusedMoEFactory``: its quant method chosen and its
    ``create_weights`` run), at the tensor-parallel size ``pretend_gpu`` set. -> vLLM's MoE runner (its
    ``routed_experts`` holds the method and the parameters)."""
    from vllm.model_executor.layers.fused_moe.layer import (
        FusedMoEFactory,  # optional: the vllm extra
    )

    gate = next(s for s in shards if s.endswith("." + family.expert_linears[0]))
    hidden, intermediate = linears[gate]
    with torch.device(device):
        return FusedMoEFactory(num_experts=len(shards) // len(family.expert_linears), top_k=family.routed,
                               hidden_size=hidden, intermediate_size=intermediate, params_dtype=dtype,
                               quant_config=quant, prefix=vname)


def vllm_decisions(quant, names: dict[str, list[str]], linears: dict,
                   family: ModelFamily | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """vLLM module name -> the method vLLM's ``get_quant_method`` gives it (with the compressed-tensors scheme; an
    MoE layer's, built by ``build_vllm_experts``), and -> the weight setting it builds it with (``vllm_setting``),
    at tensor-parallel 1."""
    from vllm.model_executor.layers.linear import (
        ReplicatedLinear,  # optional: the vllm extra
    )

    out, settings = {}, {}
    for vname, shards in names.items():
        if family is not None and is_moe_layer(vname, family):
            runner = build_vllm_experts(shards, linears, family, quant, vname, torch.bfloat16)
            method = runner.routed_experts.quant_method
            out[vname], settings[vname] = type(method).__name__, vllm_setting(method, None)
            continue
        stub = ReplicatedLinear.__new__(ReplicatedLinear)  # a LinearBase with its sizes: what the decision reads
        torch.nn.Module.__init__(stub)
        stub.input_size = stub.input_size_per_partition = linears[shards[0]][0]
        stub.output_size = stub.output_size_per_partition = sum(linears[s][1] for s in shards)
        method = quant.get_quant_method(stub, vname)
        scheme = getattr(stub, "scheme", None)
        out[vname] = type(method).__name__ + (f"({type(scheme).__name__})" if scheme is not None else "")
        settings[vname] = vllm_setting(method, scheme)
    return out, settings


def vllm_setting(method, scheme) -> str:
    """The weight setting vLLM built a linear with, from its own objects: "W8 g128 sym" (as ``describe_spec``
    writes qvlquant's), "not quantized", or, for a method of no integer weight setting (FP8, INT8 W8A8, NVFP4: its
    method's name says it), "not an integer setting"."""
    if scheme is not None and hasattr(scheme, "num_bits"):  # compressed-tensors WNA16
        bits, group, sym = scheme.num_bits, scheme.group_size, scheme.symmetric
    elif hasattr(method, "num_bits") and hasattr(method, "symmetric"):  # compressed-tensors WNA16 MoE
        bits, group, sym = method.num_bits, method.group_size, method.symmetric
    elif hasattr(getattr(method, "quant_config", None), "weight_bits"):  # GPTQ, AWQ (MoeWNA16: its has_zp)
        config = method.quant_config
        bits, group = config.weight_bits, config.group_size
        sym = getattr(config, "is_sym", not getattr(config, "zero_point", getattr(config, "has_zp", False)))
    elif type(method).__name__.startswith("Unquantized"):
        return "not quantized"
    else:
        return "not an integer setting"
    return describe_spec(QuantSpec(bits, group, sym))


def build_vllm_layer(shards: list[tuple[int, int]], kind: str, heads: tuple[int, int, int], quant, vname: str, dtype):
    """One vLLM parallel linear of the first decoder layer, built the way vLLM's model builds it (its
    ``create_weights`` choosing the kernel), at the tensor-parallel size ``pretend_gpu`` set."""
    from vllm.model_executor.layers import linear  # optional: the vllm extra

    k = shards[0][0]
    with torch.device("meta"):
        if kind == "qkv":
            if heads is None:
                raise ValueError("config.json has no num_attention_heads / num_key_value_heads to build it from")
            num_heads, num_kv, head_dim = heads
            return linear.QKVParallelLinear(k, head_dim, num_heads, num_kv, False, params_dtype=dtype,
                                            quant_config=quant, prefix=vname)
        if kind == "row":
            return linear.RowParallelLinear(k, shards[0][1], False, params_dtype=dtype, quant_config=quant, prefix=vname)
        return linear.MergedColumnParallelLinear(k, [n for _, n in shards], False, params_dtype=dtype,
                                                 quant_config=quant, prefix=vname)


def shape_mismatches(layer, disk_module: str, header: dict) -> list[str]:
    """The tensors of ``disk_module`` in the checkpoint whose shape is not the one vLLM's ``create_weights``
    allocated to load it into (a packing vLLM reads differently; vLLM's loader would fail on them)."""
    out = []
    for pname, param in layer.named_parameters():
        key = f"{disk_module}.{pname}"
        if key in header and tuple(param.shape) != tuple(header[key][0]):
            out.append(f"{key}: vLLM allocates {tuple(param.shape)}, the checkpoint holds {tuple(header[key][0])}")
    return out


def fused_load_problems(layer, kind: str, disk_modules: list[str], header: dict) -> list[str]:
    """The checkpoint tensors of a fused layer's parts (``disk_modules``, in vLLM's shard order) as vLLM's own
    weight loaders put them into the parameters ``create_weights`` allocated, on the meta device (shapes and
    offsets only, no data): what fails, named (e.g. block-FP8 scales of parts that are not whole blocks of rows, which
    vLLM 0.33 offsets past the end of the fused scale)."""
    out = []
    for i, disk in enumerate(disk_modules):
        shard = "qkv"[i] if kind == "qkv" else i
        for pname, param in layer.named_parameters():
            key = f"{disk}.{pname}"
            loader = getattr(param, "weight_loader", None)
            if key not in header or loader is None:
                continue
            try:
                loader(param, torch.empty(tuple(header[key][0]), dtype=param.dtype, device="meta"), shard)
            except (RuntimeError, ValueError, AssertionError, IndexError) as e:
                out.append(f"{key}: vLLM's loader failed: {type(e).__name__}: {e}")
    return out


def vllm_tensor_parallel(quant, names: dict, linears: dict, family: ModelFamily, config: dict,
                         header: dict, settings: dict | None = None) -> tuple[dict, dict]:
    """For each TP size: the problems vLLM raises building the first decoder layer's linears (and MoE layer), and
    the kernel it picks for each; at TP 1 also the checkpoint tensors of its unfused linears whose shapes differ
    from what vLLM allocates, and at every TP size the MoE layer's checkpoint tensors as vLLM's own loader puts them
    into its parameters (``moe_load_problems``) and the setting it builds it with against ``settings`` (TP 1's).
    -> ({tp: [problem]}, {tp: {vLLM name: kernel}})."""
    text = config.get("text_config") or config
    heads = (text["num_attention_heads"], text["num_key_value_heads"],
             text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]) \
        if "num_attention_heads" in text else None  # without them vLLM cannot build qkv_proj: a problem below
    dtype = torch.float16 if (config.get("dtype") or config.get("torch_dtype")) == "float16" else torch.bfloat16
    # the first decoder layer of each type (hybrid models: a DeltaNet and a full-attention layer)
    firsts = [f"{family.decoder_layers}.{i}." for i in (family.first_layers() or {0: None})]
    layer0 = {v: s for v, s in names.items() if s[0].startswith(tuple(firsts))}
    ours = read_quantization_config(config["quantization_config"], "config.json")
    problems, kernels = {}, {}
    for tp in TP_SIZES:
        problems[tp], kernels[tp] = [], {}
        with pretend_gpu(tp):
            for vname, shards in layer0.items():
                if is_moe_layer(vname, family):
                    problems[tp] += _moe_layer_problems(quant, vname, shards, linears, family, dtype, header, tp,
                                                        (settings or {}).get(vname), kernels[tp])
                    continue
                first = next(f for f in firsts if shards[0].startswith(f))
                leaf = shards[0][len(first):]
                kind = "qkv" if vname.endswith("qkv_proj") else "row" if leaf in family.row_parallel else "column"
                try:
                    layer = build_vllm_layer([linears[s] for s in shards], kind, heads, quant, vname, dtype)
                except (ValueError, AssertionError, NotImplementedError) as e:
                    problems[tp].append(f"{vname}: {type(e).__name__}: {e}")
                    continue
                if tp == 1 and len(shards) == 1:
                    problems[tp] += shape_mismatches(layer, family.to_disk(shards[0] + ".")[:-1], header)
                elif tp == 1:
                    problems[tp] += fused_load_problems(layer, kind, [family.to_disk(s + ".")[:-1] for s in shards],
                                                        header)
                k, spec = linears[shards[0]][0], ours.spec_for(shards[0])
                group = spec.group_size if spec is not None else -1
                if kind == "row" and group > 0 and (k // tp) % group:  # vLLM's GPTQ path builds it (0.33)
                    problems[tp].append(f"{vname}: its input shard of {k // tp} columns at tp={tp} splits a "
                                        f"quantization group of {group}; vLLM's AWQ and compressed-tensors refuse "
                                        "that, its GPTQ builds the layer but would read shifted scales "
                                        "[qvlquant's check, not vLLM's]")
                kernel = _kernel_of(layer)
                kernels[tp][vname] = type(kernel).__name__ if kernel is not None else type(layer.quant_method).__name__
    return problems, kernels


def _moe_layer_problems(quant, vname: str, shards: list[str], linears: dict, family: ModelFamily, dtype, header: dict,
                        tp: int, setting: str | None, kernels: dict) -> list[str]:
    """What building the MoE layer ``vname`` at ``tp`` raises, or else what its loader makes of the checkpoint's
    tensors and, past TP 1, a setting other than TP 1's (GPTQ's fallback to MoeWNA16 reads no ``dynamic`` rule);
    records the experts kernel vLLM picked in ``kernels``."""
    try:
        runner = build_vllm_experts(shards, linears, family, quant, vname, dtype)
    except (ValueError, AssertionError, NotImplementedError) as e:
        return [f"{vname}: {_raised(e)}"]
    method = runner.routed_experts.quant_method
    kernel = getattr(method, "experts_cls", None)
    kernels[vname] = kernel.__name__ if kernel is not None else type(method).__name__
    out = moe_load_problems(runner, vname, shards, family, quant, header)
    built = vllm_setting(method, None)
    if tp > 1 and setting is not None and built != setting:
        out.append(f"{vname}: at tp={tp} vLLM builds it {built} ({type(method).__name__}), at tp=1 {setting} "
                   "[qvlquant's check of vLLM's decision]")
    return out


def moe_load_problems(runner, vname: str, shards: list[str], family: ModelFamily, quant, header: dict) -> list[str]:
    """The MoE layer's checkpoint tensors (``header``: name -> (shape, dtype); the ones of ``shards``) given to
    vLLM's own loader (``load_weights`` of the layer, after the quantization config's checkpoint mapper, which drops
    ``g_idx``), as empty tensors on the meta device. Problems: a name its expert mapping does not know (the loader
    would drop it without a word), an error it raises, and an expert's slot of a parameter that the tensors loaded
    into it do not fill (the loader narrows its destination to a smaller tensor, for padded layers: the rest would
    stay uninitialised). A tensor the method declines (symmetric GPTQ's qzeros in MoeWNA16) is none."""
    prefix = vname + "."
    mapper = quant.get_checkpoint_weight_mapper()
    known = _expert_mapping(family)
    weights = []
    for shard in shards:
        disk = family.to_disk(shard + ".")
        vllm_shard = prefix + shard[len(family.decoder_layers):].split(".", 2)[2][len(family.experts) + 1:] + "."
        weights += [(vllm_shard + key[len(disk):], key, header[key]) for key in header if key.startswith(disk)]
    out = []
    filled: dict[tuple[str, int], list] = {}  # (vLLM parameter, expert) -> [values copied in, a checkpoint key]
    for name, key, (shape, dtype) in weights:
        mapped = mapper.apply_list([name])
        if not mapped:
            continue  # dropped by vLLM's checkpoint mapper (g_idx)
        relative = mapped[0][len(prefix):]  # "5.up_proj.qweight"
        entry = next(((param, w) for param, w in known if w in "experts." + relative), None)
        if entry is None:
            out.append(f"{key}: vLLM's expert mapping has no entry for it; its loader would drop it")
            continue
        param = entry[0].rsplit(".", 1)[-1] + ("experts." + relative).split(entry[1], 1)[1]  # "w13_" + "qweight"
        tensor = torch.empty(shape, dtype=DTYPES.get(dtype, torch.float32), device="meta")
        if math.prod(shape) == 1:  # a per-tensor scale: its loader compares values (static FP8's input scales)
            tensor = _values_for(runner.routed_experts, param, tensor)
        with _CopiedValues() as copies:
            try:
                list(runner.load_weights([(relative, tensor)]))
            except (ValueError, AssertionError, AttributeError, RuntimeError, IndexError) as e:
                out.append(f"{key}: vLLM's loader: {_raised(e)}")
                continue
        if copies.values:
            slot = filled.setdefault((param, int(relative.split(".", 1)[0])), [0, key])
            slot[0] += copies.values
    for (param, e), (values, key) in filled.items():
        target = getattr(runner.routed_experts, param, None)
        if target is not None and values != target[e].numel():
            out.append(f"{key}: vLLM's loader fills {values} of the {target[e].numel()} values of expert {e}'s "
                       f"{param} (shape {tuple(target.shape[1:])}) from the checkpoint; the rest stays uninitialised")
    return out


def _values_for(experts, param: str, tensor):
    """A per-tensor scale as ones on the CPU, and the MoE layer's parameter it loads into (one value per expert, or
    two: gate's and up's) moved there holding ones: vLLM's loader reads such a parameter's value (compressed-tensors'
    input scales: gate's and up's must be equal, ``FusedMoE.weight_loader``), which meta tensors have none of. The
    values are no checkpoint's (inspect reads headers only); vLLM's own loader, given the real tensors, compares
    those (the conformance tests)."""
    target = getattr(experts, param, None)
    if target is not None and target.is_meta:
        moved = torch.nn.Parameter(torch.ones(target.shape, dtype=target.dtype), requires_grad=False)
        moved.__dict__.update(target.__dict__)  # vLLM's weight_loader and quant_method attributes
        setattr(experts, param, moved)
    return torch.ones(tensor.shape, dtype=tensor.dtype)


class _CopiedValues(torch.overrides.TorchFunctionMode):
    """While active: how many values the ``Tensor.copy_`` calls wrote (``values``; vLLM's loader writes a
    parameter's slot with ``copy_`` into a view of it)."""

    def __init__(self):
        super().__init__()
        self.values = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_:
            self.values += args[0].numel()
        return func(*args, **(kwargs or {}))


def _raised(e: BaseException) -> str:
    """``ValueError: message``; for an assertion without a message, the assert's own source line in vLLM."""
    if str(e) or not e.__traceback__:
        return f"{type(e).__name__}: {e}"
    import traceback

    frame = traceback.extract_tb(e.__traceback__)[-1]
    where = frame.filename.split("site-packages/")[-1]
    return f"{type(e).__name__}: {frame.line} ({where}:{frame.lineno})"


def _kernel_of(layer):
    """The kernel object vLLM's ``create_weights`` chose for ``layer`` (integer formats: ``kernel``; FP8:
    ``fp8_linear``), on its linear method or its compressed-tensors scheme; None when it keeps none."""
    for owner in (layer.quant_method, getattr(layer, "scheme", None)):
        for name in ("kernel", "fp8_linear"):
            if getattr(owner, name, None) is not None:
                return getattr(owner, name)
    return None


def ask_vllm(folder: pathlib.Path, config: dict, family: ModelFamily) -> dict:
    """vLLM's own answer for the export (see ``vllm_quant_config``, ``vllm_decisions``, ``vllm_tensor_parallel``)."""
    version = vllm_installed()
    report = {"checked_by": f"vLLM {version}'s own quantization classes (GPU sm_{VLLM_CAPABILITY[0]}{VLLM_CAPABILITY[1]} "
                            "and tensor-parallel groups faked; no GPU, no kernel run)",
              "method": None, "refused": None, "layers": {}, "settings": {}, "vision_quantized": [], "tp": {},
              "kernels": {}}
    linears = checkpoint_linears(folder)
    try:
        with pretend_gpu(1):
            report["method"], quant = vllm_quant_config(folder, config["model_type"])
            outer, _ = vllm_model_classes(config["model_type"])
            names = vllm_names(linears, family, outer, quant)
            report["layers"], report["settings"] = vllm_decisions(quant, names, linears, family)
    except (ValueError, AssertionError, KeyError, NotImplementedError) as e:
        report["refused"] = f"{type(e).__name__}: {e}"
        report["tp"] = {tp: [f"vLLM {version} refuses the config: {e}"] for tp in TP_SIZES}
        return report
    report["vision_quantized"] = sorted(v for v, shards in names.items()
                                        if shards[0].startswith(family.vision_tower + ".")
                                        and report["layers"][v] != "UnquantizedLinearMethod")
    report["tp"], report["kernels"] = vllm_tensor_parallel(quant, names, linears, family, config,
                                                           read_checkpoint_header(folder), report["settings"])
    ours = read_quantization_config(config["quantization_config"], str(folder / "config.json"))
    # the integer layouts' per-module widths (FP8, INT8 W8A8 and NVFP4 exports hold one setting, checked by the
    # methods vLLM names)
    one_setting = ours.method == "fp8" or ours.summary().get("weights") in ("fp8_e4m3", "int8_w8a8", "nvfp4_e2m1")
    misread = [] if one_setting else setting_mismatches(report["settings"], names, ours, family)
    report["tp"] = {tp: misread + problems for tp, problems in report["tp"].items()}
    return report


def setting_mismatches(settings: dict[str, str], names: dict[str, list[str]], quant: CheckpointQuant,
                       family: ModelFamily) -> list[str]:
    """The decoder-layer linears vLLM builds with another setting than the one the checkpoint holds them in
    (``CheckpointQuant.spec_for`` of each shard): vLLM would refuse their tensors or read them wrongly."""
    out = []
    for vname, shards in names.items():
        wrong = [s for s in shards if family.is_layer_key(s) and settings[vname] != describe_spec(quant.spec_for(s))]
        if len(wrong) > 4:  # an MoE layer: one line
            out.append(f"{vname}: vLLM builds it {settings[vname]}, the checkpoint holds {len(wrong)} of its "
                       f"{len(shards)} linears otherwise (first {wrong[0]} {describe_spec(quant.spec_for(wrong[0]))}) "
                       "[qvlquant's check of vLLM's decision]")
            continue
        for shard in wrong:
            out.append(f"{vname}: vLLM builds it {settings[vname]}, the checkpoint holds {shard} "
                       f"{describe_spec(quant.spec_for(shard))} [qvlquant's check of vLLM's decision]")
    return out


def vllm_problems(vllm: dict, tp: int) -> list[str]:
    """Every reason vLLM would refuse or mis-load the export at tensor-parallel ``tp`` (who said so is the report's
    ``checked_by``, stated once)."""
    quantized = vllm["vision_quantized"]
    vision = [f"vLLM would build {len(quantized)} vision linears (e.g. {quantized[0]}) as quantized while the "
              "checkpoint holds them in full precision"] if quantized else []
    return vision + vllm["tp"][tp]
