import json
import shutil

import pytest

from qvlquant.assets.paths import MODEL_DIR
from qvlquant.engine.skeleton import load_config
from qvlquant.families import QWEN2_VL


@pytest.mark.parametrize("architectures", [[{"a": 1}], "Qwen2VLForConditionalGeneration", [3]])
def test_architectures_of_another_shape_are_refused_before_anything_is_built(tmp_path, architectures):
    """Found by fuzzing: the export copies ``architectures`` into the card, which failed on a list of objects
    after the whole model was written (exit 3); now the config is refused up front, naming the field."""
    folder = tmp_path / "model"
    shutil.copytree(MODEL_DIR, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = architectures
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="architectures must be a list of class names"):
        load_config(folder, QWEN2_VL)
