"""Text conditioning for a batch: each prompt's AND parts, each part's schedule of texts over the steps
([from:to:when], [a|b]), the negative prompts' schedules, all encoded in one call."""
from dataclasses import dataclass

import torch

from stablediff import prompts as prompt_syntax


def encode_text(model, texts: list[str], clip_skip: int = 1) -> torch.Tensor:
    """(B, 77 * chunks, D) text states of prompts in AUTOMATIC1111's syntax; each distinct prompt encoded once,
    shorter prompts padded with empty chunks to the longest."""
    unique = list(dict.fromkeys(texts))
    library = model.embeddings
    vectors = library.for_texts(model.tokenizer, unique, model.text_encoder.config.width) if library else None
    with torch.no_grad():
        states = prompt_syntax.encode(model.text_encoder, model.tokenizer, unique, model.device, clip_skip, vectors)
    return states[torch.tensor([unique.index(t) for t in texts], device=states.device)]


def _at(stretches: list[tuple[int, object]], step: int):
    """The webui's pick: what the first stretch not ended before `step` holds (1-based ends; steps count from 0)."""
    return next((held for end, held in stretches if step <= end), stretches[-1][1])


@dataclass
class TextConditioning:
    """Per stretch of steps (ending at ends[k]): the states of every prompt part ("context", one row per part),
    of each negative prompt ("uncond", one row per image), and which rows belong to which image with what weight
    ("parts"; None when every image has one part of weight 1, plain classifier-free guidance)."""

    ends: list[int]
    stretches: list[dict]

    def per_step(self, n: int) -> list[dict]:
        """The text inputs of each of n steps."""
        return [_at(list(zip(self.ends, self.stretches)), i) for i in range(n)]


def encode_conditioning(model, prompts: list[str], negatives: list[str], steps: int, clip_skip: int = 1,
                        first_pass_steps: int | None = None) -> TextConditioning:
    """Schedule and encode a batch's prompts (split at AND) and negative prompts over `steps`."""
    parts = [prompt_syntax.split_and(p) for p in prompts]
    scheds = [[prompt_syntax.schedule(text, steps, first_pass_steps) for text, _ in image_parts] for image_parts in parts]
    negative_scheds = [prompt_syntax.schedule(n, steps, first_pass_steps) for n in negatives]
    ends = sorted({end for image in scheds for s in image for end, _ in s} | {end for s in negative_scheds for end, _ in s})
    texts = {end: ([_at(s, end) for image in scheds for s in image], [_at(s, end) for s in negative_scheds])
             for end in ends}
    every = [t for end in ends for group in texts[end] for t in group]
    states = dict(zip(every, encode_text(model, every, clip_skip)))  # one encoder call, every text once
    plain = all(len(p) == 1 and p[0][1] == 1.0 for p in parts)
    rows, row = [], 0
    for image_parts in parts:
        rows.append([(row + j, weight) for j, (_, weight) in enumerate(image_parts)])
        row += len(image_parts)
    stretches = [{"context": torch.stack([states[t] for t in texts[end][0]]),
                  "uncond": torch.stack([states[t] for t in texts[end][1]]), "parts": None if plain else rows}
                 for end in ends]
    return TextConditioning(ends, stretches)
