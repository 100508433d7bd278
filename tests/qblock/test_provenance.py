"""The one provenance record of a problem (qblock/_provenance.py): written once, read by every consumer."""

import numpy as np

import qblock
from qblock._provenance import OBJECT_SPEC, Provenance, model_record, tokens_sha256


def test_record_round_trips_through_a_saved_problem(tmp_path):
    prov = Provenance(model={"id": "m", "spec": "default", "source": "pypi:x"}, gate="branch", num_samples=4,
                      seq_len=8, num_tokens=32, seed=3, data={"name": "lambada"},
                      tokens_sha256=tokens_sha256([np.arange(8)] * 4))
    p = qblock.BlockRemovalProblem(np.eye(4), 1, metadata={**prov.metadata(), "energy": "fisher"})
    p.save(tmp_path / "p.npz")
    back = Provenance.of(qblock.BlockRemovalProblem.load(tmp_path / "p.npz").metadata)
    assert back == prov and back.model_spec == "default" and back.model_name == "m"


def test_old_files_read_the_same_way():
    # model as a plain string (qblock.llm.extract before the record): an id, nothing to load
    assert model_record("gpt2") == {"id": "gpt2", "spec": OBJECT_SPEC}
    old = Provenance.of({"model": "gpt2", "extraction": {"manifest": {"tokens_sha256": "ab"}}})
    assert old.model_spec is None and old.model_name == "gpt2" and old.tokens_sha256 == "ab"
    assert Provenance.of({}).model == {} and Provenance.of(None).model_spec is None


def test_token_hash_matches_torch_and_numpy():
    torch = __import__("pytest").importorskip("torch")
    samples = [torch.arange(5), torch.tensor([7, 1])]
    assert tokens_sha256(samples) == tokens_sha256([s.numpy() for s in samples])
