"""The background prefetcher hands out exactly the stream's batches, and its state resumes after the last one."""

import json

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
