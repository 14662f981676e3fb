"""Tests for data/: sources, mix syntax, packing format, exact resume, sharding, eval split, tokenizers, cache."""

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import data
from data import packing, stream
from data.mix import parse_mix
from data.order import is_eval, permute, text_hashes
from data.sources import open_source

WORDS = (
    "the cat sat on a mat and then it ran to the old tree where a bird sang songs about rain sun wind "
    "snow river stone house garden friend story light night morning happy quiet small big green"
).split()


def make_docs(n: int, seed: int, tag: str) -> list[str]:
    """Distinct English-looking documents of varied length (some longer than a row)."""
    rng = random.Random(seed)
    return [f"{tag} {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 90))) + "." for i in range(n)]


def write_txt(path, docs):
    path.write_text("\n\n".join(docs) + "\n")
    return path


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def write_parquet(path, docs, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": docs, **extra}), path)
    return path


@pytest.fixture(autouse=True, scope="module")
def isolated_caches(tmp_path_factory):
    """Keep the datasets Arrow cache and the built-in corpus cache out of the user's home."""
    import datasets

    old = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("hf-datasets")
    yield
    datasets.config.HF_DATASETS_CACHE = old


@pytest.fixture(scope="module")
def tok():
    return data.train_tokenizer(make_docs(400, 0, "train") + WORDS, vocab_size=320)


@pytest.fixture
def small_chunks(monkeypatch):
    """Draw 16 documents per chunk so that short tests cross many chunk boundaries (the default is 1024)."""
    monkeypatch.setattr(stream, "CHUNK_DOCS", 16)


@pytest.fixture
def two_sources(tmp_path):
    a = write_txt(tmp_path / "a.txt", make_docs(60, 1, "alpha"))
    b = write_jsonl(tmp_path / "b.jsonl", make_docs(25, 2, "beta"))
    return f"{a},{b}"


def batches(s, n):
    return [next(s) for _ in range(n)]


def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def documents_in(rows: list[dict], tok) -> list[str]:
    """Texts of the whole documents in consecutive global batches (rows overlap by one token)."""
    bos, eos = data.bos_eos_ids(tok)
    ids = torch.cat([b["input_ids"].reshape(-1) for b in rows]).tolist()
    docs, current = [], None
    for t in ids:
        if t == bos:
            current = []
        elif t == eos and current is not None:
            docs.append(tok.decode(current))
            current = None
        elif current is not None:
            current.append(t)
    return docs


# -----------------------------------------------------------------------------
# Mix syntax


def test_parse_mix_forms(tmp_path, two_sources):
    a, b = two_sources.split(",")
    mix = parse_mix(f"{a}:1,{b}:3")
    assert [s.weight for s in mix.sources] == [1.0, 3.0] and not mix.stages[0].balanced
    assert parse_mix(two_sources).stages[0].balanced
    mix = parse_mix(f"{a}@2kdocs~500; {b}@1.5M;smollm")
    assert [(s.budget, s.unit, s.window) for s in mix.stages] == [
        (2000, "docs", 500),
        (1_500_000, "tokens", 0),
        (None, "tokens", 0),
    ]
    assert [s.kind for s in mix.stages[2].sources] == ["hub", "hub"]
    assert [s.subset for s in mix.stages[2].sources] == ["cosmopedia-v2", "fineweb-edu-dedup"]
    assert parse_mix("builtin").sources[0].kind == "builtin"
    assert parse_mix("someone/corpus/sub").sources[0].subset == "sub"
    assert "balanced" in data.describe_mix() and "@50M" in data.describe_mix()
    assert "held out" in data.describe_mix(mix)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty"),
        ("missing.txt", "does not exist"),
        ("./nope", "does not exist"),
        ("a b c", "unknown dataset"),
        ("{a}:1,{b}", "weight all of them or none"),
        ("{a};{b}", "needs a budget"),
        ("{a}@5M", "remove its '@' budget"),
        ("{a}@5X;{b}", "budget"),
        ("smollm:2", "named mix"),
        ("{a}:-1", "positive"),
    ],
)
def test_parse_mix_errors(two_sources, spec, message):
    a, b = two_sources.split(",")
    with pytest.raises(ValueError, match=message):
        parse_mix(spec.format(a=a, b=b))


