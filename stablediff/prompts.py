"""Prompts as AUTOMATIC1111 users write them: attention weights, BREAK, prompts longer than 75 tokens, textual
inversion names, prompt editing and alternation over the steps, and AND.

`(text)` multiplies the weight by 1.1, `[text]` divides it by 1.1, `(text:1.3)` sets a factor, `\\(` and the like
are literal brackets, and `BREAK` starts a new chunk. Long prompts are cut into chunks of 75 tokens (the text
encoder's length less its start and end tokens), at the last comma when one is within 20 tokens of the end, each
encoded with its own start and end tokens, and the states concatenated. Emphasis follows the webui's default: each
token's states are scaled by its weight, then the chunk's mean is restored. `[from:to:when]` and `[a|b]` give a
prompt a text per stretch of steps (`schedule`), and `a AND b:0.5` splits it into weighted parts (`split_and`),
guided separately.
"""
import re

import torch

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
            pieces.append([token[1:], 1.0])  # a lone backslash is dropped, as the webui drops it
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


def holds(tokens: list[int], word: list[int]) -> bool:
    """Whether a text's tokens hold a word's tokens in a row (an embedding's name, a trained token)."""
    return any(tokens[i:i + len(word)] == word for i in range(len(tokens) - len(word) + 1))


def chunks(tokenizer, text: str, embeddings: dict | None = None) -> list[tuple[list[int], list[float], list]]:
    """The prompt as chunks of the text encoder's length (77 for SD): (ids with start/end tokens and padding,
    per-token weights, textual inversion vectors as [(position, (n, D) vectors)]). `embeddings` maps a name's
    token ids to its vectors; an embedding that would straddle a chunk's end starts the next chunk, as in the
    webui."""
    size = tokenizer.max_len - 2  # text tokens per chunk: 75 for SD
    comma = tokenizer.tokens(",")[0]
    by_first = {}
    for name_ids in sorted(embeddings or {}, key=len, reverse=True):
        by_first.setdefault(name_ids[0], []).append(name_ids)
    done, ids, weights, fixes, last_comma = [], [], [], [], -1

    def close():  # [start, tokens, end, padding], as the reference tokenizer lays out a prompt
        nonlocal ids, weights, fixes, last_comma
        pad = size - len(ids)
        done.append(([tokenizer.bos, *ids, tokenizer.eos, *[tokenizer.pad] * pad], [1.0, *weights, *[1.0] * (pad + 1)],
                      [(1 + at, vectors) for at, vectors in fixes]))
        ids, weights, fixes, last_comma = [], [], [], -1

    def add(token, weight):
        nonlocal ids, weights, fixes, last_comma
        if token == comma:
            last_comma = len(ids)
        elif len(ids) == size and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
            cut = last_comma + 1  # move the words after the last comma into the next chunk
            carry = ids[cut:], weights[cut:], [(at - cut, v) for at, v in fixes if at >= cut]
            ids, weights, fixes = ids[:cut], weights[:cut], [(at, v) for at, v in fixes if at < cut]
            close()
            ids, weights, fixes = carry
        if len(ids) == size:
            close()
        ids.append(token)
        weights.append(weight)

    for text_piece, weight in parse_attention(text):
        if (text_piece, weight) == BREAK:
            close()
            continue
        tokens, j = tokenizer.tokens(text_piece), 0
        while j < len(tokens):
            name = next((n for n in by_first.get(tokens[j], ()) if tuple(tokens[j:j + len(n)]) == n), None)
            if name is None:
                add(tokens[j], weight)
                j += 1
                continue
            vectors = embeddings[name]
            if len(ids) + len(vectors) > size and len(vectors) <= size:
                close()
            fixes.append((len(ids), vectors))
            for _ in range(len(vectors)):
                add(tokenizer.pad, weight)  # a placeholder id: the vector replaces its embedding
            j += len(name)
    if ids or not done:
        close()
    return done


def encode(text_encoder, tokenizer, prompts: list[str], device, clip_skip: int = 1, embeddings: dict | None = None,
           pooled: bool = False):
    """(B, 77 * chunks, D) states; every prompt padded with empty chunks to the longest one. clip_skip 2 takes
    the states one layer earlier than the model's usual one (through the final layer norm), and so on. pooled:
    also (B, P), each prompt's pooled output of its first chunk, without emphasis (SDXL, as the webui)."""
    per_prompt = [chunks(tokenizer, p, embeddings) for p in prompts]
    n = max(len(c) for c in per_prompt)
    empty = chunks(tokenizer, "")[0]
    flat = [c for prompt_chunks in per_prompt for c in prompt_chunks + [empty] * (n - len(prompt_chunks))]
    ids = torch.tensor([c[0] for c in flat], device=device)
    tokens = None
    if any(c[2] for c in flat):  # textual inversion: its vectors in place of the placeholders' embeddings
        tokens = text_encoder.embeddings.token_embedding(ids).clone()
        for row, (_, _, fixes) in enumerate(flat):
            for at, vectors in fixes:
                tokens[row, at:at + len(vectors)] = vectors.to(tokens)
    z = text_encoder(ids, skip=text_encoder.config.skip_layers + clip_skip - 1, tokens=tokens, pooled=pooled)
    if pooled:
        z, first = z[0], z[1].reshape(len(prompts), n, -1)[:, 0]
    z = list(z.unbind(0))  # one encoder call for every chunk of every prompt
    for i, (_, weights, _) in enumerate(flat):
        if any(w != 1.0 for w in weights):  # emphasis: scale by weight, then restore the chunk's mean
            mean = z[i].float().mean()
            z[i] = z[i] * torch.tensor(weights, device=device, dtype=z[i].dtype)[:, None]
            z[i] = z[i] * (mean / z[i].float().mean()).to(z[i].dtype)
    states = torch.stack(z).reshape(len(prompts), n * z[0].shape[0], z[0].shape[-1])
    return (states, first) if pooled else states


