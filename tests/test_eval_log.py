"""kvcli.eval.log: the progress log's header, refusing a log written for another model or settings, and each sample's row check.

That run_eval checks every resumed sample's row (and so refuses other data) is tested in test_evaluate.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from kvcli.errors import InputError
from kvcli.eval.data import Row, row_hash
from kvcli.eval.log import check_row, drop_half_line, log_header, log_path, read_log, resume_log
from kvcli.methods import make_method

ROWS = [Row("0", "The cat sat on the mat.", "Who sat?", ["the cat"]), Row("1", "It rained all day.", "What happened?", ["rain"])]
# The same ids (line numbers, as for rows without _id) over other lines.
OTHER_ROWS = [Row("0", "The dog sat on the rug.", "Who sat?", ["the dog"]), Row("1", "It snowed all day.", "What happened?", ["snow"])]


def full_samples(rows: list[Row]) -> list[dict]:
    return [
        {"id": row.id, "method": "full", "budget": None, "ratio": None, "mode": "query", "chunk_size": None,
         "prediction": f"logged answer {row.id}", "score": 0.0, "compressed": False, "row_hash": row_hash(row)}
        for row in rows
    ]


def write_log(path, header: dict, samples: list[dict]):
    path.write_text("".join(json.dumps(record) + "\n" for record in [header, *samples]))
    return path


def header_for(**changes) -> dict:
    args = dict(model_name="stub", config_hash="c0", methods=[make_method("full")], max_new_tokens=4, template=None, max_context=None)
    return log_header(**{**args, **changes})


def test_log_header_records_what_predictions_depend_on():
    """The header holds the model, its config hash, answer length, template, context limit, how a row past it is read, and each method's knobs, and no data hash."""
    snapkv = make_method("snapkv")
    header = log_header("qwen", "abc", [make_method("full"), snapkv], 64, "{context} Q: {input}", 4096)
    assert header == {
        "kvcli_eval": 1, "model": "qwen", "config_hash": "abc", "max_new_tokens": 64, "template": "{context} Q: {input}",
        "max_context": 4096, "fit": "reindex", "methods": {"full": make_method("full").params(), "snapkv": snapkv.params()},
    }


def test_log_is_reused_whatever_rows_it_holds(tmp_path):
    """A log with this header gives back its samples by (id, setting), whichever rows they came from, and is left as it was."""
    samples = full_samples(ROWS[:1]) + full_samples(OTHER_ROWS[1:])
    out = write_log(tmp_path / "log.jsonl", header_for(), samples)
    before = out.read_text()
    done = resume_log(out, header_for())
    assert done == {(s["id"], "full", None, None, "query", None): s for s in samples}
    assert out.read_text() == before


def test_check_row_passes_a_sample_of_the_same_row():
    """A sample whose row_hash is its row's passes check_row."""
    for sample, row in zip(full_samples(ROWS), ROWS):
        check_row(Path("log.jsonl"), sample, row_hash(row))


@pytest.mark.parametrize("written_for", ["other-row", "no-row-hash"])
def test_check_row_refuses_another_row_in_one_line(written_for):
    """A sample read from another row under the same id, or with no row_hash (a log from before), is refused in one line naming the log and the row."""
    sample = full_samples(OTHER_ROWS)[1]
    if written_for == "no-row-hash":
        sample = full_samples(ROWS)[1]
        del sample["row_hash"]
    with pytest.raises(InputError, match="read from other data") as info:
        check_row(Path("out/q.json.partial.jsonl"), sample, row_hash(ROWS[1]))
    message = str(info.value)
    assert "\n" not in message and "out/q.json.partial.jsonl" in message and "row '1'" in message
    assert message.endswith("delete it or write to another --output file")


def test_every_header_in_the_log_is_checked(tmp_path):
    """A later header with these settings does not hide an earlier one written with others."""
    out = tmp_path / "log.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in [header_for(max_new_tokens=8), header_for(), *full_samples(ROWS)]))
    with pytest.raises(InputError, match="max_new_tokens=8"):
        read_log(out, header_for())


@pytest.mark.parametrize(
    "changes, word",
    [({"model_name": "other"}, "model="), ({"max_new_tokens": 8}, "max_new_tokens="), ({"template": "{context} Q"}, "template="),
     ({"max_context": 100}, "max_context="), ({"config_hash": "c1"}, "config_hash=")],
)
def test_other_settings_are_refused_by_name(tmp_path, changes, word):
    """A log written with another model or answer settings is refused with a message naming the setting."""
    out = write_log(tmp_path / "log.jsonl", header_for(), full_samples(ROWS))
    with pytest.raises(InputError, match=word):
        read_log(out, header_for(**changes))


def test_other_method_parameters_are_refused(tmp_path):
    """A log written with other knobs for a method this run also has is refused, naming the method; a new method is fine."""
    snapkv = make_method("snapkv")
    out = write_log(tmp_path / "log.jsonl", header_for(methods=[make_method("full"), snapkv]), full_samples(ROWS))
    with pytest.raises(InputError, match="snapkv parameters"):
        read_log(out, header_for(methods=[make_method("full"), dataclasses.replace(snapkv, window_size=4)]))
    read_log(out, header_for(methods=[make_method("full"), snapkv, make_method("h2o")]))


def test_resume_cuts_a_half_line_and_records_a_new_header_once(tmp_path):
    """resume_log drops a half-written last line, appends the header only when it differs from the last one, and returns the samples."""
    out = tmp_path / "log.jsonl"
    samples = full_samples(ROWS)
    out.write_text(json.dumps(header_for()) + "\n" + json.dumps(samples[0]) + '\n{"id": "1", "meth')
    done = resume_log(out, header_for())
    assert list(done.values()) == [samples[0]]
    assert out.read_text().splitlines() == [json.dumps(header_for()), json.dumps(samples[0])]
    snapkv = header_for(methods=[make_method("full"), make_method("snapkv")])
    resume_log(out, snapkv)
    resume_log(out, snapkv)
    assert [json.loads(line) for line in out.read_text().splitlines()] == [header_for(), samples[0], snapkv]


def test_drop_half_line_and_log_path(tmp_path):
    """drop_half_line leaves a missing or whole file as it is, and the log sits beside the --output file."""
    drop_half_line(tmp_path / "missing.jsonl")
    assert not (tmp_path / "missing.jsonl").exists()
    whole = tmp_path / "whole.jsonl"
    whole.write_text('{"a": 1}\n')
    drop_half_line(whole)
    assert whole.read_text() == '{"a": 1}\n'
    assert log_path("out/q.json") == Path("out/q.json.partial.jsonl")
