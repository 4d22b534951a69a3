"""Where NVFP4 W4A4 loses perplexity on an embedded model: the float model with NVFP4 emulated in place, one part at a
time, each scored by held-out perplexity (the eval's).

    python benchmarks/diagnose_nvfp4.py [--model testbed] [--seeds 0,1,2] [--num-samples 64] [--threads 1]
        [--json benchmarks/results/nvfp4_diagnosis_testbed.json]

Rows: the weights alone (NVFP4A16's numerics), weights and activations (W4A4 as served: e2m1 activations per 16
inputs under the calibrated ``input_global_scale``, ``quant.nvfp4.fake_quantize_activations``), the activations
alone, the activations alone with each group's scale kept in float32 (no e4m3 rounding, no global scale: what is
left is e2m1's own resolution), then the activations of one linear type, and of one decoder layer, at a time. The
weights are rounded as the export rounds them (one global scale per fused q/k/v and gate/up); the activation scales
come from each seed's draw of ``--num-samples`` demo samples (``engine.calibration.input_ranges``, the export's
pass, without smoothing). Each cell: mean and sample standard deviation over the seeds; rows without activation
quantization do not depend on the draw.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import bench_methods


class Emulated(torch.nn.Module):
    """A linear whose input goes through NVFP4 activations first: ``scales`` "served" (e4m3 group scales under the
    global scale ``gscale``), "float" (float32 group scales), or None (the input as it is)."""

    def __init__(self, linear: torch.nn.Linear, gscale: torch.Tensor, scales: str | None):
        super().__init__()
        self.linear, self.gscale, self.scales = linear, gscale, scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from qvlquant.quant import nvfp4

        if self.scales == "served":
            x = nvfp4.fake_quantize_activations(x, self.gscale)
        elif self.scales == "float":
            k = x.shape[-1]
            groups = x.float().reshape(-1, k // nvfp4.GROUP, nvfp4.GROUP)
            scale = groups.abs().amax(-1, keepdim=True) / nvfp4.E2M1_MAX  # [T, K/16, 1]
            step = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
            codes = nvfp4.round_to_e2m1((groups * step).clamp(-nvfp4.E2M1_MAX, nvfp4.E2M1_MAX))
            x = (nvfp4.e2m1_values(codes) * scale).reshape(x.shape).to(x.dtype)
        return self.linear(x)


def emulate(base, family, amax: dict[str, float], weights: bool, acts) -> torch.nn.Module:
    """A copy of ``base`` with its decoder linears' weights through NVFP4 (``weights``) and the inputs of those
    ``acts(index, name)`` says through NVFP4 activations ("served" / "float" / None)."""
    from qvlquant.checkpoint.datafree import fused_siblings, quantized_linears
    from qvlquant.quant import nvfp4

    model = copy.deepcopy(base)
    names = quantized_linears(model, family)
    wmax = {n: nvfp4.weight_amax(model.get_submodule(n).weight.data) for n in names}
    for name in names:
        siblings = [s[: -len(".weight")] for s in fused_siblings(family, name + ".weight")]
        linear = model.get_submodule(name)
        if weights:
            codes, scale, gscale = nvfp4.quantize(linear.weight.data.float(),
                                                  nvfp4.global_scale(max(wmax[s] for s in siblings)))
            linear.weight.data = nvfp4.dequantize(codes, scale, gscale).to(linear.weight.dtype)
        index, inside = name[len(family.decoder_layers) + 1:].split(".", 1)
        parent, leaf = name.rsplit(".", 1)
        gscale = nvfp4.global_scale(max(amax[s] for s in siblings))
        setattr(model.get_submodule(parent), leaf, Emulated(linear, gscale, acts(int(index), inside)))
    return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="testbed")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("QVLQUANT_QUIET", "1")
    torch.set_num_threads(args.threads)
    import qvlquant
    from qvlquant.assets.paths import DATA_DIR
    from qvlquant.checkpoint.datafree import quantized_linears
    from qvlquant.engine.calibration import input_ranges
    from qvlquant.eval.perplexity import perplexity, token_stream
    from qvlquant.families import family_for

    t0 = time.time()
    out = args.json or pathlib.Path(f"benchmarks/results/nvfp4_diagnosis_{args.model}.json")
    base, processor = qvlquant.load(args.model)
    family = family_for(base.config.model_type)
    stream = token_stream(processor.tokenizer, (DATA_DIR / "heldout.txt").read_text(encoding="utf-8").splitlines())
    bf16 = perplexity(base, stream)
    layers = len(base.get_submodule(family.decoder_layers))
    kinds = list(dict.fromkeys(n for group in family.linear_groups for n in group))
    rows = {"weights only (NVFP4A16)": (True, lambda i, n: None),
            "weights and activations (W4A4, served)": (True, lambda i, n: "served"),
            "activations only": (False, lambda i, n: "served"),
            "activations only, float32 group scales": (False, lambda i, n: "float"),
            **{f"activations of {k} only": (False, lambda i, n, k=k: "served" if n == k else None) for k in kinds},
            **{f"activations of layer {j} only": (False, lambda i, n, j=j: "served" if i == j else None)
               for j in range(layers)}}
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[float]] = {name: [] for name in rows}
    for seed in seeds:
        batches = bench_methods.calibration(processor, args.num_samples, seed)
        amax = input_ranges(base, batches, family, quantized_linears(base, family)).amax
        for name, (weights, acts) in rows.items():
            results[name].append(perplexity(emulate(base, family, amax, weights, acts), stream))
            print(f"[{time.time() - t0:5.0f}s] seed {seed} {name}: {results[name][-1]:.3f}", flush=True)
    table = {name: {"perplexity": v, "mean": statistics.mean(v),
                    "sd": statistics.stdev(v) if len(v) > 1 else 0.0,
                    "increase_pct": 100 * (statistics.mean(v) / bf16 - 1)} for name, v in results.items()}
    doc = {"meta": {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s)",
                    "torch": torch.__version__, "args": vars(args) | {"json": str(out)},
                    "seconds": round(time.time() - t0, 1), "load_average_end": os.getloadavg()},
           "bf16_perplexity": bf16, "rows": table}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    for name, row in table.items():
        print(f"{name:45s} {row['mean']:.3f} ± {row['sd']:.3f} ({row['increase_pct']:+.2f} %)")


if __name__ == "__main__":
    main()
