"""``qvlquant push``: a verified export to the Hugging Face hub, in one commit, with its model card.

Only the files the export wrote (its sha256 manifest lists them) are sent; its README.md (qvlquant.checkpoint.card) is
regenerated under the repo's name, with the eval table when one is given, and the manifest sent re-hashes it. An
export that fails verification sends nothing. The token (HF_TOKEN or the cached login) is handed to the hub
client and appears nowhere else: not in output, logs, saved files or exception text. It is stripped of surrounding
whitespace first (a ``.env`` saved with CRLF) and refused, unprinted, with whitespace or control characters inside;
a client's error is scrubbed of it in every form (raw, escaped, quoted, wrapped) and of anything shaped like a token.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re

from qvlquant.checkpoint.card import CARD, folder_card
from qvlquant.checkpoint.export import REPORT
from qvlquant.checkpoint.qconfig import read_config
from qvlquant.eval.check import read_report, validate_report
from qvlquant.storage.manifest import (
    MANIFEST,
    dump_manifest,
    is_pickle,
    read_manifest,
    verify_manifest,
)
from qvlquant.storage.shards import index_files


class PushError(RuntimeError):
    pass


def files_to_push(folder: pathlib.Path) -> list[str]:
    """The export's own files, after verifying them (manifest hashes, quantized config, index shards)."""
    if not (folder / MANIFEST).exists():
        raise PushError(f"{folder} has no {MANIFEST}: push only pushes qvlquant exports (re-export, or verify by hand)")
    verify_manifest(folder)
    config = read_config(folder)
    if not config.get("quantization_config"):
        raise PushError(f"{folder}/config.json has no quantization_config: not a quantized export")
    listed = read_manifest(folder)  # verified above: plain file names inside the export only
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = set(index_files(index))
        missing = sorted(f for f in shards if f not in listed)
        if missing:
            raise PushError(f"{folder}: shards {missing} named in the index are not files of the export "
                            f"(missing, or not in {MANIFEST}); re-export the model")
    names = sorted(n for n in listed if n != CARD) + [MANIFEST]  # the card is regenerated for the repo
    bad = [n for n in names if is_pickle(n)]
    if bad:
        raise PushError(f"{folder}: pickle files {bad} are never pushed (safetensors only); re-export the model")
    return names


def model_card(folder: pathlib.Path, repo_id: str, eval_report: dict | None = None) -> str:
    """The export's card (qvlquant.checkpoint.card) named after ``repo_id``, with the eval table when a report is given."""
    report = json.loads((folder / REPORT).read_text()) if (folder / REPORT).exists() else {}
    if not isinstance(report, dict):
        raise PushError(f"{folder / REPORT}: not a quantize report (a JSON object); re-export the model")
    return folder_card(folder, report, repo_id, eval_report)


def manifest_with_card(folder: pathlib.Path, card: bytes) -> bytes | None:
    """The manifest to push when the export's README.md is replaced by ``card``: its entry re-hashed, so the
    pushed repository still verifies. None when the manifest does not list a README.md (sent as it is)."""
    files = read_manifest(folder)
    if CARD not in files:
        return None
    files[CARD] = {"sha256": hashlib.sha256(card).hexdigest(), "bytes": len(card)}
    return dump_manifest(files).encode("utf-8")


# The shape of a token (HF's are hf_ + 34 letters and digits): what scrub() removes even when it is not ours.
TOKEN_SHAPE = re.compile(r"hf_[A-Za-z0-9]{20,}")
# What may stand between two characters of a token in an error text: whitespace (a wrapped line) and the escapes of
# repr() and JSON (\\r, \\n, \\t, doubled backslashes).
_GAP = r"(?:\s|\\+[rnt])*"


def checked_token(token: str | None, source: str) -> str | None:
    """``token`` without surrounding whitespace (a ``.env`` saved with CRLF leaves a ``\\r``); whitespace or control
    characters inside it are refused, the message naming ``source`` and never the token."""
    if token is None or not token.strip():
        return None
    token = token.strip()
    if not re.fullmatch(r"[\x21-\x7e]+", token):
        raise PushError(f"{source} holds whitespace or control characters inside the token (a line break or a paste "
                        "gone wrong); set it again to the token alone")
    return token


def resolve_token() -> str | None:
    """HF_TOKEN, else the cached login; stripped and checked (checked_token)."""
    if os.environ.get("HF_TOKEN", "").strip():
        return checked_token(os.environ["HF_TOKEN"], "HF_TOKEN")
    try:
        from huggingface_hub import get_token

        token = get_token()
    except Exception:  # no cached login is not an error here
        return None
    return checked_token(token, "the cached login (huggingface-cli login)")


def scrub(text: str, token: str | None) -> str:
    """``text`` without ``token`` in any form a client may print it: raw, quoted, escaped by repr() or JSON (even
    twice), wrapped across lines; and without anything shaped like an HF token (TOKEN_SHAPE)."""
    if token:  # each character may follow backslashes (an escaped quote or backslash) and a _GAP
        text = re.sub(_GAP.join(r"\\*" + re.escape(c) for c in token), "***", text)
    return TOKEN_SHAPE.sub("hf_***", text)


def push(folder, repo_id: str, private: bool = False, revision: str | None = None, dry_run: bool = False,
         eval_report: dict | str | pathlib.Path | None = None, api=None) -> dict:
    """-> {"repo", "files", "revision", "dry_run"}; raises PushError without the token in its text. ``eval_report``:
    a report (qvlquant eval --report) or the path of its JSON, read by qvlquant.eval.check (bounded, validated)."""
    folder = pathlib.Path(folder)
    if eval_report is not None:
        where = "the eval report" if isinstance(eval_report, dict) else str(eval_report)
        eval_report = validate_report(eval_report if isinstance(eval_report, dict) else read_report(eval_report),
                                      where)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PushError(f"--repo {repo_id!r}: expected owner/name")
    try:
        names = files_to_push(folder)
    except (ValueError, FileNotFoundError) as e:
        raise PushError(f"export verification failed, nothing pushed: {e}") from None
    card = model_card(folder, repo_id, eval_report).encode("utf-8")
    manifest = manifest_with_card(folder, card)
    plan = {"repo": repo_id, "files": names + [CARD], "revision": revision or "main", "dry_run": dry_run}
    if dry_run:
        return plan
    token = resolve_token()
    try:
        from huggingface_hub import CommitOperationAdd, HfApi

        api = api or HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=manifest if n == MANIFEST and manifest
                                  else str(folder / n)) for n in names]
        ops.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card))
        api.create_commit(repo_id, operations=ops, commit_message=f"qvlquant export ({len(names)} files + model card)",
                          revision=revision)
    except Exception as e:  # the hub client raises many types; re-raise one, scrubbed of the token
        raise PushError(f"push to {repo_id} failed: {scrub(f'{type(e).__name__}: {e}', token)}") from None
    return plan