# -----------------------------------------------------------------------------
# Sources


def test_local_files_and_folders(tmp_path):
    docs = make_docs(30, 3, "doc")
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_txt(folder / "a.txt", docs[:10])
    write_jsonl(folder / "b.jsonl", docs[10:20])
    write_parquet(folder / "sub" / "c.parquet", docs[20:], other=list(range(10)))
    (folder / "notes.csv").write_text("ignored")
    for name, expected in [("a.txt", docs[:10]), ("b.jsonl", docs[10:20]), ("sub/c.parquet", docs[20:])]:
        source = open_source(parse_mix(str(folder / name)).sources[0])
        assert source.num_docs == len(expected)
        assert source.fetch(np.arange(source.num_docs))[0] == expected
    source = open_source(parse_mix(str(folder)).sources[0])
    assert source.fetch(np.arange(source.num_docs))[0] == docs  # sorted: a.txt, b.jsonl, sub/c.parquet
    texts, hashes = source.fetch(np.array([4, 2]))
    assert texts == [docs[4], docs[2]] and hashes.tolist() == text_hashes([docs[4], docs[2]]).tolist()


def test_missing_text_field_is_a_clear_error(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"content": "hello"}\n')
    with pytest.raises(ValueError, match="'text'"):
        open_source(parse_mix(str(path)).sources[0])
    write_parquet(tmp_path / "y.parquet", ["a"])
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "y.parquet")
    with pytest.raises(ValueError, match="'text'"):
        open_source(parse_mix(str(tmp_path / "y.parquet")).sources[0])


def test_hub_unreachable_is_one_clear_line(tok):
    with pytest.raises(
        ValueError,
        match="cannot stream HuggingFaceTB/smollm-corpus/cosmopedia-v2 from the Hugging Face Hub.*--dataset builtin",
    ) as info:
        data.PackedStream(parse_mix("smollm"), tok, 32, 2)
    assert "\n" not in str(info.value)


@pytest.fixture
def smollm_layout(tmp_path, shared_dir):
    """A local folder laid out like HuggingFaceTB/smollm-corpus, built from the shared sample data."""
    stories = (shared_dir / "data/tinystories/val.txt").read_text().split("\n\n")[:300]
    web = [json.loads(line)["text"] for line in (shared_dir / "data/fineweb-edu-150/fineweb_edu_150.jsonl").open()]
    root = tmp_path / "smollm-corpus"
    for i in range(2):  # two shards per subset, with the subsets' other columns
        part = stories[i * 150 : (i + 1) * 150]
        write_parquet(root / "cosmopedia-v2" / f"train-{i:05d}-of-00002.parquet", part, prompt=["p"] * len(part))
        part = web[i * 75 : (i + 1) * 75]
        write_parquet(
            root / "fineweb-edu-dedup" / f"train-{i:05d}-of-00002.parquet",
            part,
            id=[f"<urn:{j}>" for j in range(len(part))],
        )
    return root, stories, web


def streaming(spec):
    return open_source(spec, streaming=True)


def test_corpus_layout_streams_like_the_hub(smollm_layout):
    root, stories, web = smollm_layout
    spec = f"{root}/cosmopedia-v2,{root}/fineweb-edu-dedup"
    mix = parse_mix(spec)
    streamed = [streaming(s) for s in mix.sources]
    assert [s.random_access for s in streamed] == [False, False]
    assert streamed[0].take(400) == stories and streamed[1].take(400) == web  # every document, in file order
    mapped = [open_source(s) for s in mix.sources]
    assert mapped[0].fetch(np.arange(300))[0] == stories


