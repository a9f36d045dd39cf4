import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cousins.run.corpus import Fields, format_of, parse_file, prompt_id_of


def jsonl(*lines) -> bytes:
    return b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n"


def test_prompt_id_is_a_stable_content_hash():
    m = [{"role": "user", "content": "What is 2 + 2?"}]
    # Pinned to the documented rule: sha256 of the compact JSON [[role, content], ...], 20 hex chars.
    expected = hashlib.sha256('[["user","What is 2 + 2?"]]'.encode()).hexdigest()[:20]
    assert prompt_id_of(m) == prompt_id_of([dict(x) for x in m]) == expected == "e2ab61dad2ab2a6821a0"
    assert prompt_id_of([{"role": "user", "content": "What is 2 + 3?"}]) != prompt_id_of(m)
    assert prompt_id_of([{"role": "system", "content": "be brief"}] + m) != prompt_id_of(m)


def test_plain_prompt_and_chat_rows():
    data = jsonl(
        json.dumps({"prompt": "hi", "category": "greet", "reference": 4}),
        json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}),
    )
    prompts, errors = parse_file(data, source="f.jsonl", fmt="jsonl", fields=Fields())
    assert errors == []
    assert prompts[0]["messages"] == [{"role": "user", "content": "hi"}]
    assert prompts[0]["category"] == "greet" and prompts[0]["reference"] == "4"
    assert prompts[1]["messages"][0] == {"role": "system", "content": "s"}
    assert [p["source_row"] for p in prompts] == [0, 1]


def test_every_bad_row_kind_becomes_an_error_row_and_counts_reconcile():
    data = jsonl(
        json.dumps({"prompt": "good one"}),
        '{"prompt": "unterminated',  # malformed JSON
        json.dumps({"text": "no prompt field"}),  # missing prompt
        json.dumps({"prompt": "   "}),  # empty prompt
        json.dumps({"prompt": 42}),  # wrong type
        json.dumps(["a", "list"]),  # not an object
        b'{"prompt": "bad bytes \xff\xfe"}',  # not UTF-8
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),  # bad role
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
        "",  # blank lines are not rows
        json.dumps({"prompt": "good two", "category": ["not", "a", "string"]}),  # bad category type
        json.dumps({"prompt": "good three"}),
    )
    prompts, errors = parse_file(data, source="f.jsonl", fmt="jsonl", fields=Fields())
    assert [p["messages"][0]["content"] for p in prompts] == ["good one", "good three"]
    reasons = [e["reason"] for e in errors]
    assert len(prompts) + len(errors) == 11
    assert reasons[0].startswith("malformed JSON")
    assert reasons[1] == "no 'prompt' field; available fields: ['text']"
    assert reasons[2] == "field 'prompt' is empty"
    assert reasons[3] == "field 'prompt' is a int, expected a string"
    assert reasons[4] == "row is a JSON list, expected an object"
    assert reasons[5].startswith("not valid UTF-8")
    assert "role 'robot'" in reasons[6]
    assert reasons[7] == "the last message must be a non-empty user message"
    assert reasons[8] == "field 'category' is a list, expected a string"
    assert [e["source_row"] for e in errors] == [1, 2, 3, 4, 5, 6, 7, 8, 10]
    assert all(e["source"] == "f.jsonl" and e["raw"] for e in errors)


