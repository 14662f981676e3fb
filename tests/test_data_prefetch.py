"""The background prefetcher hands out exactly the stream's batches, and its state resumes after the last one."""

import json

import pytest
import torch

import data
from tests.helpers import write_corpus


def test_prefetcher_matches_the_stream_and_its_state_resumes_exactly(tmp_path):
    corpus = write_corpus(tmp_path / "docs.jsonl")
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    tokenizer = data.train_tokenizer(texts[:300], vocab_size=300)
    mix = data.parse_mix(str(corpus))

    def stream():
        return data.PackedStream(mix, tokenizer, 64, 4, seed=1)

    plain = stream()
    expected = [next(plain) for _ in range(12)]
    prefetched = data.Prefetcher(stream(), depth=3)
    got = [next(prefetched) for _ in range(5)]
    state = json.loads(json.dumps(prefetched.state_dict()))  # taken while more batches are already prepared
    prefetched.close()
    resumed = stream()
    resumed.load_state_dict(state)
    got += [next(resumed) for _ in range(7)]
    for a, b in zip(expected, got, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_pinned_batches_are_the_streams_in_page_locked_memory(tmp_path):
    corpus = write_corpus(tmp_path / "docs.jsonl")
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    tokenizer = data.train_tokenizer(texts[:300], vocab_size=300)
    mix = data.parse_mix(str(corpus))
    expected = [next(data.PackedStream(mix, tokenizer, 64, 4, seed=1))]
    pinned = data.Prefetcher(data.PackedStream(mix, tokenizer, 64, 4, seed=1), pin=True)
    got = next(pinned)
    pinned.close()
    assert all(v.is_pinned() and torch.equal(v, expected[0][k]) for k, v in got.items())
