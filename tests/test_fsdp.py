"""Our PaLM under FSDP2 (`fully_shard`) on two gloo processes (tests/fsdp_worker.py): the frozen base
sharded, a LoRA scope trained, sampling under FSDP, the full state dict gathered to process 0 and
read back by PaLM.from_pretrained on one process, and checked against one process's training."""
import json

import fsdp_worker as worker
import pytest
import torch
from launch import ROOT, accelerate_launch

from palm_rlhf import PaLM

FUSED_IN_ROWS = 4 * 16 + 16 + 16 + 2 * 256  # tiny: q's 4 heads, k, v, SwiGLU's value and gate


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp")
    out = accelerate_launch(ROOT / "tests" / "fsdp_worker.py", out_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((out_dir / "ranks.json").read_text()), PaLM.from_pretrained(out_dir / "final")


def test_each_process_holds_half_of_each_blocks_weights(launched):
    ranks, _ = launched
    assert [r["shard"] for r in ranks] == [[FUSED_IN_ROWS // 2, 64]] * 2


def test_the_gathered_model_is_one_process_trained_on_both_batches(launched):
    _, gathered = launched
    reference = worker.tiny_palm()
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    worker.train(reference, torch.cat((worker.batch(0), worker.batch(1))))
    after = reference.state_dict()
    assert gathered.config.finetune_scopes == {"actor": {"lora_r": worker.LORA_R, "lora_alpha": None}}
    for name, value in gathered.state_dict().items():
        torch.testing.assert_close(value, after[name], rtol=1e-5, atol=1e-6)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("finetune_modules.actor.") for k in moved)  # the base stayed frozen


def test_sampling_under_fsdp_samples_what_the_gathered_model_samples(launched):
    ranks, gathered = launched
    for rank, report in enumerate(ranks):  # prompts of two lengths: the processes decode in step
        expected = gathered.generate(worker.SEQ_LEN, prompt=worker.prompt(rank), finetune_scope="actor", temperature=0.0)
        assert report["tokens"] == expected.tolist()
    assert len(ranks[1]["tokens"][0]) == len(ranks[0]["tokens"][0]) + 4
