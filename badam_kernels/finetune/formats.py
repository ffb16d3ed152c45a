"""The formats of a ``--data`` line, and how an example becomes token ids and a loss mask.

Each line of a ``.jsonl`` file is one example in one of these formats (a file may mix them; the
keys decide, tried in this order):

* ``chat`` (OpenAI style): ``messages``: ``[{"role", "content"}, ...]`` with the roles ``system``
  (optional), ``user``, ``assistant``; ``content`` a string or a list of ``{"type": "text", "text"}``
  parts. Loss on every assistant turn.
* ``sharegpt``: ``conversations``: ``[{"from", "value"}, ...]`` with ``from`` one of ``system``,
  ``human``/``user``, ``gpt``/``assistant``. Loss on every assistant turn.
* ``alpaca``: ``instruction``, ``input`` (optional, appended to the instruction after a blank line),
  ``output``. Loss on the output.
* ``instruction/response``: ``instruction``, ``input`` (optional), ``response``. Loss on the response.
* ``prompt/completion``: ``prompt``, ``completion``. Loss on the completion.
* ``text``: ``text``. Loss on every token (a document, ended with the end-of-sequence token).

Every format but ``text`` is a conversation (a list of ``{"role", "content"}`` messages; the pair
formats are one user turn and one assistant turn; ``conversations``/``messages`` and the pair
formats may also carry a top-level ``system`` string). A conversation is written out with the
tokenizer's chat template; the tokens of each assistant turn, from its first content token through
the template's end-of-turn marker (trailing whitespace after it excluded), carry the loss, in every
turn of a multi-turn conversation; everything else is context (label ``IGNORE_INDEX``).

The turns are found by rendering prefixes of the conversation: the text up to an assistant turn is
the template applied to the messages before it with ``add_generation_prompt=True``, and the turn
ends where the template applied to the messages through it ends. Each piece is tokenized on its
own, so the prompt tokens are exactly those a generation from that prompt would see. A template
that does not render a conversation as a growing prefix (it rewrites earlier turns) is refused with
the line number.

A tokenizer without a chat template (the byte tokenizer, or a model folder without one) gets the
plain template: ``### System:\\n{system}\\n\\n``, ``### Instruction:\\n{user}\\n\\n### Response:\\n``,
then the assistant's text and the end-of-sequence token (both trained), ``\\n\\n`` between turns.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

IGNORE_INDEX = -100  # label of a token that carries no loss (prompt, padding)
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
PLAIN_SYSTEM = "### System:\n{content}\n\n"
PLAIN_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
PLAIN_TURN_GAP = "\n\n"

# (name, keys as the error message lists them), in the order the keys are tried
FORMATS: Tuple[Tuple[str, str], ...] = (
    ("chat", "messages: [{role, content}] with roles system (optional), user, assistant"),
    ("sharegpt", "conversations: [{from, value}] with from system, human, gpt"),
    ("alpaca", "instruction, input (optional), output"),
    ("instruction/response", "instruction, input (optional), response"),
    ("prompt/completion", "prompt, completion"),
    ("text", "text"),
)
FORMAT_NAMES = tuple(name for name, _ in FORMATS)


class DataError(ValueError):
    """A data file that cannot be used; the message names the file (and the line) and what is wrong."""


class FormatError(DataError):
    """A line that fits no format, or a template that cannot be used; the message starts with ``where``."""


@dataclass
class Example:
    """One example of a data file: a conversation (``messages``) or a text (``text``)."""

    format: str
    messages: Optional[List[Dict[str, str]]] = None
    text: Optional[str] = None

    @property
    def is_text(self) -> bool:
        return self.text is not None


# ---------------------------------------------------------------------------------------- parsing

def formats_text() -> str:
    return "; ".join(f"{name} ({keys})" for name, keys in FORMATS)


def parse_line(line: str, where: str) -> Example:
    """The example of one JSONL line; ``where`` (``path:line``) starts the message of any error."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return parse_object(obj, where)


