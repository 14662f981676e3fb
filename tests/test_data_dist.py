"""Dispatch mode with two real gloo processes: rank 0 reads and scatters, and the rows match the sharded stream."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import data

STEPS, RESUME_AT = 4, 2


def _worker(rank: int, world_size: int, folder: str, spec: str) -> None:
    import datasets

    datasets.config.HF_DATASETS_CACHE = f"{folder}/hf-datasets"
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size)
    try:
        mix = data.parse_mix(spec)
        tok = data.load_tokenizer(f"{folder}/tok")
        s = data.PackedStream(mix, tok, 32, 2, rank=rank, world_size=world_size, seed=7, dispatch=True)
        if rank != 0:
            assert not hasattr(s, "_docs")  # followers never open the sources
        got = [next(s) for _ in range(RESUME_AT)]
        state = [s.state_dict() if rank == 0 else None]
        dist.broadcast_object_list(state, src=0)  # as a trainer would: rank 0's state, loaded on every rank
        resumed = data.PackedStream(mix, tok, 32, 2, rank=rank, world_size=world_size, seed=7, dispatch=True)
        resumed.load_state_dict(json.loads(json.dumps(state[0])))
        got += [next(resumed) for _ in range(STEPS - RESUME_AT)]
        torch.save([dict(b) for b in got], f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_dispatch_across_two_processes_matches_sharding(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    docs = [f"document {i} " + "words and more words " * (i % 7 + 1) for i in range(80)]
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d.upper()}) + "\n" for d in docs[:30]))
    spec = f"{tmp_path / 'a.txt'},{tmp_path / 'b.jsonl'}"
    tok = data.train_tokenizer(docs + [d.upper() for d in docs], vocab_size=300)
    data.save_tokenizer(tok, tmp_path / "tok")
    mp.spawn(_worker, args=(2, str(tmp_path), spec), nprocs=2, join=True)

    tok = data.load_tokenizer(tmp_path / "tok")
    for rank in range(2):
        dispatched = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        sharded = data.PackedStream(data.parse_mix(spec), tok, 32, 2, rank=rank, world_size=2, seed=7)
        for got in dispatched:
            expected = next(sharded)
            for k in expected:
                assert torch.equal(got[k], expected[k]), (rank, k)
