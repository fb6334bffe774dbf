"""Runners turn one assembled batch into one output row per request."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def pool_padded(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool [B, L, H] hidden states over the real tokens of each row, in float32."""
    hidden = hidden.float()
    if pooling == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if pooling == "mean":
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    if pooling == "max":
        return hidden.masked_fill(m == 0, float("-inf")).amax(1)
    raise ValueError(f"unknown pooling {pooling!r}")


class PaddedRunner:
    """Calls the Hugging Face model on the padded layout: works for any encoder."""

    name = "padded"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        task: str,
        pooling: str,
        normalize: bool,
        device: torch.device,
    ) -> None:
        self.model = model
        # Encoder-decoder models (T5) are served by their encoder alone.
        is_enc_dec = getattr(model.config, "is_encoder_decoder", False)
        self.encoder = model.get_encoder() if is_enc_dec and task == "embed" else model
        self.task = task
        self.pooling = pooling
        self.normalize = normalize
        self.device = device

    def run(self, batch) -> np.ndarray:
        """[B, dim] float32: pooled embeddings, or class probabilities for classify."""
        ids = torch.from_numpy(batch.input_ids).to(self.device, non_blocking=True)
        mask = torch.from_numpy(batch.attention_mask).to(self.device, non_blocking=True)
        out = self.encoder(input_ids=ids, attention_mask=mask)
        if self.task == "classify":
            rows = torch.softmax(out.logits.float(), dim=-1)
        else:
            rows = pool_padded(out.last_hidden_state, mask, self.pooling)
            if self.normalize:
                rows = F.normalize(rows, p=2, dim=-1)
        return rows.cpu().numpy()