def test_streamed_sources_resume_exactly(smollm_layout, tok, small_chunks):
    root, _, _ = smollm_layout
    mix = parse_mix(f"{root}/cosmopedia-v2,{root}/fineweb-edu-dedup")
    make = lambda: data.PackedStream(mix, tok, 64, 2, seed=3, open_fn=streaming)  # noqa: E731
    s = make()
    batches(s, 7)
    state = json.loads(json.dumps(s.state_dict()))
    assert state["skip"] > 0  # resumed from the middle of a chunk
    expected = batches(s, 40)  # crosses the end of the cosmopedia stream: its second pass restarts it
    resumed = make()
    resumed.load_state_dict(state)
    assert_same(batches(resumed, 40), expected)


# -----------------------------------------------------------------------------
# Packing


def test_pack_rows_hand_built_example():
    B, E = 0, 1
    # documents [B 5 6 E] [B 7 E] [B 8 9 10 11 E] packed into rows of T = 4 (windows of 5 sharing one token)
    tokens = np.array([B, 5, 6, E, B, 7, E, B, 8, 9, 10, 11, E], dtype=np.int32)
    starts = np.array([1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0], dtype=bool)
    rows = packing.pack_rows(tokens, starts, 3, 4)
    assert rows["input_ids"].tolist() == [[B, 5, 6, E], [B, 7, E, B], [8, 9, 10, 11]]
    assert rows["labels"].tolist() == [[5, 6, E, -100], [7, E, -100, 8], [9, 10, 11, E]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]]
    assert rows["doc_ids"].tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert all(v.dtype == np.int64 for v in rows.values())
    assert packing.pack_rows(tokens, starts, 3, 4, rows=slice(1, 2))["labels"].tolist() == [[7, E, -100, 8]]


def reference_rows(docs: list[list[int]], T: int, n: int) -> dict[str, list]:
    """Straightforward per-token packing, written independently of pack_rows."""
    stream_tokens, owner = [], []
    for d, doc in enumerate(docs):
        stream_tokens += [0] + doc + [1]
        owner += [d] * (len(doc) + 2)
    out = {k: [] for k in packing.FIELDS}
    for r in range(n):
        w, o = stream_tokens[r * T : r * T + T + 1], owner[r * T : r * T + T + 1]
        labels, pos, seg = [], [], []
        for t in range(T):
            labels.append(w[t + 1] if o[t + 1] == o[t] else -100)
            if t == 0:
                pos.append(0), seg.append(0)
            elif o[t] != o[t - 1]:
                pos.append(0), seg.append(seg[-1] + 1)
            else:
                pos.append(pos[-1] + 1), seg.append(seg[-1])
        for k, v in zip(packing.FIELDS, (w[:T], labels, pos, seg), strict=True):
            out[k].append(v)
    return out


def test_row_buffer_matches_reference_packing():
    rng = random.Random(0)
    docs = [[rng.randint(2, 99) for _ in range(rng.randint(0, 30))] for _ in range(80)]
    T, n = 16, 40
    buf = packing.RowBuffer(T)
    got = {k: [] for k in packing.FIELDS}
    pending = list(docs)
    while len(got["input_ids"]) < n:
        while buf.rows_available() < 3:
            chunk = [pending.pop(0) for _ in range(rng.randint(1, 4))]
            lengths = np.array([len(d) for d in chunk])
            body = np.array([t for d in chunk for t in d], dtype=np.int32)
            buf.push(packing.assemble(body, np.cumsum(lengths) - lengths, lengths, 0, 1), lengths + 2)
        for k, v in buf.pop_rows(3).items():
            got[k] += v.tolist()
    expected = reference_rows(docs, T, n)
    for k in packing.FIELDS:
        assert got[k][:n] == expected[k], k


