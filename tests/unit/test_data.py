"""Tests for minidistill.data (instruction data, SFT tokenization, text corpora)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_tokenizer import make_tokenizer  # noqa: E402

from minidistill.data import (  # noqa: E402
    IGNORE_INDEX,
    Example,
    collate_prompts,
    collate_sft,
    corpus_fingerprint,
    load_instructions,
    load_texts,
    pack_blocks,
    render_alpaca,
    render_prompt,
    split_blocks,
    split_documents,
    tokenize_prompts,
    tokenize_sft,
)
from minidistill.errors import UserError  # noqa: E402

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nName a colour.\n\n### Response:\n"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nSummarise.\n\n### Input:\nThe sky is blue.\n\n### Response:\n"
)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def tok_bos():
    return make_tokenizer(add_bos=True)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------ rendering


def test_render_alpaca_exact_text():
    assert render_prompt(Example("Name a colour.", "", ["Red."]), "alpaca") == ALPACA_NO_INPUT
    assert render_prompt(Example("Summarise.", "The sky is blue.", ["Blue sky."]), "alpaca") == ALPACA_INPUT
    assert render_alpaca("Summarise.", "The sky is blue.") == ALPACA_INPUT


def test_render_uses_prerendered_prompt_for_alpaca_only(tok):
    ex = Example("Name a colour.", "", ["Red."], prompt="CUSTOM PROMPT\n")
    assert render_prompt(ex, "alpaca") == "CUSTOM PROMPT\n"
    assert render_prompt(ex, "chat", tok) == "<|user|>\nName a colour.\n<|assistant|>\n"


def test_render_chat_from_instruction_and_input(tok):
    ex = Example("Summarise.", "The sky is blue.", ["Blue sky."])
    assert render_prompt(ex, "chat", tok) == "<|user|>\nSummarise.\n\nThe sky is blue.\n<|assistant|>\n"


def test_render_errors(tok):
    with pytest.raises(UserError, match="unknown template 'vicuna'"):
        render_prompt(Example("a", "", ["b"]), "vicuna")
    with pytest.raises(UserError, match="no chat_template"):
        render_prompt(Example("a", "", ["b"]), "chat", make_tokenizer(chat_template=False))


# ------------------------------------------------------------------ loading


def test_load_formats(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"instruction": "Summarise.", "input": "The sky is blue.", "output": "Blue sky."},
            {"instruction": "Say hi.", "context": "", "response": "Hi."},
            {"instruction": "Title it.", "input": "x", "output": ["First ref", "Second ref"]},
            "",  # blank lines are skipped
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "What is 2+2?"},
                    {"role": "assistant", "content": "4"},
                    {"role": "user", "content": "And 3+3?"},
                    {"role": "assistant", "content": "6"},
                ]
            },
            {
                "instruction": "Antonym?",
                "instances": [{"input": "hot", "output": "cold"}, {"input": "up", "output": "down"}],
            },
        ],
    )
    exs = load_instructions(path)
    assert len(exs) == 6
    assert exs[0].outputs == ["Blue sky."] and exs[0].input == "The sky is blue." and exs[0].prompt is None
    assert exs[1].outputs == ["Hi."] and exs[1].input == ""
    assert exs[2].outputs == ["First ref", "Second ref"] and exs[2].response == "First ref"
    chat = exs[3]
    assert chat.outputs == ["6"]
    assert chat.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    assert chat.instruction == "And 3+3?"
    assert render_prompt(chat, "chat", tok) == (
        "<|system|>\nBe brief.\n<|user|>\nWhat is 2+2?\n<|assistant|>\n4\n<|user|>\nAnd 3+3?\n<|assistant|>\n"
    )
    assert [(e.input, e.outputs) for e in exs[4:]] == [("hot", ["cold"]), ("up", ["down"])]
    assert exs[0].source.endswith("mixed.jsonl:1") and chat.source.endswith("mixed.jsonl:5")


def test_load_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]))
    assert [e.response for e in load_instructions(path)] == ["b", "d"]
    path.write_text(json.dumps({"instruction": "a", "output": "b"}))
    with pytest.raises(UserError, match=r"d\.json: expected a JSON list of records, got an object"):
        load_instructions(path)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"instruction": "a", "output": "b"', r"bad\.jsonl:2: not valid JSON \(Expecting ',' delimiter"),
        ('{"instruction": "a", "input": "x"}', r"bad\.jsonl:2: record has no 'output' or 'response' field"),
        ('{"instruction": "a", "output": 3}', r"bad\.jsonl:2: field 'output' must be a string or a non-empty list"),
        (
            '{"messages": [{"role": "user", "content": "hi"}]}',
            r"bad\.jsonl:2: 'messages' must end with an assistant turn",
        ),
        ("[1, 2]", r"bad\.jsonl:2: expected a JSON object"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "ok", "output": "ok"}, line])
    with pytest.raises(UserError, match=message) as info:
        load_instructions(path)
    assert "\n" not in str(info.value)


def test_missing_sources(tmp_path):
    with pytest.raises(UserError, match=r"nope\.jsonl: file not found"):
        load_instructions(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="file not found"):
        load_instructions(str(tmp_path / "no" / "such" / "dir"))
    with pytest.raises(UserError, match="no instruction records"):
        load_instructions(write_jsonl(tmp_path / "empty.jsonl", [""]))


def test_hub_names_go_to_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        if name == "owner/broken":
            raise FileNotFoundError("Couldn't find dataset owner/broken on the Hub\nmore details")
        return [{"instruction": "Say hi", "context": "", "response": "hi"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    exs = load_instructions("owner/dolly", split="train")
    assert calls == [("owner/dolly", "train")] and exs[0].outputs == ["hi"]
    assert exs[0].source == "owner/dolly[train]#0"
    with pytest.raises(UserError, match=r"^owner/broken: not a local file and could not be loaded .*Couldn't find"):
        load_instructions("owner/broken")


# ------------------------------------------------------------------ SFT tokenization


def check_row(row, tok, prompt: str, response: str, eos: int, bos: list[int]):
    p = row["prompt_length"]
    ids, labels = row["input_ids"], row["labels"]
    assert ids[:p] == bos + ids_of(tok, prompt)
    assert labels[:p] == [IGNORE_INDEX] * p
    assert labels[p:] == ids[p:]
    assert ids[p:] == ids_of(tok, response) + [eos]
    assert IGNORE_INDEX not in labels[p:]


@pytest.mark.parametrize("add_bos", [False, True])
def test_sft_mask_exactly_on_prompt(add_bos):
    tok = make_tokenizer(add_bos=add_bos)
    bos = [tok.bos_token_id] if add_bos else []
    exs = [Example("Name a colour.", "", ["Red."]), Example("Summarise.", "The sky is blue.", ["Blue sky.", "other"])]
    rows, stats = tokenize_sft(exs, tok, template="alpaca", max_prompt_length=256, max_length=512)
    assert stats.n_kept == 2 and stats.kept_indices == [0, 1]
    check_row(rows[0], tok, ALPACA_NO_INPUT, "Red.", tok.eos_token_id, bos)
    check_row(rows[1], tok, ALPACA_INPUT, "Blue sky.", tok.eos_token_id, bos)
    assert rows[0]["input_ids"].count(tok.bos_token_id) == (1 if add_bos else 0)  # BOS never doubled
    assert rows[0]["input_ids"].count(tok.eos_token_id) == 1  # EOS only at the end


def test_sft_chat_template(tok):
    exs = [Example("Hi", "", ["Hello!"], messages=[{"role": "user", "content": "Hi"}])]
    rows, _ = tokenize_sft(exs, tok, template="chat", max_prompt_length=64, max_length=128)
    check_row(rows[0], tok, "<|user|>\nHi\n<|assistant|>\n", "Hello!", tok.eos_token_id, [])


def test_long_prompts_drop_and_truncate(tok_bos):
    tok = tok_bos
    short = Example("Hi", "", ["Yo"], prompt="Q: hi\nA:")  # 1 + 8 tokens
    long = Example("x", "", ["ok"], prompt="x" * 40 + "\nA:")  # 1 + 43 tokens
    exs = [short, long, long]
    rows, stats = tokenize_sft(exs, tok, max_prompt_length=20, max_length=30, long_prompt="drop")
    assert (stats.n_kept, stats.n_dropped_long_prompt, stats.kept_indices) == (1, 2, [0])
    assert len(rows) == 1

    rows, stats = tokenize_sft(exs, tok, max_prompt_length=20, max_length=30, long_prompt="truncate")
    assert (stats.n_kept, stats.n_truncated_prompt, stats.n_dropped_long_prompt) == (3, 2, 0)
    row = rows[1]
    assert row["prompt_length"] == 20
    assert row["input_ids"][0] == tok.bos_token_id  # BOS kept, the end of the prompt kept
    assert tok.decode(row["input_ids"][1:20]) == "x" * 16 + "\nA:"
    assert row["labels"][20:] == ids_of(tok, "ok") + [tok.eos_token_id]


def test_response_truncated_to_max_length(tok):
    exs = [Example("i", "", ["a" * 50], prompt="P:")]
    rows, stats = tokenize_sft(exs, tok, max_prompt_length=8, max_length=12)
    assert stats.n_truncated_response == 1
    assert len(rows[0]["input_ids"]) == 12 and rows[0]["prompt_length"] == 2
    assert rows[0]["labels"][2:] == ids_of(tok, "a" * 10)  # cut response: no EOS


def test_cut_off_response_gets_no_eos(tok):
    """A teacher answer cut at max_new_tokens (``complete=False``) must not teach the student to
    stop there; a complete one ends with EOS as its last label."""
    exs = [Example("i", "", ["cut off mid"], prompt="P:", complete=False), Example("i", "", ["done."], prompt="P:")]
    rows, stats = tokenize_sft(exs, tok, max_prompt_length=8, max_length=64)
    assert stats.n_kept == 2
    assert rows[0]["labels"][2:] == ids_of(tok, "cut off mid") and tok.eos_token_id not in rows[0]["input_ids"]
    assert rows[1]["labels"][2:] == ids_of(tok, "done.") + [tok.eos_token_id]


def test_nothing_left_names_file_count_and_limit(tmp_path, tok):
    path = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "z" * 50, "output": "k"}] * 3)
    exs = load_instructions(path)
    with pytest.raises(UserError, match=r"long\.jsonl: all 3 examples dropped.*max_prompt_length=16"):
        tokenize_sft(exs, tok, max_prompt_length=16, max_length=32)
    with pytest.raises(UserError, match="max_length: must be greater than max_prompt_length"):
        tokenize_sft(exs, tok, max_prompt_length=16, max_length=16)
    with pytest.raises(UserError, match="long_prompt: unknown policy 'skip'"):
        tokenize_sft(exs, tok, max_prompt_length=16, max_length=32, long_prompt="skip")


def test_tokenize_prompts(tok):
    exs = [Example("a", "", ["r1", "r2"], prompt="short"), Example("b", "", ["r3"], prompt="y" * 30)]
    ids, refs, stats = tokenize_prompts(exs, tok, max_prompt_length=10, long_prompt="drop")
    assert ids == [ids_of(tok, "short")] and refs == [["r1", "r2"]] and stats.kept_indices == [0]
    ids, refs, stats = tokenize_prompts(exs, tok, max_prompt_length=10, long_prompt="truncate")
    assert ids[1] == ids_of(tok, "y" * 10) and refs[1] == ["r3"] and stats.n_truncated_prompt == 1


# ------------------------------------------------------------------ collation


def test_collate_sft_right_pads():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate_sft(rows, pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_prompts_left_pads():
    ids, mask = collate_prompts([[5, 6, 7], [8]], pad_id=1)
    assert ids.tolist() == [[5, 6, 7], [1, 1, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


# ------------------------------------------------------------------ text corpora


def test_split_documents_rule():
    assert split_documents("a b\nc\n\nd\n  \n\ne f\n") == ["a b\nc", "d", "e f"]
    assert split_documents("one\ntwo\r\nthree\n") == ["one", "two", "three"]  # no blank line: one per line
    assert split_documents("\n\n") == []


def test_load_texts_files_dirs_globs(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("p1 l1\np1 l2\n\np2\n")
    (d / "b.jsonl").write_text('{"text": "doc b1"}\n\n{"text": "doc b2"}\n')
    (d / "ignored.bin").write_bytes(b"\x00")
    assert list(load_texts(d)) == ["p1 l1\np1 l2", "p2", "doc b1", "doc b2"]
    assert list(load_texts(str(d / "*.jsonl"))) == ["doc b1", "doc b2"]
    texts = load_texts([d / "b.jsonl", d / "a.txt"])
    assert list(texts) == ["doc b1", "doc b2", "p1 l1\np1 l2", "p2"]
    assert texts.sources == [str(d / "b.jsonl"), str(d / "a.txt")]


def test_load_texts_errors(tmp_path):
    with pytest.raises(UserError, match=r"missing\.txt: file not found"):
        load_texts(tmp_path / "missing.txt")
    with pytest.raises(UserError, match="no files match"):
        load_texts(str(tmp_path / "*.txt"))
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "oops"}\n')
    with pytest.raises(UserError, match=r"c\.jsonl:2: record has no 'text' field"):
        load_texts(bad)
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(UserError, match=r"c\.jsonl:2: not valid JSON"):
        load_texts(bad)


def test_pack_blocks_count_and_eos(tok):
    eos = tok.eos_token_id
    a, b, c, d, e = (ids_of(tok, ch)[0] for ch in "abcde")
    blocks = pack_blocks(["abc", "de"], tok, 3)  # stream: a b c EOS d e EOS -> 2 full blocks
    assert blocks.dtype == torch.long
    assert blocks.tolist() == [[a, b, c], [eos, d, e]]
    blocks = pack_blocks(["abc", "de"] * 10, tok, 7)  # 70 tokens -> 10 blocks, each one doc pair
    assert blocks.shape == (10, 7)
    assert (blocks[:, 3] == eos).all() and (blocks[:, 6] == eos).all()


def test_pack_blocks_no_eos_after_a_cut_document(tok):
    from minidistill.data import TextList

    eos = tok.eos_token_id
    a, b, c, d, e = (ids_of(tok, ch)[0] for ch in "abcde")
    texts = TextList(["abc", "de", "a"], ["<gen>"], complete=[False, True, True])
    blocks = pack_blocks(texts, tok, 4)  # stream: a b c d e EOS a EOS (no EOS where "abc" was cut)
    assert blocks.tolist() == [[a, b, c, d], [e, eos, a, eos]]
    with pytest.raises(ValueError, match="complete flags"):
        TextList(["abc"], ["<gen>"], complete=[True, False])


def test_pack_blocks_bos_tokenizer(tok_bos):
    blocks = pack_blocks(["ab", "c"], tok_bos, 3)
    bos, eos = tok_bos.bos_token_id, tok_bos.eos_token_id
    assert blocks[0].tolist()[0] == bos and blocks[0].tolist().count(bos) == 1
    assert blocks.flatten().tolist().count(eos) == 1  # stream: BOS a b EOS BOS c EOS


def test_corpus_too_short(tmp_path, tok):
    path = tmp_path / "tiny.txt"
    path.write_text("hello\n")
    texts = load_texts(path)
    with pytest.raises(UserError, match=r"tiny\.txt: corpus has 6 tokens, fewer than one block of block_len=64"):
        pack_blocks(texts, tok, 64)


def test_fingerprint_and_split():
    blocks = torch.arange(20 * 4).reshape(20, 4)
    fp = corpus_fingerprint(blocks)
    assert len(fp) == 16 and fp == corpus_fingerprint(blocks.clone())
    assert fp != corpus_fingerprint(blocks.reshape(40, 2))
    changed = blocks.clone()
    changed[3, 1] += 1
    assert fp != corpus_fingerprint(changed)

    train, valid = split_blocks(blocks, n_valid=5, seed=1)
    train2, valid2 = split_blocks(blocks, n_valid=5, seed=1)
    assert torch.equal(train, train2) and torch.equal(valid, valid2)
    assert train.shape == (15, 4) and valid.shape == (5, 4)
    rows = {tuple(r) for r in train.tolist()} | {tuple(r) for r in valid.tolist()}
    assert len(rows) == 20
    assert not torch.equal(valid, split_blocks(blocks, n_valid=5, seed=2)[1])
    assert split_blocks(blocks, valid_fraction=0.1, seed=0)[1].shape == (2, 4)
    with pytest.raises(UserError, match="cannot hold out 20 of 20"):
        split_blocks(blocks, n_valid=20)


# ------------------------------------------------------------------ shared data (skipped when absent)


def shared(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"shared data not present: {path}")
    return path


def test_shared_dolly_dev_prompts_match_renderer():
    exs = load_instructions(shared("instruct/dolly_dev.jsonl"))
    assert len(exs) == 1000
    assert all(e.prompt is not None for e in exs)
    assert all(e.prompt == render_alpaca(e.instruction, e.input) for e in exs)
    assert any(e.input for e in exs) and any(not e.input for e in exs)


def test_shared_sinst_has_reference_lists():
    exs = load_instructions(shared("instruct/sinst_test.jsonl"))
    assert len(exs) == 1694
    assert max(len(e.outputs) for e in exs) > 1
    assert all(e.prompt == render_alpaca(e.instruction, e.input) for e in exs)


def test_shared_corpus_document_rule():
    assert len(load_texts(shared("corpus/wiki_demo.txt"))) == 30  # one article per line
    speeches = load_texts(shared("corpus/tinyshakespeare.txt"))  # blank-line-separated speeches
    assert len(speeches) == 7222 and speeches[0].startswith("First Citizen:\nBefore we proceed")
    assert len(load_texts(shared("corpus/c4_demo.jsonl"))) == 300
