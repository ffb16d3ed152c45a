"""TRL's ``SFTTrainer`` with the BAdam integration: it trains, and resumes from its checkpoint exactly (CPU)."""
import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from badam_kernels import BlockOptimizer  # noqa: E402
from badam_kernels.integrations.hf import BAdamConfig, FreeBlockGradsCallback, make_badam_optimizer  # noqa: E402
from helpers import snapshot  # noqa: E402

TEXT = ["Full fathom five thy father lies", "Of his bones are coral made", "Those are pearls that were his eyes",
        "Nothing of him that doth fade", "But doth suffer a sea change", "Into something rich and strange"] * 4


def tokenizer():
    """A word-level tokenizer built here from the text (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXT, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def model(tok, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    return LlamaForCausalLM(config)


def sft_trainer(out, tok, net, **kw):
    from trl import SFTConfig, SFTTrainer

    options = dict(per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2, logging_steps=1,
                   save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, data_seed=0,
                   max_length=16, lr_scheduler_type="linear")
    args = SFTConfig(str(out), **{**options, **kw})
    optimizer = make_badam_optimizer(net, BAdamConfig(switch_block_every=2, seed=0), lr=args.learning_rate)
    return SFTTrainer(model=net, args=args, train_dataset=datasets.Dataset.from_dict({"text": TEXT}),
                      processing_class=tok, optimizers=(optimizer, None), callbacks=[FreeBlockGradsCallback()])


def test_sft_trainer_trains_block_by_block_and_resumes_exactly(tmp_path):
    tok = tokenizer()
    full = sft_trainer(tmp_path / "full", tok, model(tok), save_strategy="steps", save_steps=3)
    before = snapshot(full.model)
    full.train()
    opt = full.optimizer.optimizer if not isinstance(full.optimizer, BlockOptimizer) else full.optimizer
    assert isinstance(opt, BlockOptimizer) and opt.global_step == 6
    losses = [h["loss"] for h in full.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    after = snapshot(full.model)
    changed = {n.split(".")[2] for n in before if not torch.equal(before[n], after[n])}
    assert changed == {"2", "1", "0"}  # three blocks of two steps each, top down
    resumed = sft_trainer(tmp_path / "resumed", tok, model(tok, seed=1))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    a, b = snapshot(full.model), snapshot(resumed.model)
    assert all(torch.equal(a[n], b[n]) for n in a), "the resumed SFT run differs from the uninterrupted one"
