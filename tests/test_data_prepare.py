"""prepare_dataset end to end: decode-back, dedup, decontamination, mixtures, sources, restarts.

Uses the real BPE tokenizer (a tiny 300-id one trained once per session) and documents cut
from the shared Austen corpus, so the rules see real prose.
"""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.data.dedup import MinHashConfig, MinHasher, jaccard
from scratchlm.data.filters import FilterConfig, check_document, normalize_text
from scratchlm.data.shards import Dataset, prepare_dataset
from scratchlm.errors import UserError


@pytest.fixture(scope="session")
def austen_text(corpora_dir):
    with open(corpora_dir / "austen.jsonl", encoding="utf-8") as f:
        return json.loads(f.readline())["text"]


@pytest.fixture(scope="session")
def tokenizer(austen_text):
    from scratchlm.tokenizer import BPETokenizer

    return BPETokenizer.train([austen_text[:60_000]], 300, progress=False, workers=1)


@pytest.fixture(scope="session")
def prose_docs(austen_text):
    """~120 distinct documents of ~150 words: consecutive paragraphs of Emma."""
    paragraphs = [p.strip() for p in austen_text.split("\n\n") if len(p.split()) > 20]
    docs, current = [], []
    for p in paragraphs:
        current.append(p)
        if sum(len(x.split()) for x in current) >= 150:
            docs.append("\n\n".join(current))
            current = []
        if len(docs) == 120:
            break
    return docs


def write_jsonl(path, texts, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def decoded_docs(dataset, tokenizer, split):
    return [tokenizer.decode(ids.tolist()) for ids in dataset.iter_documents(split)]


def prepare(inputs, tokenizer, out, **kwargs):
    kwargs.setdefault("workers", 1)
    kwargs.setdefault("progress", False)
    return prepare_dataset(inputs, tokenizer, out, **kwargs)


def test_shards_decode_back_to_the_kept_documents(tmp_path, tokenizer, prose_docs):
    docs = prose_docs[:40] + ["Caf\u0065\u0301 au lait\r\nis served.\r\n" + prose_docs[41]]
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    ds = prepare(src, tokenizer, tmp_path / "out", filters="none", dedup="none",
                 val_fraction=0.25, shard_tokens=1000)
    expected = [normalize_text(d) for d in docs]
    train, val = decoded_docs(ds, tokenizer, "train"), decoded_docs(ds, tokenizer, "val")
    # Each split holds its documents in input order, and together they are all the documents.
    assert sorted(train + val) == sorted(expected)
    assert train == [d for d in expected if d in set(train)]
    assert 0 < len(val) < len(train)
    assert "Café au lait\nis served." in "".join(train + val)  # NFC and \n line endings
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["vocab_size"] == 300 and index["eot_id"] == tokenizer.eot_id
    assert index["tokenizer_sha256"] == tokenizer.fingerprint and index["dtype"] == "uint16"
    assert sum(s["tokens"] for s in index["shards"]) == sum(v["tokens"] for v in index["splits"].values())
    # Readable with numpy alone: raw little-endian uint16, documents split at eot_id.
    raw = np.concatenate([np.fromfile(tmp_path / "out" / s["file"], dtype="<u2")
                          for s in index["shards"] if s["split"] == "train"])
    assert int((raw == index["eot_id"]).sum()) == len(train)


def test_workers_do_not_change_the_result(tmp_path, tokenizer, prose_docs):
    src = write_jsonl(tmp_path / "in.jsonl", prose_docs[:60] + prose_docs[:5])
    one = prepare(src, tokenizer, tmp_path / "one", val_fraction=0.2, shard_tokens=5000)
    two = prepare(src, tokenizer, tmp_path / "two", val_fraction=0.2, shard_tokens=5000,
                  workers=2, dedup="exact")
    assert [s["sha256"] for s in one.index["shards"]] == [s["sha256"] for s in two.index["shards"]]
    assert one.index["stats"]["dedup"]["exact"]["docs"] == 5


def perturb(text, fraction, rng):
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(len(words) * fraction))):
        words[i] = "zq" + words[i][::-1]
    return " ".join(words)


