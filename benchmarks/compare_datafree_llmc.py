"""qvlquant's data-free exports against llm-compressor's own presets on the same model, tensor by tensor: FP8_DYNAMIC,
W8A8 (int8, round-to-nearest, no SmoothQuant) and NVFP4A16.

    bash benchmarks/peers/setup_venvs.sh                       # once: /work/peers/llmc
    python benchmarks/compare_datafree_llmc.py [--model testbed] [--schemes FP8_DYNAMIC,W8A8,NVFP4A16] \\
        [--json benchmarks/results/datafree_llmc_testbed.json]

For each scheme, ``qvlquant quantize --scheme S`` (this venv) and llm-compressor 0.14's ``QuantizationModifier(
scheme=S)`` with no calibration (benchmarks/peers/run_llmcompressor.py, its venv, the model loaded in bf16 as
the checkpoint stores it) quantize the same folder; every
tensor of both compressed checkpoints is then compared under its key: the quantized linears' stored codes and
scales, and everything else (the vision tower, norms, embeddings) copied. A data-free scheme has no calibration to
differ by, so the two tools should agree to rounding: reported per scheme are the tensors that are bit-identical, and
for those that are not, how many elements differ and by how much -- codes in steps of the format's grid (FP8 and FP4
codes compared as the values they stand for, divided by the local grid spacing), scales relatively. Keys only one tool
wrote, and the config each wrote, are reported too. Not in CI: it needs the llm-compressor venv.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors import safe_open

HERE = pathlib.Path(__file__).resolve().parent
SCHEMES = ("FP8_DYNAMIC", "W8A8", "NVFP4A16")
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def read_all(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (a safe_open handle)
    return out


def fp4_codes_to_values(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2], two e2m1 codes a byte (low nibble first) -> their values [N, K]."""
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1).long()
    sign = torch.where(codes & 0x8 != 0, -1.0, 1.0)
    return sign * FP4_VALUES[codes & 0x7]


def grid_steps(a: torch.Tensor, b: torch.Tensor, key: str) -> torch.Tensor:
    """|a - b| of two stored code tensors in steps of their grid (1 for int8; for float codes, the spacing of the
    grid at the larger magnitude)."""
    if key.endswith("weight_packed"):  # NVFP4: e2m1 codes, spacing 0.5 below 2, 1 below 4, 2 above
        va, vb = fp4_codes_to_values(a), fp4_codes_to_values(b)
        big = torch.maximum(va.abs(), vb.abs())
        spacing = torch.where(big <= 2, 0.5, torch.where(big <= 4, 1.0, 2.0))
        return (va - vb).abs() / spacing
    if a.dtype == torch.float8_e4m3fn:
        va, vb = a.float(), b.float()
        big = torch.maximum(va.abs(), vb.abs()).clamp_min(2.0**-6)
        spacing = 2.0 ** (torch.floor(torch.log2(big)) - 3)  # e4m3: 3 mantissa bits
        return (va - vb).abs() / spacing
    return (a.long() - b.long()).abs().float()