def parse_object(obj: dict, where: str, prompt_only: bool = False) -> Example:
    """The example of a JSON object. ``prompt_only``: a prompt to answer (for ``--sample-prompts``): the
    answer (``output``, ``response``, ``completion``, an assistant turn) may be missing."""
    system = _optional_string(obj, "system", where)
    head = [{"role": "system", "content": system}] if system else []
    if "messages" in obj:
        return Example("chat", _conversation(obj, "messages", "role", "content", None, where, head, prompt_only))
    if "conversations" in obj:
        return Example("sharegpt", _conversation(obj, "conversations", "from", "value", SHAREGPT_ROLES, where, head,
                                                 prompt_only))
    for name, prompt_key, answer_key in (("alpaca", "instruction", "output"),
                                         ("instruction/response", "instruction", "response"),
                                         ("prompt/completion", "prompt", "completion")):
        if prompt_key in obj and (answer_key in obj or prompt_only):
            prompt = _string(obj, prompt_key, where)
            extra = _optional_string(obj, "input", where) if prompt_key == "instruction" else None
            if extra:
                prompt = f"{prompt}\n\n{extra}"
            messages = head + [{"role": "user", "content": prompt}]
            if prompt_only:
                return Example(name, messages)
            answer = _string(obj, answer_key, where)
            if not answer:
                raise FormatError(f"{where}: {answer_key!r} is empty")
            return Example(name, messages + [{"role": "assistant", "content": answer}])
    if "text" in obj:
        text = _string(obj, "text", where)
        if not text:
            raise FormatError(f"{where}: 'text' is empty")
        return Example("text", text=text)
    raise FormatError(f"{where}: no known format for the keys {sorted(obj)}; the formats: {formats_text()}")