def test_dedup_removes_planted_exact_and_near_duplicates(tmp_path, tokenizer, prose_docs):
    rng = random.Random(0)
    distinct = prose_docs[:80]
    near = [perturb(d, 0.05, rng) for d in distinct[:20]]
    exact = distinct[20:30]
    src = write_jsonl(tmp_path / "in.jsonl", distinct + near + exact)
    ds = prepare(src, tokenizer, tmp_path / "out", dedup="minhash", filters="none",
                 val_fraction=0, removed_dir=tmp_path / "removed")
    kept = decoded_docs(ds, tokenizer, "train")
    assert kept == distinct  # every distinct document kept, in order; every copy removed
    stats = ds.index["stats"]["dedup"]
    assert stats["exact"]["docs"] == 10 and stats["minhash"]["docs"] == 20
    removed = [json.loads(line) for line in (tmp_path / "removed" / "dedup.jsonl").open()]
    assert sorted(r["text"] for r in removed) == sorted(near + exact)
    # exact mode keeps the near-duplicates
    ds = prepare(src, tokenizer, tmp_path / "exact", dedup="exact", filters="none", val_fraction=0)
    assert ds.num_docs("train") == 100


def test_minhash_estimates_jaccard_and_follows_the_s_curve(prose_docs):
    config = MinHashConfig(ngram=3, bands=16, rows=8)
    hasher = MinHasher(config)
    rng = random.Random(1)
    for doc in prose_docs[:12]:
        variant = perturb(doc, rng.choice([0.05, 0.2, 0.5]), rng)
        exact = jaccard(doc, variant, ngram=3)
        estimate = float(np.mean(hasher.signature(doc) == hasher.signature(variant)))
        sigma = (exact * (1 - exact) / config.num_perm) ** 0.5
        assert abs(estimate - exact) <= 4 * sigma + 1e-9
    # the documented recall table
    default = MinHashConfig()
    assert default.candidate_probability(0.63) > 0.98
    assert default.candidate_probability(0.2) < 0.06
    assert 1 - (1 - 0.5**4) ** 32 == pytest.approx(default.candidate_probability(0.5))


def test_decontamination_catches_a_planted_benchmark_question(tmp_path, tokenizer, prose_docs,
                                                             eval_dir):
    record = json.loads((eval_dir / "small" / "mmlu_small.jsonl").open().readline())
    planted = prose_docs[3] + "\n\n" + record["query"] + "\n\n" + prose_docs[4]
    src = write_jsonl(tmp_path / "in.jsonl", prose_docs[:3] + [planted] + prose_docs[5:10])
    evals = [str(eval_dir / "small" / "mmlu_small.jsonl"), str(eval_dir / "small" / "piqa_small.jsonl")]
    ds = prepare(src, tokenizer, tmp_path / "drop", decontaminate=evals, val_fraction=0)
    report = ds.index["stats"]["decontamination"]
    assert report["docs_flagged"] == 1 and report["docs"] == 1
    assert report["flagged_by_file"] == {evals[0]: 1}
    example = report["examples"][0]
    assert example["eval_file"] == evals[0] and example["id"].endswith("in.jsonl:4")
    query_words = " ".join(re.findall(r"\w+", record["query"].lower()))
    assert len(example["ngram"].split()) == 13 and example["ngram"] in query_words
    assert planted not in decoded_docs(ds, tokenizer, "train") and ds.num_docs("train") == 8
    ds = prepare(src, tokenizer, tmp_path / "report", decontaminate=evals,
                 decontaminate_mode="report", val_fraction=0)
    assert ds.index["stats"]["decontamination"]["docs_flagged"] == 1 and ds.num_docs("train") == 9


def test_quality_filters_remove_bad_documents_and_report_them(tmp_path, tokenizer, prose_docs):
    bad = {
        "max_dup_lines": "\n".join(["Click here to subscribe now."] * 30 + [prose_docs[0]]),
        "reject_phrases": prose_docs[1] + " Lorem ipsum dolor sit amet.",
        "min_words": "Too short to be a document.",
        "min_stop_words": " ".join(["banana apple cherry grape melon"] * 20),
        "max_symbol_ratio": prose_docs[2].replace(" ", " # "),
    }
    src = write_jsonl(tmp_path / "in.jsonl", prose_docs[:10] + list(bad.values()))
    ds = prepare(src, tokenizer, tmp_path / "out", val_fraction=0, removed_dir=tmp_path / "rm")
    assert decoded_docs(ds, tokenizer, "train") == prose_docs[:10]
    filters = ds.index["stats"]["filters"]
    assert set(filters) == set(bad)
    for rule, text in bad.items():
        assert filters[rule] == {"docs": 1, "bytes": len(text.encode())}
    removed = {json.loads(line)["reason"] for line in (tmp_path / "rm" / "filter.jsonl").open()}
    assert removed == set(bad)