def test_assemble_gathers_out_of_order_documents():
    source = np.arange(10, 20, dtype=np.uint16)
    out = packing.assemble(source, np.array([5, 0, 8]), np.array([2, 3, 0]), 0, 1)
    assert out.tolist() == [0, 15, 16, 1, 0, 10, 11, 12, 1, 0, 1]


# -----------------------------------------------------------------------------
# The stream: resume, sharding, eval split


@pytest.mark.parametrize("spec", ["balanced", "weighted", "curriculum"])
def test_resume_is_exact(tok, two_sources, spec, small_chunks):
    a, b = two_sources.split(",")
    spec = {"balanced": two_sources, "weighted": f"{a}:1,{b}:2", "curriculum": f"{b}@3000~1500;{a},{b}"}[spec]
    mix = parse_mix(spec)
    s = data.PackedStream(mix, tok, 48, 2, seed=5)
    batches(s, 31)
    state = json.loads(json.dumps(s.state_dict()))
    assert state["skip"] > 0 and state["docs"]["chunks"] > 0  # saved in the middle of a later chunk
    expected = batches(s, 60)  # long enough to cross chunks, source passes (and the curriculum switch)
    assert s.state_dict()["docs"]["chunks"] > state["docs"]["chunks"] + 2
    resumed = data.PackedStream(mix, tok, 48, 2, seed=5)
    resumed.load_state_dict(state)
    assert_same(batches(resumed, 60), expected)
    assert resumed.state_dict() == s.state_dict()
    if "@" in spec:
        assert state["stage"] == 0 and s.state_dict()["stage"] == 1


def test_resume_is_exact_with_full_size_chunks(tok, two_sources):
    mix = parse_mix(two_sources)
    s = data.PackedStream(mix, tok, 512, 8, seed=1)
    batches(s, 30)
    state = json.loads(json.dumps(s.state_dict()))
    expected = batches(s, 30)
    assert s.state_dict()["docs"]["chunks"] > state["docs"]["chunks"]
    resumed = data.PackedStream(mix, tok, 512, 8, seed=1)
    resumed.load_state_dict(state)
    assert_same(batches(resumed, 30), expected)


def test_state_records_epochs_and_reshuffles(tok, tmp_path):
    path = write_txt(tmp_path / "small.txt", make_docs(12, 4, "small"))
    mix = parse_mix(str(path), eval_fraction=0.0)
    s = data.PackedStream(mix, tok, 256, 16, seed=0)
    rows = batches(s, 50)  # more than one chunk of documents: the saved position is past many passes
    first_pass, second_pass = documents_in(rows, tok)[:12], documents_in(rows, tok)[12:24]
    assert sorted(first_pass) == sorted(second_pass) == sorted(make_docs(12, 4, "small"))
    assert first_pass != second_pass  # each pass has its own permutation
    assert s.state_dict()["docs"]["sources"][0][0]["epoch"] == s.epoch > 10


def test_fingerprint_mismatch_is_explained(tok, two_sources, tmp_path):
    mix = parse_mix(two_sources)
    s = data.PackedStream(mix, tok, 48, 2, seed=5)
    next(s)
    state = s.state_dict()
    with pytest.raises(ValueError, match="seed 5 -> 6"):
        data.PackedStream(mix, tok, 48, 2, seed=6).load_state_dict(state)
    other = write_txt(tmp_path / "c.txt", make_docs(10, 9, "gamma"))
    with pytest.raises(ValueError, match="sources"):
        data.PackedStream(parse_mix(f"{two_sources},{other}"), tok, 48, 2, seed=5).load_state_dict(state)
    data.PackedStream(mix, tok, 48, 4, world_size=2, seed=5).load_state_dict(state)  # batch layout may change


