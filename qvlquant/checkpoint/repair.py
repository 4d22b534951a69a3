"""The repair of a quantized checkpoint's ``modules_to_not_convert`` (``qvlquant inspect --repair``).

``repair_config`` changes nothing but ``modules_to_not_convert`` in config.json (names are only added), written
atomically. On a qvlquant export it first verifies the manifest (an edited or corrupted export is refused, so a repair
never hides it) and afterwards re-hashes the one entry of config.json, so the repaired export still verifies and
every other entry keeps its recorded hash. Folders without a manifest (the official releases) are repaired too.
"""

from __future__ import annotations

import json
import pathlib

from qvlquant.checkpoint.qconfig import read_config
from qvlquant.families import family_for
from qvlquant.storage.manifest import (
    MANIFEST,
    ManifestError,
    atomic_write_text,
    read_manifest,
    update_entry,
    verify_manifest,
)


def repair_config(folder: str | pathlib.Path) -> list[str]:
    """Make ``modules_to_not_convert`` name every unquantized part in both layouts and for vLLM
    (``ModelFamily.not_converted_names``; see the module docstring for what is written). -> the list written."""
    folder = pathlib.Path(folder)
    ours = (folder / MANIFEST).exists()
    if ours:
        try:
            verify_manifest(folder)
        except (ManifestError, OSError) as e:
            raise ValueError(f"not repairing {folder}: the export fails verification ({e}); re-export it") from None
    path = folder / "config.json"
    config = read_config(folder)
    family = family_for(config.get("model_type", "?"))
    qc = config.get("quantization_config")
    if not qc:
        raise ValueError(f"{folder} is not quantized: nothing to repair")
    names = list(dict.fromkeys(list(qc.get("modules_to_not_convert") or []) + family.not_converted_names()))
    if names == qc.get("modules_to_not_convert"):
        return names  # already right: nothing is rewritten
    qc["modules_to_not_convert"] = names
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    if ours and "config.json" in read_manifest(folder):
        update_entry(folder, "config.json")
    return names