def test_code_sources_get_code_rules(tmp_path, tokenizer):
    good = "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "good.py").write_text(good)
    (tmp_path / "src" / "minified.py").write_text("x=1;" * 400 + "\n")
    (tmp_path / "src" / "gen.py").write_text("# Auto-generated file, do not edit\n" + good)
    ds = prepare(tmp_path / "src", tokenizer, tmp_path / "out", val_fraction=0)
    assert decoded_docs(ds, tokenizer, "train") == [good]  # prose rules would reject it
    assert set(ds.index["stats"]["filters"]) == {"max_line_length", "autogenerated"}


def test_bad_input_is_counted_and_reported(tmp_path, tokenizer, prose_docs):
    path = tmp_path / "messy.jsonl"
    write_jsonl(path, prose_docs[:3] + [""], extra_lines=['{"text": broken', '{"title": "x"}'])
    with open(path, "ab") as f:
        f.write(json.dumps({"text": prose_docs[5]}).encode().replace(b"the", b"th\xff\xfe", 1) + b"\n")
    ds = prepare(path, tokenizer, tmp_path / "out", val_fraction=0)
    read = ds.index["stats"]["read"]
    assert read["malformed_lines"] == 2 and read["invalid_utf8_docs"] == 1
    assert read["empty_docs"] == 1 and ds.index["stats"]["empty"]["docs"] == 1
    assert any("messy.jsonl:5" in p and "JSON" in p for p in read["problems"])
    assert any("messy.jsonl:6" in p and "'text'" in p for p in read["problems"])
    assert ds.num_docs("train") == 4
    assert "\ufffd" in decoded_docs(ds, tokenizer, "train")[3]
    from scratchlm.data.report import summary_table

    table = summary_table(ds.index)
    assert "malformed lines skipped: 2" in table and "invalid UTF-8" in table
    with pytest.raises(UserError, match="messy.jsonl:5"):
        prepare(path, tokenizer, tmp_path / "strict", strict=True)


def test_a_100mb_single_line_is_refused_cheaply(tmp_path, tokenizer, prose_docs):
    path = tmp_path / "huge.jsonl"
    line = (prose_docs[0] + " ") * (100_000_000 // len(prose_docs[0]))
    write_jsonl(path, [prose_docs[1], line, prose_docs[2]])
    ds = prepare(path, tokenizer, tmp_path / "out", val_fraction=0, dedup="none")
    assert ds.index["stats"]["filters"]["max_chars"]["docs"] == 1
    assert ds.index["stats"]["filters"]["max_chars"]["bytes"] >= 100_000_000 - len(prose_docs[0])
    assert ds.num_docs("train") == 2


def test_unreadable_inputs_are_clear_errors(tmp_path, tokenizer):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(UserError, match="no readable"):
        prepare(tmp_path / "empty_dir", tokenizer, tmp_path / "out")
    with pytest.raises(UserError, match="not found"):
        prepare(tmp_path / "nope.jsonl", tokenizer, tmp_path / "out")
    write_jsonl(tmp_path / "short.jsonl", ["tiny", ""])
    with pytest.raises(UserError, match="all 2 documents read were removed"):
        prepare(tmp_path / "short.jsonl", tokenizer, tmp_path / "out")
    assert not (tmp_path / "out" / "index.json").exists()


def test_parquet_sources(tmp_path, tokenizer, prose_docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": prose_docs[:5] + [None], "n": list(range(6))}),
                   tmp_path / "good.parquet", row_group_size=2)
    ds = prepare(tmp_path / "good.parquet", tokenizer, tmp_path / "out", val_fraction=0)
    assert decoded_docs(ds, tokenizer, "train") == prose_docs[:5]
    assert ds.index["stats"]["read"]["malformed_lines"] == 1
    assert "row 6" in ds.index["stats"]["read"]["problems"][0]
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match=r"bad.parquet.*no 'text' column \(columns: content\)"):
        prepare(tmp_path / "bad.parquet", tokenizer, tmp_path / "out2")


def test_hf_source_streams_a_local_dataset(tmp_path, tokenizer, prose_docs):
    pytest.importorskip("datasets")
    (tmp_path / "hub").mkdir()
    write_jsonl(tmp_path / "hub" / "train.jsonl", prose_docs[:4])
    ds = prepare(f"hf:{tmp_path / 'hub'}", tokenizer, tmp_path / "out", val_fraction=0)
    assert decoded_docs(ds, tokenizer, "train") == prose_docs[:4]
    with pytest.raises(UserError, match="hf:NAME"):
        prepare("hf:", tokenizer, tmp_path / "out")