def dequantize(t: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """One linear of a float-quantized / int-quantized / nvfp4-pack-quantized checkpoint -> W [N, K] float64; None
    for a tensor that is no quantized linear."""
    if f"{name}.weight_packed" in t:  # NVFP4: e2m1 values x FP8 block scale (16 columns) / global scale
        values = fp4_codes_to_values(t[f"{name}.weight_packed"]).double()
        scale = t[f"{name}.weight_scale"].double().repeat_interleave(16, dim=1)
        return values * scale / t[f"{name}.weight_global_scale"].double()
    w, scale = t.get(f"{name}.weight"), t.get(f"{name}.weight_scale")
    if w is None or scale is None:
        return None
    return w.double() * scale.double()


def weight_error(ours: dict, theirs: dict, base: dict) -> dict:
    """Each tool's ||W_q - W||^2 summed over the quantized linears, against the input's weights (float64): which
    tool's rounding lands nearer the weights it was given."""
    names = sorted({k.rsplit(".", 1)[0] for k in ours if k.endswith(("weight_scale",))})
    sums = {"qvlquant": 0.0, "llmcompressor": 0.0}
    for name in names:
        w = base[f"{name}.weight"].double()
        for tool, t in (("qvlquant", ours), ("llmcompressor", theirs)):
            q = dequantize(t, name)
            sums[tool] += float(((q - w) ** 2).sum())
    norm = sum(float((base[f"{n}.weight"].double() ** 2).sum()) for n in names)
    return {"linears": len(names), **{f"relative_error_{k}": (v / norm) ** 0.5 for k, v in sums.items()}}


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict:
    only_ours, only_theirs = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    identical, differ = 0, {}
    for key in sorted(set(ours) & set(theirs)):
        a, b = ours[key], theirs[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            differ[key] = {"shape": [list(a.shape), list(b.shape)], "dtype": [str(a.dtype), str(b.dtype)]}
            continue
        if a.dtype == torch.float8_e4m3fn or a.dtype == torch.uint8:
            same = torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        else:
            same = torch.equal(a, b)
        if same:
            identical += 1
            continue
        is_code = key.endswith(("weight_packed", ".weight")) and a.dtype in (torch.int8, torch.float8_e4m3fn, torch.uint8)
        if is_code:
            steps = grid_steps(a, b, key)  # per value: a +0 / -0 code pair is a stored difference of no value
            differ[key] = {"elements_differing": int((steps > 0).sum()), "elements": steps.numel(),
                           "max_steps": float(steps.max()),
                           "bytes_differing": int((a.view(torch.uint8) != b.view(torch.uint8)).sum())
                           if a.dtype != torch.int8 else int((a != b).sum())}
        else:
            fa, fb = a.float(), b.float()
            rel = ((fa - fb).abs() / fb.abs().clamp_min(1e-30))
            differ[key] = {"elements_differing": int((fa != fb).sum()), "elements": fa.numel(),
                           "max_relative": float(rel.max()), "max_absolute": float((fa - fb).abs().max())}
    codes = [v for v in differ.values() if "max_steps" in v]
    return {"tensors_compared": identical + len(differ), "bit_identical": identical,
            "max_code_steps": max((v["max_steps"] for v in codes), default=0.0),
            "code_values_differing": sum(v["elements_differing"] for v in codes),
            "max_scale_relative": max((v.get("max_relative", 0.0) for k, v in differ.items() if k.endswith("scale")),
                                      default=0.0),
            "other_tensors_differing": sorted(k for k, v in differ.items() if "max_steps" not in v
                                              and not k.endswith("scale")),
            "other_max_absolute": max((v.get("max_absolute", 0.0) for k, v in differ.items() if "max_steps" not in v
                                       and not k.endswith("scale")), default=0.0),
            "differ": differ,
            "only_qvlquant": only_ours, "only_llmcompressor": only_theirs}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="testbed", help="an embedded model (testbed, demo) or a Qwen2-VL folder")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--peers-dir", type=pathlib.Path,
                    default=pathlib.Path(os.environ.get("QVLQUANT_PEERS_DIR", "/work/peers")))
    ap.add_argument("--json", default=None, help="default benchmarks/results/datafree_llmc_MODEL.json")
    args = ap.parse_args(argv)
    from qvlquant.assets.paths import EMBEDDED_MODELS

    folder = pathlib.Path(EMBEDDED_MODELS[args.model]) if args.model in EMBEDDED_MODELS else pathlib.Path(args.model)
    python = args.peers_dir / "llmc" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} is missing: run bash benchmarks/peers/setup_venvs.sh {args.peers_dir}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="datafree-llmc-") as tmp:
        for scheme in [s for s in args.schemes.split(",") if s]:
            if scheme not in SCHEMES:
                raise SystemExit(f"--schemes {scheme}: choose from {', '.join(SCHEMES)}")
            ours, theirs = pathlib.Path(tmp) / f"qvlquant-{scheme}", pathlib.Path(tmp) / f"llmc-{scheme}"
            env = dict(os.environ, OMP_NUM_THREADS="1", QVLQUANT_QUIET="1")
            subprocess.run([sys.executable, "-m", "qvlquant.cli", "quantize", "--model", args.model, "--scheme", scheme,
                            "--output", str(ours)], check=True, env=env)
            subprocess.run([str(python), str(HERE / "peers" / "run_llmcompressor.py"), "--model", str(folder),
                            "--method", scheme, "--dtype", "bfloat16", "--keep", str(theirs), "--output", str(theirs) + "-meta"],
                           check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            meta = json.loads((pathlib.Path(str(theirs) + "-meta") / "meta.json").read_text())
            a, b = read_all(ours), read_all(theirs)
            result = compare(a, b) | {"weight_error": weight_error(a, b, read_all(folder))}
            configs = [json.loads((f / "config.json").read_text())["quantization_config"] for f in (ours, theirs)]
            groups = [c.get("config_groups") for c in configs]
            row = {"scheme": scheme, "model": args.model, **result,
                   "same_config_groups": json.dumps(groups[0], sort_keys=True) == json.dumps(groups[1], sort_keys=True),
                   "config_groups": {"qvlquant": groups[0], "llmcompressor": groups[1]},
                   "ignore": {"qvlquant": configs[0].get("ignore"), "llmcompressor": configs[1].get("ignore")},
                   "llmcompressor_versions": meta["versions"]}
            rows.append(row)
            err = row["weight_error"]
            print(f"{scheme}: {row['bit_identical']}/{row['tensors_compared']} tensors bit-identical; "
                  f"relative weight error qvlquant {err['relative_error_qvlquant']:.6f}, llm-compressor "
                  f"{err['relative_error_llmcompressor']:.6f}; codes at most {row['max_code_steps']:g} grid step apart "
                  f"({row['code_values_differing']} values), scales at most {row['max_scale_relative']:.2%} apart; "
                  f"{len(row['other_tensors_differing'])} other tensors differ (at most "
                  f"{row['other_max_absolute']:.4g}); "
                  f"{len(row['differ'])} differ; only qvlquant {len(row['only_qvlquant'])}, only llm-compressor "
                  f"{len(row['only_llmcompressor'])}", flush=True)
            for p in (ours, theirs, pathlib.Path(str(theirs) + "-meta")):
                shutil.rmtree(p, ignore_errors=True)
    path = pathlib.Path(args.json or HERE / "results" / f"datafree_llmc_{args.model}.json")
    path.write_text(json.dumps({"rows": rows, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                "torch": torch.__version__}, indent=1) + "\n", encoding="utf-8")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
