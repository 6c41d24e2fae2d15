"""Models named by a Hugging Face Hub id."""

import re
from pathlib import Path

from lsaq_mlx.errors import UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.py", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]


def looks_like_hub_id(spec: str) -> bool:
    return bool(HUB_ID.match(spec)) and not Path(spec).exists()


def download(repo_id: str) -> Path:
    """The local snapshot of ``repo_id``: from the hub cache when there, else downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS))
    except GatedRepoError:
        raise UserError(f"'{repo_id}' is gated on the Hugging Face Hub: accept its terms and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise UserError(f"no model '{repo_id}' on the Hugging Face Hub (or it is private)") from None
    except Exception as e:
        raise UserError(
            f"cannot download '{repo_id}' from the Hugging Face Hub ({type(e).__name__}): "
            "offline or unreachable; pass a local folder or a .gguf file instead"
        ) from None
