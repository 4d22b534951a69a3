"""Where the shipped assets live inside the package: the demo model, the test bed, the Qwen3.5 demo beds, and the
demo's text data."""

import pathlib

ASSETS_ROOT = pathlib.Path(__file__).resolve().parent
MODEL_DIR = ASSETS_ROOT / "demo"  # the embedded demo model (built by qvlquant.tools.demo.train)
DATA_DIR = ASSETS_ROOT / "data"
TESTBED_DIR = ASSETS_ROOT / "testbed"  # the demo with outlier channels, fine-tuned (qvlquant.tools.demo.testbed)
# the demo's sizes and data in Qwen3.5's hybrid Gated DeltaNet architecture, dense and MoE (train --family qwen3_5[_moe])
QWEN3_5_DIR = ASSETS_ROOT / "demo_qwen3_5"
QWEN3_5_MOE_DIR = ASSETS_ROOT / "demo_qwen3_5_moe"
EMBEDDED_MODELS = {"demo": MODEL_DIR, "testbed": TESTBED_DIR, "demo-qwen3.5": QWEN3_5_DIR,
                   "demo-qwen3.5-moe": QWEN3_5_MOE_DIR}  # what --model demo / testbed / demo-qwen3.5[-moe] name
