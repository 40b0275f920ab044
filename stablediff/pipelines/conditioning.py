"""Text conditioning for a batch: each prompt's AND parts, each part's schedule of texts over the steps
([from:to:when], [a|b]), the negative prompts' schedules, all encoded in one call."""
from dataclasses import dataclass

import torch

from stablediff import prompts as prompt_syntax


def text_encoders(model) -> list[tuple]:
    """(text encoder, tokenizer) pairs the model has, in the order their states are concatenated: one for SD 1.x/2.x,
    CLIP ViT-L then OpenCLIP bigG for SDXL, bigG alone for its refiner."""
    pairs = [(model.text_encoder, model.tokenizer), (getattr(model, "text_encoder_2", None), getattr(model, "tokenizer_2", None))]
    return [(encoder, tokenizer) for encoder, tokenizer in pairs if encoder is not None]


def encode_text(model, texts: list[str], clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, 77 * chunks, D) text states of prompts in AUTOMATIC1111's syntax, each distinct prompt encoded once and
    shorter prompts padded with empty chunks to the longest; and for SDXL (B, P) pooled text, else None. SDXL's
    encoders each read their penultimate layer (the webui leaves clip skip out of SDXL; so do we) and their states
    are concatenated; the pooled text is the second's, of the first chunk."""
    unique = list(dict.fromkeys(texts))
    library = model.embeddings
    pairs = text_encoders(model)
    sdxl = pairs[-1][0].config.projection is not None
    states, pooled = [], None
    with torch.no_grad():
        for encoder, tokenizer in pairs:
            projected = encoder.config.projection is not None
            which = ("clip_g" if projected else "clip_l") if sdxl else ""
            vectors = library.for_texts(tokenizer, unique, encoder.config.width, which) if library else None
            out = prompt_syntax.encode(encoder, tokenizer, unique, model.device, 1 if sdxl else clip_skip, vectors,
                                       pooled=projected)
            if projected:
                out, pooled = out
            states.append(out)
    index = torch.tensor([unique.index(t) for t in texts], device=states[0].device)
    return torch.cat(states, dim=-1)[index], None if pooled is None else pooled[index]


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
    encoded, pooled = encode_text(model, every, clip_skip)  # one encoder call, every text once
    states = dict(zip(every, encoded))
    pools = dict(zip(every, pooled)) if pooled is not None else None
    # SDXL, as diffusers' force_zeros_for_empty_prompt (on for the base, off for the refiner) and the webui: a batch's
    # negative prompts all empty are zeros, not encoded ""
    zero_negatives = pools is not None and model.zero_empty_negatives and all(n == "" for n in negatives)
    plain = all(len(p) == 1 and p[0][1] == 1.0 for p in parts)
    rows, row = [], 0
    for image_parts in parts:
        rows.append([(row + j, weight) for j, (_, weight) in enumerate(image_parts)])
        row += len(image_parts)
    stretches = []
    for end in ends:
        prompt_texts, negative_texts = texts[end]
        stretch = {"context": torch.stack([states[t] for t in prompt_texts]),
                   "uncond": torch.stack([states[t] for t in negative_texts]), "parts": None if plain else rows}
        if pools is not None:
            stretch["pooled"] = torch.stack([pools[t] for t in prompt_texts])
            stretch["uncond_pooled"] = torch.stack([pools[t] for t in negative_texts])
            if zero_negatives:
                stretch["uncond"] = torch.zeros_like(stretch["uncond"])
                stretch["uncond_pooled"] = torch.zeros_like(stretch["uncond_pooled"])
        stretches.append(stretch)
    return TextConditioning(ends, stretches)


def add_size_conditioning(texts: TextConditioning, unet_config, numbers: list[float], uncond_numbers: list[float]):
    """SDXL: each stretch's pooled text joined by the size conditioning (`numbers` for the prompt rows, and
    `uncond_numbers` for the negative rows: the refiner's aesthetic score differs) into the UNet's vector rows,
    "vector" and "uncond_vector"."""
    from stablediff.models.unet import size_vector

    for stretch in texts.stretches:
        for rows, key in (("pooled", "vector"), ("uncond_pooled", "uncond_vector")):
            pooled = stretch[rows]
            given = numbers if rows == "pooled" else uncond_numbers
            sizes = size_vector(torch.tensor([given], device=pooled.device).expand(len(pooled), -1),
                                unet_config.vector_embed_dim)
            stretch[key] = torch.cat([pooled.float(), sizes], dim=1)


def size_numbers(model, width: int, height: int) -> tuple[list[float], list[float]]:
    """SDXL's size conditioning for a render of width x height, (prompt rows, negative rows), as diffusers and the
    webui set it unless model.size_conditioning says otherwise: original size = target size = the render's
    (height, width), crop (0, 0); the refiner reads an aesthetic score (6, and 2.5 for the negative rows) in place
    of the target size."""
    given = model.size_conditioning
    original, crop = given.get("original_size") or (height, width), given.get("crop") or (0, 0)
    cfg = model.unet.config
    count = (cfg.adm_in_channels - model.text_encoder_2.config.projection) // cfg.vector_embed_dim
    if count == 5:
        return ([*original, *crop, given.get("aesthetic_score", 6.0)],
                [*original, *crop, given.get("negative_aesthetic_score", 2.5)])
    numbers = [*original, *crop, *(given.get("target_size") or (height, width))]
    return numbers, numbers
