"""Calibration text: where it comes from and how it becomes token sequences."""

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from lsaq_mlx.cache import fingerprint_bytes
from lsaq_mlx.errors import UserError
from lsaq_mlx.documents import read_text

DEFAULT_NAME = "default"  # the packaged public-domain text (lsaq_mlx/data/calibration.txt)


@dataclass(frozen=True)
class CalibrationText:
    name: str  # what the user passed, or "default"
    text: str

    @property
    def fingerprint(self) -> str:
        return fingerprint_bytes(self.text)


MAX_CALIBRATION_BYTES = 1 << 30  # its whole text is fingerprinted; calibration uses a few MB


def load_calibration(spec: str | None = None) -> CalibrationText:
    """A text file, a folder of .txt files, the packaged default, or a Hugging Face
    dataset name ("wikitext:wikitext-2-raw-v1:train", needs the ``datasets`` package)."""
    if spec in (None, "", DEFAULT_NAME):
        text = resources.files("lsaq_mlx").joinpath("data/calibration.txt").read_text(encoding="utf-8")
        return CalibrationText(DEFAULT_NAME, text)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise UserError(f"calibration folder {path} has no .txt files")
        text = "\n\n".join(_read_text(f) for f in files)
    elif path.is_file():
        text = _read_text(path)
    elif ":" in spec or ("/" in spec and not path.parent.exists()):
        text = _hub_dataset_text(spec)
    else:
        raise UserError(f"calibration text not found: {spec} (a text file, a folder of .txt files, or default)")
    if not text.strip():
        raise UserError(f"calibration text {spec} is empty")
    return CalibrationText(spec, text)


def _read_text(path: Path) -> str:
    return read_text(path, f"calibration file {path}", MAX_CALIBRATION_BYTES)


def _hub_dataset_text(spec: str) -> str:
    try:
        from datasets import load_dataset
    except ImportError:
        raise UserError(f"'{spec}' looks like a Hugging Face dataset: pip install datasets, or pass a text file") from None
    name, config, split = (spec.split(":") + [None, "train"])[:3]
    try:
        rows = load_dataset(name, config, split=split)
    except Exception as e:
        raise UserError(f"cannot load dataset '{spec}' from the Hugging Face Hub ({type(e).__name__}): offline?") from None
    column = "text" if "text" in rows.column_names else rows.column_names[0]
    return "\n".join(rows[column])


def token_sequences(tokenizer, calib: CalibrationText, n_tokens: int, seq_len: int, skip_tokens: int = 0):
    """Consecutive sequences of ``seq_len`` tokens (the last may be shorter), ``n_tokens``
    in all, starting ``skip_tokens`` into the text. Only as much text as needed is
    tokenized. Fewer tokens than asked is an error naming how many there are."""
    if n_tokens < 1 or seq_len < 2:
        raise UserError("need at least 1 calibration token and a sequence length of at least 2")
    wanted, chars = skip_tokens + n_tokens, 8 * (skip_tokens + n_tokens) + 1000
    while True:
        tokens = tokenizer.encode(calib.text[:chars])
        if len(tokens) >= wanted or chars >= len(calib.text):
            break
        chars *= 2
    tokens = tokens[skip_tokens:wanted]
    if len(tokens) < n_tokens:
        raise UserError(
            f"calibration text {calib.name} has only {len(tokens)} tokens after skipping {skip_tokens}; "
            f"asked for {n_tokens}"
        )
    return [tokens[i : i + seq_len] for i in range(0, len(tokens), seq_len) if len(tokens[i : i + seq_len]) >= 2]