# --- prompt editing [from:to:when], alternation [a|b] and AND -------------------------------------------------------

_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*]")
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")  # no re.S: a backslash before a newline fails, as in the webui
_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)


class _NoParse(Exception):
    pass


def _parse_sequence(text: str, i: int, top: bool) -> tuple[list, int]:
    """Nodes from text[i:] up to a character that closes an enclosing construct: plain strings, ("(", inner, tail)
    emphasis kept as written, ("sched", before, after, when), ("alt", options). At the top level a bracket or colon
    that starts nothing parsable is kept as a literal character, as the webui's grammar allows."""
    nodes = []
    while i < len(text):
        if m := _PLAIN.match(text, i):
            nodes.append(m.group(0))
            i = m.end()
        elif text[i] in "([":
            try:
                node, i = (_parse_round if text[i] == "(" else _parse_square)(text, i)
                nodes.append(node)
            except _NoParse:
                if not top:
                    raise
                nodes.append(text[i])
                i += 1
        elif top and text[i] in "]):":
            nodes.append(text[i])
            i += 1
        elif top or text[i] == "\\":  # a lone "|" at the top level or a trailing backslash: not webui syntax
            raise _NoParse
        else:
            break
    return nodes, i


def _expect(text: str, i: int, char: str) -> int:
    if i >= len(text) or text[i] != char:
        raise _NoParse
    return i + 1


def _parse_round(text: str, i: int) -> tuple[tuple, int]:
    """(prompt) or (prompt:prompt): emphasis, left for the attention parser but with its insides resolved."""
    inner, i = _parse_sequence(text, i + 1, top=False)
    if i < len(text) and text[i] == ":":
        tail, i = _parse_sequence(text, i + 1, top=False)
        return ("(", inner, [":", *tail]), _expect(text, i, ")")
    return ("(", inner, []), _expect(text, i, ")")


def _parse_square(text: str, i: int) -> tuple[tuple, int]:
    """[prompt] (emphasis), [to:when], [from:to:when] or [a|b|...]."""
    first, i = _parse_sequence(text, i + 1, top=False)
    if i < len(text) and text[i] == "]":
        return ("[", first, []), i + 1
    if i < len(text) and text[i] == "|":
        options = [first]
        while i < len(text) and text[i] == "|":
            option, i = _parse_sequence(text, i + 1, top=False)
            options.append(option)
        return ("alt", options), _expect(text, i, "]")
    i = _expect(text, i, ":")
    if m := _NUMBER.match(text, i):
        return ("sched", None, first, m.group(1)), m.end()
    second, i = _parse_sequence(text, i, top=False)
    i = _expect(text, i, ":")
    if m := _NUMBER.match(text, i):
        return ("sched", first, second, m.group(1)), m.end()
    raise _NoParse


def _walk(nodes: list, visit) -> None:
    for node in nodes:
        if isinstance(node, tuple):
            visit(node)
            children = node[1] if node[0] == "alt" else [c for c in node[1:] if isinstance(c, list)]
            for child in children:
                _walk(child, visit)


def _text_at(nodes: list, step: int, whens: dict) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] in "([":
            close = ")" if node[0] == "(" else "]"
            out += [node[0], _text_at(node[1], step, whens), _text_at(node[2], step, whens), close]
        elif node[0] == "alt":
            out.append(_text_at(node[1][(step - 1) % len(node[1])], step, whens))
        else:
            _, before, after, _ = node
            out.append(_text_at(before or [], step, whens) if step <= whens[id(node)] else _text_at(after, step, whens))
    return "".join(out)


def schedule(text: str, steps: int, first_pass_steps: int | None = None) -> list[tuple[int, str]]:
    """The prompt's text per stretch of steps: [(last step it is used at, text), ...] as the webui schedules
    `[from:to:when]` and `[a|b]`. `when` is a step number, or with a decimal point a fraction of the steps. For a
    hires fix's second pass (first_pass_steps given) numbers count on from the first pass: 25 after a 20-step first
    pass is step 5, and 1.5 is half-way through the second pass."""
    try:
        nodes, end = _parse_sequence(text, 0, top=True)
    except _NoParse:
        return [(steps, text)]
    int_offset, float_offset = (0, 0.0) if first_pass_steps is None else (first_pass_steps, 1.0)
    ends, whens = {steps}, {}

    def collect(node):
        if node[0] == "alt":
            ends.update(range(1, steps + 1))
        elif node[0] == "sched":
            raw = node[3]
            value = (float(raw) - float_offset) * steps if "." in raw else float(raw) - int_offset
            whens[id(node)] = min(steps, int(value))
            if whens[id(node)] >= 1:
                ends.add(whens[id(node)])
    _walk(nodes, collect)
    return [(step, _text_at(nodes, step, whens)) for step in sorted(ends)]


def split_and(text: str) -> list[tuple[str, float]]:
    """Composable prompts: `a AND b :0.5` -> [("a", 1.0), ("b", 0.5)], each part a prompt of its own."""
    parts = []
    for part in _AND.split(text):
        m = _PART_WEIGHT.match(part)
        parts.append((m.group(1), float(m.group(2))) if m.group(2) is not None else (m.group(1), 1.0))
    return parts