def test_mixture_follows_weights_and_records_contributions(tmp_path, tokenizer, prose_docs):
    a = write_jsonl(tmp_path / "a.jsonl", prose_docs[:90])
    b = write_jsonl(tmp_path / "b.jsonl", prose_docs[90:120])
    ds = prepare([a, b], tokenizer, tmp_path / "out", weights=[7, 3], val_fraction=0)
    sources = ds.index["sources"]
    assert [s["weight"] for s in sources] == [0.7, 0.3]
    assert sources[1]["exhausted"] and not sources[0]["exhausted"]
    share = sources[0]["bytes_read"] / (sources[0]["bytes_read"] + sources[1]["bytes_read"])
    assert share == pytest.approx(0.7, abs=0.02)
    assert sum(s["tokens"] for s in sources) == ds.num_tokens("train")
    assert sum(s["docs_kept"] for s in sources) == ds.num_docs("train")
    from scratchlm.data.report import summary_table

    assert f"not read to the end: {a}" in summary_table(ds.index)
    with pytest.raises(UserError, match="one per input"):
        prepare([a, b], tokenizer, tmp_path / "bad", weights=[1])


def test_interrupted_run_leaves_no_dataset_and_rerun_restarts(tmp_path, tokenizer, prose_docs):
    src = write_jsonl(tmp_path / "in.jsonl", prose_docs[:30])
    out = tmp_path / "out"
    prepare(src, tokenizer, out, val_fraction=0, shard_tokens=500)

    class Exploding:
        def __init__(self, inner):
            self.vocab_size, self.eot_id = inner.vocab_size, inner.eot_id
            self.fingerprint, self.inner, self.calls = inner.fingerprint, inner, 0

        def encode(self, text):
            self.calls += 1
            if self.calls > 20:
                raise KeyboardInterrupt
            return self.inner.encode(text)

    with pytest.raises(KeyboardInterrupt):
        prepare(src, Exploding(tokenizer), out, val_fraction=0, shard_tokens=500, force=True)
    assert not (out / "index.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(UserError, match="not a complete dataset"):
        Dataset.open(out)
    ds = prepare(src, tokenizer, out, val_fraction=0, shard_tokens=500)
    assert ds.num_docs("train") == 30
    # an identical re-run finds the complete dataset and leaves it alone
    mtime = (out / "index.json").stat().st_mtime_ns
    prepare(src, tokenizer, out, val_fraction=0, shard_tokens=500)
    assert (out / "index.json").stat().st_mtime_ns == mtime


def test_dataset_from_another_tokenizer_is_refused(tmp_path, tokenizer, prose_docs):
    from scratchlm.data.loader import TokenLoader
    from scratchlm.tokenizer import BPETokenizer

    src = write_jsonl(tmp_path / "in.jsonl", prose_docs[:10])
    ds = prepare(src, tokenizer, tmp_path / "out", val_fraction=0)
    other = BPETokenizer.train([" ".join(prose_docs[:20])], 290, progress=False, workers=1)
    loader = TokenLoader(ds, seq_len=16, batch_size=2)
    loader.verify_tokenizer(tokenizer.fingerprint, tokenizer.vocab_size)
    with pytest.raises(UserError, match="tokenized with tokenizer"):
        loader.verify_tokenizer(other.fingerprint, other.vocab_size)


@settings(max_examples=60, deadline=None)
@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=400),
       kind=st.sampled_from(["prose", "code"]))
def test_rules_accept_any_text_and_normalisation_is_idempotent(text, kind):
    normal = normalize_text(text)
    assert normalize_text(normal) == normal and "\r" not in normal
    for config in (FilterConfig(), FilterConfig.none()):
        verdict = check_document(normal, kind, config)
        assert verdict is None or isinstance(verdict, str)
    if not normal.strip():
        assert check_document(normal, kind, FilterConfig.none()) == "empty"
    else:
        assert check_document(normal, kind, FilterConfig.none()) is None


def test_filter_thresholds_come_from_config(tmp_path, tokenizer, prose_docs):
    src = write_jsonl(tmp_path / "in.jsonl", ["A short but fine sentence of the kind we keep."]
                      + prose_docs[:3])
    ds = prepare(src, tokenizer, tmp_path / "out", filters={"min_words": 5}, val_fraction=0)
    assert ds.num_docs("train") == 4
    ds = prepare(src, tokenizer, tmp_path / "out", filters={"min_words": 100}, val_fraction=0)
    assert ds.index["stats"]["filters"]["min_words"]["docs"] == 1 and ds.num_docs("train") == 3
    with pytest.raises(UserError, match="unknown filter setting 'min_wrds'"):
        prepare(src, tokenizer, tmp_path / "bad", filters={"min_wrds": 5})