def _string(obj: dict, key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise FormatError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _optional_string(obj: dict, key: str, where: str) -> Optional[str]:
    return None if obj.get(key) is None else _string(obj, key, where)


def _conversation(obj: dict, key: str, role_key: str, content_key: str, roles: Optional[Dict[str, str]],
                  where: str, head: List[Dict[str, str]], prompt_only: bool = False) -> List[Dict[str, str]]:
    turns = obj[key]
    if not isinstance(turns, list) or not turns:
        raise FormatError(f"{where}: {key!r} must be a non-empty list of {{{role_key}, {content_key}}} objects")
    allowed = roles or {r: r for r in ROLES}
    messages = list(head)
    for i, turn in enumerate(turns):
        at = f"{where}: {key}[{i}]"
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            got = sorted(turn) if isinstance(turn, dict) else type(turn).__name__
            raise FormatError(f"{at}: expected an object with {role_key!r} and {content_key!r}, got {got}")
        role = turn[role_key]
        if role not in allowed:
            raise FormatError(f"{at}: {role_key!r} must be one of {', '.join(allowed)}, got {role!r}")
        content = _content(turn[content_key], f"{at}: {content_key!r}")
        if allowed[role] == "assistant" and not content and not prompt_only:
            raise FormatError(f"{at}: the assistant turn is empty")
        messages.append({"role": allowed[role], "content": content})
    if prompt_only:
        while messages and messages[-1]["role"] == "assistant":  # the answer to give is the model's
            messages.pop()
        if not messages:
            raise FormatError(f"{where}: {key!r} has no turn before the assistant's, nothing to answer")
    elif not any(m["role"] == "assistant" for m in messages):
        raise FormatError(f"{where}: {key!r} has no assistant turn, so nothing to train on")
    return messages


def _content(value, what: str) -> str:
    """A message's text: a string, or OpenAI's list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise FormatError(f"{what} must be a string (or a list of text parts), got {type(value).__name__}")


# ---------------------------------------------------------------------------------------- rendering

Segment = Tuple[str, bool, bool]  # (text, trained, first: tokenized with the tokenizer's special tokens)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def segments(tokenizer, example: Example, where: str = "data") -> Tuple[List[Segment], bool]:
    """The pieces of text of an example and whether each carries the loss; and whether the
    end-of-sequence token follows each trained piece (the plain template and text: yes)."""
    if example.is_text:
        return [(example.text, True, True)], True
    if has_chat_template(tokenizer):
        return _template_segments(tokenizer, example.messages, where), False
    return _plain_segments(example.messages), True


def _plain_segments(messages: Sequence[Dict[str, str]]) -> List[Segment]:
    out: List[Segment] = []
    context = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            out.append((context, False, not out))
            out.append((m["content"], True, False))
            context = PLAIN_TURN_GAP if i + 1 < len(messages) else ""
        elif m["role"] == "system":
            context += PLAIN_SYSTEM.format(content=m["content"])
        else:
            context += PLAIN_TEMPLATE.format(instruction=m["content"])
    if context:
        out.append((context, False, not out))
    return [s for s in out if s[0] or s[2]]


def render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def _template_segments(tokenizer, messages: Sequence[Dict[str, str]], where: str) -> List[Segment]:
    out: List[Segment] = []
    done = ""  # the text rendered so far
    try:
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = render(tokenizer, messages[:i], True) if i else _generation_prompt(tokenizer)
            through = render(tokenizer, messages[:i + 1], False)
            if not before.startswith(done) or not through.startswith(before):
                raise FormatError(f"{where}: the tokenizer's chat template does not write this conversation "
                                  f"turn by turn (the text before assistant turn {i} changes when the turn is "
                                  "added), so the assistant tokens cannot be found")
            turn = through[len(before):]
            kept = turn.rstrip()  # whitespace after the end-of-turn marker is context
            out += [(before[len(done):], False, False), (kept, True, False)]
            done = before + kept
        full = render(tokenizer, messages, False)
    except FormatError:
        raise
    except Exception as exc:  # jinja raises what the template says (e.g. roles must alternate)
        raise FormatError(f"{where}: the chat template refused this conversation: "
                          f"{' '.join(str(exc).split()) or type(exc).__name__}") from None
    if not full.startswith(done):
        raise FormatError(f"{where}: the tokenizer's chat template does not write this conversation turn by turn")
    out.append((full[len(done):], False, False))
    return [s for s in out if s[0]]


def _generation_prompt(tokenizer) -> str:
    """The template's text before an assistant turn that opens the conversation."""
    try:
        return render(tokenizer, [], True)
    except Exception:  # some templates refuse an empty conversation
        return ""


def prompt_text(tokenizer, messages: Sequence[Dict[str, str]]) -> Tuple[str, bool]:
    """The text a model is given to answer ``messages`` (which end with a user turn), and whether the
    tokenizer should add its special tokens (the plain template: yes; a chat template writes them)."""
    if has_chat_template(tokenizer):
        return render(tokenizer, messages, True), False
    text = "".join(PLAIN_SYSTEM.format(content=m["content"]) if m["role"] == "system"
                   else PLAIN_TEMPLATE.format(instruction=m["content"]) if m["role"] == "user"
                   else m["content"] + PLAIN_TURN_GAP for m in messages)
    return text, True


# ---------------------------------------------------------------------------------------- tokenizing

def _encode_many(tokenizer, texts: List[str], add_special_tokens: bool) -> List[List[int]]:
    if not texts:
        return []
    if not callable(tokenizer):  # the byte tokenizer
        return [tokenizer.encode(t, add_special_tokens=add_special_tokens) for t in texts]
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]  # one batched call


def encode_examples(tokenizer, examples: Sequence[Example], seq_len: int,
                    where: Sequence[str] = ()) -> List[Tuple[List[int], List[int]]]:
    """(input ids, labels) of each example, cut to ``seq_len``: labels are the ids on the trained
    pieces (followed by the end-of-sequence token where ``segments`` says so) and ``IGNORE_INDEX``
    elsewhere. ``where``: each example's ``path:line``, for the messages."""
    pieces = [segments(tokenizer, ex, where[i] if i < len(where) else "data") for i, ex in enumerate(examples)]
    flat = [seg for segs, _ in pieces for seg in segs]
    ids: List[Optional[List[int]]] = [None] * len(flat)
    for special in (True, False):  # a batched call per kind
        chosen = [i for i, seg in enumerate(flat) if seg[2] == special]
        for i, encoded in zip(chosen, _encode_many(tokenizer, [flat[i][0] for i in chosen], special)):
            ids[i] = list(encoded)
    eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    out, k = [], 0
    for segs, add_eos in pieces:
        x: List[int] = []
        y: List[int] = []
        for text, trained, _ in segs:
            piece = ids[k] + (eos if trained and add_eos else [])
            k += 1
            x += piece
            y += piece if trained else [IGNORE_INDEX] * len(piece)
        out.append((x[:seq_len], y[:seq_len]))
    return out
