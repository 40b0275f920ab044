"""Prompts as AUTOMATIC1111 users write them: attention weights, BREAK, and prompts longer than 75 tokens.

`(text)` multiplies the weight by 1.1, `[text]` divides it by 1.1, `(text:1.3)` sets a factor, `\\(` and the like
are literal brackets, and `BREAK` starts a new 75-token chunk. Long prompts are cut into chunks of 75 tokens (at the
last comma when one is within 20 tokens of the end), each encoded with its own start and end tokens, and the states
concatenated. Emphasis follows the webui's default: each token's states are scaled by its weight, then the chunk's
mean is restored.
"""
import re

import torch

CHUNK = 75
COMMA_BACKTRACK = 20
BREAK = ("BREAK", -1.0)

# one token of prompt syntax: escapes, brackets, an explicit ":weight)" closer, plain text, or a lone colon
_SYNTAX = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """(text, weight) pieces of a prompt, adjacent pieces of equal weight merged; BREAK as ("BREAK", -1)."""
    pieces: list[list] = []
    round_open, square_open = [], []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _SYNTAX.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:] if len(token) > 1 else token, 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), 1.1)
        elif token == "]" and square_open:
            scale(square_open.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
    for start in round_open:  # unclosed brackets still apply to what follows them
        scale(start, 1.1)
    for start in square_open:
        scale(start, 1 / 1.1)
    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1] and tuple(piece) != BREAK and tuple(merged[-1]) != BREAK:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


def chunks(tokenizer, text: str) -> list[tuple[list[int], list[float]]]:
    """The prompt as 77-token chunks: (ids with start/end tokens and padding, per-token weights)."""
    comma = tokenizer.tokens(",")[0]
    done, ids, weights, last_comma = [], [], [], -1

    def close():  # [start, tokens, end, padding], as the reference tokenizer lays out a prompt
        nonlocal ids, weights, last_comma
        pad = CHUNK - len(ids)
        done.append(([tokenizer.bos, *ids, tokenizer.eos, *[tokenizer.pad] * pad], [1.0, *weights, *[1.0] * (pad + 1)]))
        ids, weights, last_comma = [], [], -1

    for text_piece, weight in parse_attention(text):
        if (text_piece, weight) == BREAK:
            close()
            continue
        for token in tokenizer.tokens(text_piece):
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1  # move the words after the last comma into the next chunk
                carry_ids, carry_weights = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = carry_ids, carry_weights
            if len(ids) == CHUNK:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not done:
        close()
    return done


def encode(text_encoder, tokenizer, prompts: list[str], device, clip_skip: int = 1) -> torch.Tensor:
    """(B, 77 * chunks, D) states; every prompt padded with empty chunks to the longest one. clip_skip 2 takes
    the states one layer earlier than the model's usual one (through the final layer norm), and so on."""
    per_prompt = [chunks(tokenizer, p) for p in prompts]
    n = max(len(c) for c in per_prompt)
    empty = chunks(tokenizer, "")[0]
    flat = [c for prompt_chunks in per_prompt for c in prompt_chunks + [empty] * (n - len(prompt_chunks))]
    z = text_encoder(torch.tensor([ids for ids, _ in flat], device=device), skip=text_encoder.config.skip_layers + clip_skip - 1)
    z = list(z.unbind(0))  # one encoder call for every chunk of every prompt
    for i, (_, weights) in enumerate(flat):
        if any(w != 1.0 for w in weights):  # emphasis: scale by weight, then restore the chunk's mean
            mean = z[i].float().mean()
            z[i] = z[i] * torch.tensor(weights, device=device, dtype=z[i].dtype)[:, None]
            z[i] = z[i] * (mean / z[i].float().mean()).to(z[i].dtype)
    return torch.stack(z).reshape(len(prompts), n * z[0].shape[0], z[0].shape[-1])
