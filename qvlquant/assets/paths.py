"""Where the shipped assets live inside the package: the demo model, the test bed, and the demo's text data."""

import pathlib

ASSETS_ROOT = pathlib.Path(__file__).resolve().parent
MODEL_DIR = ASSETS_ROOT / "demo"  # the embedded demo model (built by qvlquant.tools.demo.train)
DATA_DIR = ASSETS_ROOT / "data"
TESTBED_DIR = ASSETS_ROOT / "testbed"  # the demo with outlier channels, fine-tuned (qvlquant.tools.demo.testbed)
EMBEDDED_MODELS = {"demo": MODEL_DIR, "testbed": TESTBED_DIR}  # what --model demo / testbed name
