import pyarrow as pa
import pytest

from cousins.contract import schema


def test_generation_columns_are_typed_not_pickled():
    s = schema.GENERATIONS
    assert s.field("output_token_ids").type == pa.list_(pa.int32())
    assert s.field("topk_token_ids").type == pa.list_(pa.list_(pa.int32()))
    assert s.field("topk_logprobs").type == pa.list_(pa.list_(pa.float32()))
    assert s.field("output_logprobs").type == pa.list_(pa.float32())
    for f in s:  # nothing falls back to Python objects
        assert not isinstance(f.type, pa.ExtensionType), f.name


def test_row_key_columns_exist_and_are_required():
    for name in schema.ROW_KEY:
        assert not schema.GENERATIONS.field(name).nullable


def test_conform_casts_and_orders():
    t = pa.table({"reason": ["x"], "source_row": pa.array([3], pa.int32()), "source": ["f"], "raw": [None]})
    out = schema.conform(t, schema.ERRORS)
    assert out.schema == schema.ERRORS
    assert out.column("source_row").to_pylist() == [3]


def test_conform_names_missing_and_extra_columns():
    t = pa.table({"source": ["f"], "bogus": [1]})
    with pytest.raises(ValueError, match=r"missing columns \['source_row', 'reason', 'raw'\], unexpected \['bogus'\]"):
        schema.conform(t, schema.ERRORS)
