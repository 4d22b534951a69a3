"""Where the embedded demo's files live inside the package."""

import pathlib

DEMO_ROOT = pathlib.Path(__file__).resolve().parent
MODEL_DIR = DEMO_ROOT / "model"
DATA_DIR = DEMO_ROOT / "data"
TESTBED_DIR = DEMO_ROOT / "testbed"  # the demo with outlier channels, fine-tuned (qvlquant.demo.testbed)