def test_field_mapping_and_ids():
    fields = Fields(prompt="question", messages=None, id="qid", category="kind", reference="answer",
                    system_prompt="Be brief.")
    data = jsonl(json.dumps({"qid": 7, "question": "Q?", "kind": "k", "answer": "A"}),
                 json.dumps({"question": "no id"}))
    prompts, errors = parse_file(data, source="f", fmt="jsonl", fields=fields)
    assert prompts == [{"prompt_id": "7", "messages": [{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": "Q?"}],
                        "category": "k", "reference": "A", "choices": None, "checker": None, "source": "f", "source_row": 0}]
    assert errors[0]["reason"] == "field 'qid' (the id) is missing or empty"


def test_multiple_choice_rows_list_their_options_and_keep_them():
    """MMLU/ARC layout: question, choices, answer as an index (or a letter); CSV carries the list as JSON."""
    fields = Fields(prompt="question", messages=None, reference="answer")
    data = jsonl(json.dumps({"question": "Capital of France?", "choices": ["Paris", "Lyon", "Nice"], "answer": 0}),
                 json.dumps({"question": "Q", "choices": ["only one"], "answer": 0}),
                 json.dumps({"question": "Q", "choices": "not json", "answer": 0}))
    prompts, errors = parse_file(data, source="m", fmt="jsonl", fields=fields)
    assert prompts[0]["choices"] == ["Paris", "Lyon", "Nice"] and prompts[0]["reference"] == "0"
    assert prompts[0]["messages"][-1]["content"] == "Capital of France?\nA. Paris\nB. Lyon\nC. Nice\nAnswer:"
    assert [e["reason"] for e in errors] == ["field 'choices' must be a list of 2 to 26 option strings",
                                             "field 'choices' is not a JSON list of options: Expecting value"]
    csv = b'question,choices,answer\n"Capital?","[""Paris"", ""Lyon""]",B\n'
    prompts, errors = parse_file(csv, source="m.csv", fmt="csv", fields=fields)
    assert not errors and prompts[0]["choices"] == ["Paris", "Lyon"] and prompts[0]["reference"] == "B"


def test_csv_with_ragged_row_and_quoted_newlines():
    data = b'prompt,category\n"multi\nline",a\nshort\ntoo,many,fields\nplain,b\n'
    prompts, errors = parse_file(data, source="c.csv", fmt="csv", fields=Fields())
    assert [p["messages"][0]["content"] for p in prompts] == ["multi\nline", "plain"]
    assert [e["reason"] for e in errors] == ["row has 1 fields, the header has 2", "row has 3 fields, the header has 2"]


def test_csv_chat_messages_as_json_text():
    msgs = json.dumps([{"role": "user", "content": "hello"}]).replace('"', '""')
    data = f'messages,category\n"{msgs}",chat\n"not json",chat\n'.encode()
    prompts, errors = parse_file(data, source="c.csv", fmt="csv", fields=Fields())
    assert prompts[0]["messages"] == [{"role": "user", "content": "hello"}]
    assert errors[0]["reason"].startswith("field 'messages' is not a JSON list of messages")


def test_parquet_rows_and_an_unreadable_file():
    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["a", None, "c"], "category": ["x", "y", None]}), buf)
    prompts, errors = parse_file(buf.getvalue(), source="p.parquet", fmt="parquet", fields=Fields())
    assert [p["messages"][0]["content"] for p in prompts] == ["a", "c"]
    assert errors[0]["source_row"] == 1 and "expected a string" in errors[0]["reason"]
    prompts, errors = parse_file(b"not parquet at all", source="bad.parquet", fmt="parquet", fields=Fields())
    assert prompts == [] and errors[0]["reason"].startswith("unreadable Parquet file")


def test_format_of():
    assert format_of("x/a.JSONL") == "jsonl" and format_of("a.csv") == "csv" and format_of("a.parquet") == "parquet"
    assert format_of("a.txt", "jsonl") == "jsonl"
    with pytest.raises(ValueError, match="set corpus.format"):
        format_of("a.txt")


@pytest.mark.parametrize("preset,row,output,correct", [
    ("gsm8k", {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
               "answer": "In May she sold 48/2 = 24.\nIn all 48+24 = 72.\n#### 72"},
     "She sold 48/2 = 24 in May, so 48 + 24 = 72. The answer is 72.", True),
    ("gsm8k", {"question": "q", "answer": "#### 72"}, "48 + 24 = 72, so the answer is 73", False),
    ("math", {"problem": "What is 1/2 + 1/4?", "type": "Prealgebra", "solution": "It is $\\boxed{\\frac{3}{4}}$."},
     "Adding, we get \\boxed{0.75}", True),
    ("mmlu", {"question": "Capital of France?", "choices": ["Lyon", "Paris", "Nice", "Lille"], "answer": 1,
              "subject": "geography"}, "The answer is (B).", True),
    ("mmlu", {"question": "Capital of France?", "choices": ["Lyon", "Paris", "Nice", "Lille"], "answer": 1,
              "subject": "geography"}, "The answer is (A) since B is a trap", False),
])
def test_the_corpus_presets_read_the_common_layouts_and_auto_judges_them(preset, row, output, correct, tmp_path):
    from conftest import compose
    from cousins.contract.config import to_config
    from cousins.drift.answers import judge

    cfg = to_config(compose(f"corpus={preset}", f"corpus.path={tmp_path / 'c.jsonl'}"))
    prompts, errors = parse_file(jsonl(json.dumps(row)), source="c.jsonl", fmt="jsonl", fields=cfg.corpus.fields)
    assert not errors and len(prompts) == 1
    p = prompts[0]
    assert judge(output, p["reference"], "auto", p["choices"]).correct is correct
    if preset == "mmlu":
        assert p["messages"][-1]["content"].endswith("B. Paris\nC. Nice\nD. Lille\nAnswer:") and p["category"] == "geography"


def test_a_preset_without_its_path_is_a_config_error_naming_the_key():
    from conftest import compose
    from cousins.contract.config import ConfigError, to_config

    with pytest.raises(ConfigError, match=r"corpus.path: no value; set it on the command line \(corpus.path=...\)"):
        to_config(compose("corpus=gsm8k"))


def test_a_rows_checker_column_is_kept_and_an_unknown_one_is_an_error_row():
    data = jsonl(json.dumps({"prompt": "Q1", "reference": "4", "checker": "math"}),
                 json.dumps({"prompt": "Q2", "reference": "4", "checker": "vibes"}),
                 json.dumps({"prompt": "Q3", "reference": "4"}))
    prompts, errors = parse_file(data, source="f", fmt="jsonl", fields=Fields())
    assert [p["checker"] for p in prompts] == ["math", None]
    assert len(errors) == 1 and "answer checker 'vibes'" in errors[0]["reason"] and errors[0]["source_row"] == 1