def test_another_max_length_continues_at_the_next_token(tok, two_sources, small_chunks):
    """A resume with a changed --max-length: its rows are the very next tokens of the same document stream (the
    oracle: an uninterrupted stream at the old length, read on), no token skipped or repeated."""
    mix = parse_mix(two_sources)
    s = data.PackedStream(mix, tok, 48, 2, seed=5)
    batches(s, 7)  # 7 batches of 2 x 48: past a chunk boundary (small_chunks)
    state = json.loads(json.dumps(s.state_dict()))
    resumed = data.PackedStream(mix, tok, 96, 2, seed=5)
    resumed.load_state_dict(state)
    longer = batches(resumed, 3)  # 3 x 2 x 96 tokens
    on = batches(s, 6)  # the same 576 tokens at 48 per row
    for key in ("input_ids", "labels"):
        assert torch.equal(torch.cat([b[key].flatten() for b in longer]), torch.cat([b[key].flatten() for b in on]))
    assert resumed.tokens == 7 * 2 * 48 + 3 * 2 * 96 and resumed.state_dict()["fingerprint"]["max_length"] == 96


def test_global_batches_do_not_depend_on_world_size(tok, two_sources, small_chunks):
    mix = parse_mix(two_sources)
    single = batches(data.PackedStream(mix, tok, 40, 4, seed=1), 6)
    ranks = [batches(data.PackedStream(mix, tok, 40, 2, rank=r, world_size=2, seed=1), 6) for r in range(2)]
    joined = [{k: torch.cat([ranks[0][i][k], ranks[1][i][k]]) for k in single[i]} for i in range(6)]
    assert_same(joined, single)
    # what dispatch sends: rank r's rows of the global batch rank 0 built
    dispatcher = data.PackedStream(mix, tok, 40, 2, world_size=2, seed=1)
    glob = [dispatcher.next_global() for _ in range(6)]
    for r in range(2):
        assert_same([{k: v[data.rank_rows(r, 2)] for k, v in g.items()} for g in glob], ranks[r])


