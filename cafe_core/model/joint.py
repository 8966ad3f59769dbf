"""The CAFe step as one module: LLaVA-OneVision + the joint loss, in one forward.

One training step runs the vision tower once over the batch's images and the LLM over two row groups:
the LM conversations packed with the image-embedding prompts (reusing the same image features and the
conversation's image tokens), then the text-embedding prompts (no image, no dummy zero image), each group
only as wide as its longest row. The reference runs three forwards and the vision tower three
times. Everything happens inside this module's forward and its submodules' forwards, so DeepSpeed ZeRO-3
gathers each parameter where it is used and every rank makes the same collective calls.

Embedding = last layer hidden state (after the final norm) at each prompt's last real token (the pooling
indices come from InputBuilder.pack, for either padding side), L2-normalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cafe_core.loss import IGNORE_INDEX, CachedContrastive, JointLoss
from cafe_core.model.inputs import Batch


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean 4-D mask (True = may attend) as the additive float mask every attention implementation
    reads the same way: 0 where allowed, the dtype's minimum where blocked.

    transformers hands a 4-D mask to the attention function as it is (masking_utils returns it untouched):
    eager *adds* it to the scores, so a boolean one would add 1 to allowed and 0 to blocked positions and
    mask nothing (the LM loss would see future tokens); sdpa reads a boolean mask as allowed/blocked and
    adds a float one, so this form is right for both. Rows are never fully blocked (padding attends to
    itself), so no row softmaxes over the minimum alone. 2-D masks need nothing: transformers builds the
    causal + padding mask for each implementation from them.
    """
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class CafeModel(nn.Module):
    def __init__(self, hf_model: nn.Module, loss: JointLoss | None = None):
        super().__init__()
        self.hf = hf_model
        self.loss = loss if loss is not None else JointLoss()

    @property
    def image_token_id(self) -> int:
        return self.hf.config.image_token_id

    def hidden_states(self, batch: Batch) -> Tensor:
        embeds = self.hf.get_input_embeddings()(batch.input_ids)
        if batch.pixel_values is not None and not batch.image_rows_for:
            # A blank image (a batch without images): read and weighed 0, so that the vision tower runs, and
            # takes part in the backward, on every rank whatever its batch holds.
            per_image = self.hf.get_image_features(batch.pixel_values, batch.image_sizes).pooler_output
            embeds = embeds + 0.0 * sum(f.sum() for f in per_image).to(embeds.dtype)
        elif batch.image_rows_for:
            per_image = self.hf.get_image_features(batch.pixel_values, batch.image_sizes).pooler_output
            features = torch.cat([per_image[i] for i in batch.image_rows_for]).to(embeds.dtype)
            placeholders = batch.input_ids == self.image_token_id
            if int(placeholders.sum()) != features.shape[0]:
                raise ValueError(
                    f"{int(placeholders.sum())} image placeholder tokens for {features.shape[0]} image features: "
                    "the processor and model disagree (check image_grid_pinpoints)"
                )
            embeds = embeds.masked_scatter(placeholders.unsqueeze(-1), features)
        mask = batch.attention_mask if batch.attention_4d is None else additive_mask(batch.attention_4d, embeds.dtype)
        width = batch.input_ids.shape[1]
        hidden = []
        for start, end, w in batch.groups or [(0, batch.input_ids.shape[0], width)]:
            rows = slice(start, end)
            out = self.hf.model.language_model(
                inputs_embeds=embeds[rows, :w], attention_mask=mask[rows, ..., :w, :w] if mask.dim() == 4 else mask[rows, :w],
                position_ids=batch.position_ids[rows, :w], use_cache=False,
            )
            hidden.append(F.pad(out.last_hidden_state, (0, 0, 0, width - w)))
        return torch.cat(hidden) if len(hidden) > 1 else hidden[0]

    def embeddings(self, hidden: Tensor, batch: Batch, name: str) -> Tensor:
        rows, cols = batch.pool[name]
        return F.normalize(hidden[rows, cols].float(), dim=-1)

    def negatives(self, hidden: Tensor, batch: Batch, a: Tensor) -> tuple[Tensor, Tensor] | None:
        """Each pair's hard-negative embedding (zeros where it has none) and which pairs have one; None when
        the batch has no negatives slot. Built on `a` (times 0) so that it is in the graph on every rank,
        even one whose batch has no negative: the loss gathers it, and a gather's backward is a collective."""
        if batch.negative_of is None:
            return None
        rows = torch.tensor(batch.negative_of, dtype=torch.long, device=a.device)
        mask = torch.zeros(a.shape[0], dtype=torch.bool, device=a.device)
        mask[rows] = True
        slots = a * 0.0
        if batch.negative_of:
            slots = slots.index_copy(0, rows, self.embeddings(hidden, batch, "n").to(slots.dtype))
        return slots, mask

    @staticmethod
    def lm_target_count(batch: Batch) -> int:
        """Next-token targets in the batch (what lm_logits scores)."""
        return 0 if batch.targets is None else int((batch.targets[:, 1:] != IGNORE_INDEX).sum())

    def lm_logits(self, hidden: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """Logits only where there is a next-token target (saves the vocab projection elsewhere)."""
        targets = batch.targets[:, 1:]
        keep = targets != IGNORE_INDEX
        return self.hf.lm_head(hidden[:, :-1][keep]), targets[keep]

    def forward(self, batch: Batch, mode: str = "train", step_tokens: Tensor | None = None, micro_steps: int = 1,
                cached: CachedContrastive | None = None) -> dict[str, Tensor] | Tensor:
        """mode "train": the joint loss of a pairs batch as {loss, loss_lm, loss_con} (see JointLoss for
        step_tokens, micro_steps and cached). mode "pairs": the pair embeddings {a, b} only, with the hard
        negatives {n, n_mask} when the batch has their slot. mode "embed": the embeddings of group "a"."""
        hidden = self.hidden_states(batch)
        if mode == "embed":
            return self.embeddings(hidden, batch, "a")
        if mode == "pairs":
            out = {"a": self.embeddings(hidden, batch, "a"), "b": self.embeddings(hidden, batch, "b")}
            negatives = self.negatives(hidden, batch, out["a"])
            if negatives is not None:
                out["n"], out["n_mask"] = negatives
            return out
        logits, targets = self.lm_logits(hidden, batch) if self.loss.uses_lm else (None, None)
        a = self.embeddings(hidden, batch, "a") if self.loss.uses_con else None
        b = self.embeddings(hidden, batch, "b") if self.loss.uses_con else None
        n, n_mask = (self.negatives(hidden, batch, a) if a is not None else None) or (None, None)
        parts = self.loss(logits, targets, a, b, step_tokens, micro_steps, cached, negatives=n, negative_mask=n_mask)
        return parts.as_dict()