def test_resume_with_another_world_size(tok, two_sources, small_chunks):
    mix = parse_mix(two_sources)
    s = data.PackedStream(mix, tok, 40, 4, seed=1)
    batches(s, 3)
    state = s.state_dict()
    expected = batches(s, 4)
    ranks = [data.PackedStream(mix, tok, 40, 2, rank=r, world_size=2, seed=1) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    got = [
        {k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(batches(ranks[0], 4), batches(ranks[1], 4), strict=True)
    ]
    assert_same(got, expected)


def test_eval_split_is_disjoint_and_world_size_independent(tok, tmp_path):
    docs = make_docs(300, 6, "doc")
    path = write_txt(tmp_path / "d.txt", docs)
    mix = parse_mix(str(path), eval_fraction=0.1)
    held_out = {d for d, e in zip(docs, is_eval(text_hashes(docs), 0.1), strict=True) if e}
    assert 10 < len(held_out) < 60
    s = data.PackedStream(mix, tok, 64, 4, seed=2)
    trained = documents_in(batches(s, 120), tok)
    assert len(set(trained)) > 200 and not set(trained) & held_out
    single = data.eval_batches(mix, tok, 64, 4, 3)
    assert len(single) == 3 and single[0]["input_ids"].shape == (4, 64)
    assert set(documents_in(single, tok)) <= held_out
    ranks = [data.eval_batches(mix, tok, 64, 2, 3, rank=r, world_size=2) for r in range(2)]
    assert_same([{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(*ranks, strict=True)], single)
    assert_same(data.eval_batches(mix, tok, 64, 4, 3), single)


def test_empty_split_is_an_error_not_a_hang(tok, tmp_path):
    path = write_txt(tmp_path / "one.txt", ["just one short document"])
    mix = parse_mix(str(path), eval_fraction=0.0)
    with pytest.raises(ValueError, match="held-out"):
        data.eval_batches(mix, tok, 16, 1, 1)


def test_curriculum_switches_stage_softly(tok, tmp_path):
    a = write_txt(tmp_path / "a.txt", make_docs(400, 7, "alpha"))
    b = write_txt(tmp_path / "b.txt", make_docs(400, 8, "beta"))
    mix = parse_mix(f"{a}@3000docs~2048;{b}", eval_fraction=0.0)
    s = data.PackedStream(mix, tok, 256, 16, seed=0)
    rows, stages = [], []
    while s._docs.docs_drawn < 5 * stream.CHUNK_DOCS:
        stages.append(s.current_stage)
        rows.append(next(s))
    beta = np.array([d.startswith("beta") for d in documents_in(rows, tok)])
    # Decided per chunk of 1024 documents: the blend is 0 at 0 docs, 3.5% at 1024, 53.5% at 2048; 3072 >= 3000 ends it.
    n = stream.CHUNK_DOCS
    assert not beta[:n].any()
    assert 0.3 < beta[2 * n : 3 * n].mean() < 0.75
    assert beta[3 * n :].all() and len(beta) > 3 * n + 100
    assert stages[0] == 0 and stages[-1] == 1 and sorted(stages) == stages
    assert s.state_dict()["stage"] == 1


# -----------------------------------------------------------------------------
# Built-in corpus


def test_builtin_corpus_is_deterministic_english(tmp_path):
    from data.builtin import builtin_corpus_path, default_roots

    stdlib = default_roots()[:1]
    path = builtin_corpus_path(300_000, cache_dir=tmp_path / "a", roots=stdlib, workers=1)
    again = builtin_corpus_path(300_000, cache_dir=tmp_path / "b", roots=stdlib, workers=2)
    assert path.read_bytes() == again.read_bytes()
    assert builtin_corpus_path(300_000, cache_dir=tmp_path / "a", roots=stdlib) == path  # cached
    texts = [json.loads(line)["text"] for line in path.open()]
    assert len(texts) > 50 and sum(map(len, texts)) >= 300_000
    common = sum(all(f" {w} " in t for w in ("the", "of", "is")) for t in texts)
    assert common / len(texts) > 0.6
    assert not any(">>>" in t for t in texts)


# -----------------------------------------------------------------------------
# Tokenizers


def test_tokenizer_save_load_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    from data.tokenizer import tokenizer_hash

    assert data.bos_eos_ids(tok) == (0, 1)
    folder = data.save_tokenizer(tok, tmp_path / "tok")
    text = "The cat sat on 12345 mats, then ran.\nA new line!"
    ids = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
    auto = AutoTokenizer.from_pretrained(str(folder))
    assert auto(text, add_special_tokens=False)["input_ids"] == ids
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert auto.decode(ids) == text
    for spec in (folder, folder / "tokenizer.json"):
        loaded = data.load_tokenizer(spec)
        assert data.bos_eos_ids(loaded) == (0, 1) and tokenizer_hash(loaded) == tokenizer_hash(tok)
    assert [len(x) for x in tok.backend_tokenizer.encode_batch_fast(["1234"], add_special_tokens=False)] == [4]


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.load_tokenizer(tmp_path / "none.json")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        data.load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="Hub"):
        data.load_tokenizer("someone/some-tokenizer")
    with pytest.raises(ValueError, match="too small"):
        data.train_tokenizer(["x"], vocab_size=100)


def test_smollm2_tokenizer_uses_endoftext(shared_dir):
    tokenizer = data.load_tokenizer(shared_dir / "tokenizers/smollm2/tokenizer.json")
    assert data.bos_eos_ids(tokenizer) == (0, 0)
    assert tokenizer.convert_ids_to_tokens(0) == "<|endoftext|>"


def test_resolve_tokenizer_trains_once(tmp_path, two_sources, monkeypatch):
    mix = parse_mix(two_sources)
    run_dir = tmp_path / "run"
    first = data.resolve_tokenizer(None, mix, run_dir, vocab_size=300, max_docs=50, log=lambda _: None)
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file() and len(first) <= 300

    def no_training(*args, **kwargs):
        raise AssertionError("a saved tokenizer must be reused, not re-trained")

    monkeypatch.setattr(data.tokenizer, "train_tokenizer", no_training)
    again = data.resolve_tokenizer(None, mix, run_dir, vocab_size=300, max_docs=50, log=lambda _: None)
    assert again.get_vocab() == first.get_vocab()


def test_tokenizer_cli(tmp_path, two_sources):
    from data.tokenizer import main

    assert (
        main(
            [
                "train",
                "--dataset",
                two_sources,
                "--vocab-size",
                "280",
                "--max-docs",
                "40",
                "--output",
                str(tmp_path / "t"),
            ]
        )
        == 0
    )
    assert len(data.load_tokenizer(tmp_path / "t")) <= 280
    assert main(["train", "--dataset", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "u")]) == 2


# -----------------------------------------------------------------------------
# Token cache


def test_cache_replays_the_text_stream(tok, two_sources, tmp_path, small_chunks):
    from data.prepare import main, prepare

    tok_dir = data.save_tokenizer(tok, tmp_path / "tok")
    a, b = two_sources.split(",")
    spec = f"{b}@2000~1000;{a},{b}"
    manifest = prepare(spec, str(tok_dir), tmp_path / "cache", log=lambda _: None)
    assert manifest["dtype"] == "uint16" and len(manifest["sources"]) == 2  # b appears twice, cached once
    text_mix, cache_mix = parse_mix(spec), parse_mix(str(tmp_path / "cache"))
    assert cache_mix.cache_dir and [s.kind for s in cache_mix.sources] == ["cache"] * 3
    expected = batches(data.PackedStream(text_mix, tok, 48, 2, seed=4), 50)
    cached = data.PackedStream(cache_mix, tok, 48, 2, seed=4)
    assert_same(batches(cached, 20), expected[:20])
    state = json.loads(json.dumps(cached.state_dict()))
    resumed = data.PackedStream(cache_mix, tok, 48, 2, seed=4)
    resumed.load_state_dict(state)
    assert_same(batches(resumed, 30), expected[20:])
    other = data.train_tokenizer(make_docs(50, 1, "x"), vocab_size=290)
    with pytest.raises(ValueError, match="another tokenizer"):
        data.PackedStream(cache_mix, other, 48, 2)
    reused = data.resolve_tokenizer(None, cache_mix, tmp_path / "run", log=lambda _: None)
    assert reused.get_vocab() == tok.get_vocab()
    assert main(["--dataset", a, "--tokenizer", str(tok_dir), "--output", str(tmp_path / "cache")]) == 2  # exists


@pytest.mark.slow
def test_cache_with_worker_processes_matches_one_process(tok, two_sources, tmp_path):
    from data.prepare import prepare

    tok_dir = data.save_tokenizer(tok, tmp_path / "tok")
    one = prepare(two_sources, str(tok_dir), tmp_path / "one", log=lambda _: None)
    two = prepare(two_sources, str(tok_dir), tmp_path / "two", num_proc=2, task_docs=16, log=lambda _: None)
    assert one["sources"] == two["sources"]
    for name in ("source-0/tokens.bin", "source-0/offsets.npy", "source-1/hashes.npy"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_balanced_interleaving_ends_every_source_together():
    il = stream.Interleaver([60, 25], None, key=7)
    for _ in range(3):  # three passes: each one draws every document of every source exactly once
        picks = np.concatenate([il.pick(10) for _ in range(8)] + [il.pick(5)])
        assert np.bincount(picks, minlength=2).tolist() == [60, 25]
        assert 0.5 < picks[:42].mean() / picks[42:].mean() < 2  # spread over the pass, not one source first
    in_pieces = stream.Interleaver([60, 25], None, key=7)
    assert (
        np.concatenate([in_pieces.pick(k) for k in (1, 50, 100, 19)]).tolist()
        == stream.Interleaver([60, 25], None, key=7).pick(170).tolist()
    )  # counters, not call sizes, decide


def test_weighted_interleaving_follows_the_weights():
    picks = stream.Interleaver([60, 25], [1.0, 3.0], key=3).pick(20_000)
    assert abs(picks.mean() - 0.75) < 0.02


def test_permutation_is_a_bijection():
    for n in (1, 2, 7, 64, 1000, 4097):
        perm = permute(np.arange(n), n, key=12345)
        assert sorted(perm.tolist()) == list(range(n))
    assert permute(np.arange(100), 100, 1).tolist() != permute(np.arange(100), 100, 2).tolist()


def test_the_data_commands_start_without_warnings():
    import subprocess
    import sys

    from tests.helpers import ROOT

    for module in ("data.tokenizer", "data.prepare"):
        done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0 and "usage: python -m " + module in done.stdout, done.stderr
        assert "Warning" not in done.stderr, done.stderr  # runpy's note about the package importing the module


def consumed_by_source(rows: list[dict], emitted: int, tok) -> dict[str, dict[str, int]]:
    """The oracle of the per-source counters: documents begun and tokens taken by each source (the tag its text
    starts with) in the first `emitted` tokens of consecutive global batches (`rows` runs further, so the source
    of a document cut off at the end can still be read)."""
    bos, _ = data.bos_eos_ids(tok)
    ids = torch.cat([b["input_ids"].reshape(-1) for b in rows]).tolist()
    starts = [i for i, t in enumerate(ids) if t == bos] + [len(ids)]
    counts = {tag: {"docs": 0, "tokens": 0} for tag in ("alpha", "beta")}
    for start, end in zip(starts, starts[1:], strict=False):
        if start >= emitted:
            break
        label = tok.decode(ids[start + 1 : end]).split()[0]  # alpha or beta
        counts[label]["docs"] += 1
        counts[label]["tokens"] += min(end, emitted) - start
    return counts


def test_source_counters_count_what_the_rows_took(tok, two_sources, small_chunks):
    """Documents and tokens per source are those of the emitted rows, at every batch and across a resume, not
    those of the chunks drawn ahead into the packing buffer."""
    mix = parse_mix(two_sources)
    a, b = (label.label for label in mix.stages[0].sources)
    s = data.PackedStream(mix, tok, 48, 2, seed=5)
    rows = batches(s, 60)
    reference = data.PackedStream(mix, tok, 48, 2, seed=5)
    by_tag = lambda counts: {"alpha": counts[a], "beta": counts[b]}  # noqa: E731
    for n in range(1, 41):
        next(reference)
        counted = by_tag(reference.source_counts())
        assert counted == consumed_by_source(rows, n * 2 * 48, tok), n
        assert sum(c["tokens"] for c in counted.values()) == reference.tokens
    resumed = data.PackedStream(mix, tok, 48, 2, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(reference.state_dict())))
    assert resumed.source_counts() == reference.source_counts()
    next(resumed)
    assert by_tag(resumed.source_counts()) == consumed_by_source(rows, 41 * 2 * 48, tok)


def test_joined_rows_are_the_same_text_without_document_boundaries(tok, two_sources, small_chunks):
    """--no-document-mask: the same tokens and labels, every row one segment with positions 0..T-1, and the same
    stream position (a run may switch on resume)."""
    mix = parse_mix(two_sources)
    masked, joined = (data.PackedStream(mix, tok, 48, 2, seed=5, joined=j) for j in (False, True))
    rows_m, rows_j = batches(masked, 20), batches(joined, 20)
    assert any(r["doc_ids"].any() for r in rows_m)  # the masked rows hold several documents
    for m, j in zip(rows_m, rows_j, strict=True):
        assert torch.equal(m["input_ids"], j["input_ids"]) and torch.equal(m["labels"], j["labels"])
        assert not j["doc_ids"].any()
        assert torch.equal(j["position_ids"], torch.arange(48).expand(2, 48))
    assert masked.state_dict() == joined.state_dict()
