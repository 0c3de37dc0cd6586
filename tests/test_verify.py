"""dropbp.check, the fallback's safety net (require_sound_branches) and the `dropbp check` command."""

import pytest
import torch
import transformers as T
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

import dropbp
from dropbp.app.cli import main
from dropbp.errors import DropBPError
from dropbp.tiny import tiny_causal_lm
from dropbp.verify import require_sound_branches


def results(report):
    return {r.name: r for r in report.results}


# ------------------------------------------------------------------ a model family outside the table
class ToyConfig(T.PretrainedConfig):
    """A decoder whose ``attn`` module adds the residual inside, and whose signature does not show it."""

    model_type = "dropbp_toy_residual_inside"

    def __init__(self, vocab_size=64, hidden_size=16, num_hidden_layers=2, residual_inside=True, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.residual_inside = residual_inside
        super().__init__(**kwargs)


class ToyAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.residual_inside = config.residual_inside

    def forward(self, x):
        out = torch.tanh(self.proj(x))
        return x + out if self.residual_inside else out


class ToyLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size)
        self.attn = ToyAttention(config)
        self.mlp = nn.Sequential(nn.Linear(config.hidden_size, 32), nn.GELU(), nn.Linear(32, config.hidden_size))
        self.residual_inside = config.residual_inside

    def forward(self, x):
        x = self.attn(self.norm(x)) if self.residual_inside else x + self.attn(self.norm(x))
        return x + self.mlp(self.norm(x))


class ToyForCausalLM(T.PreTrainedModel):
    config_class = ToyConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ToyLayer(config) for _ in range(config.num_hidden_layers))
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids, labels=None, **kwargs):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.head(x)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return CausalLMOutput(loss=loss, logits=logits)


T.AutoConfig.register(ToyConfig.model_type, ToyConfig, exist_ok=True)
T.AutoModelForCausalLM.register(ToyConfig, ToyForCausalLM, exist_ok=True)


class UnregisteredToyConfig(T.PretrainedConfig):
    """The same model under a type the Auto classes do not know: no tiny copy can be built at apply()."""

    model_type = "dropbp_toy_unregistered"

    def __init__(self, vocab_size=64, hidden_size=16, num_hidden_layers=2, residual_inside=True, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.residual_inside = residual_inside
        super().__init__(**kwargs)


class UnregisteredToyForCausalLM(ToyForCausalLM):
    config_class = UnregisteredToyConfig


def toy(residual_inside=True, registered=True):
    torch.manual_seed(0)
    if registered:
        return ToyForCausalLM(ToyConfig(residual_inside=residual_inside))
    return UnregisteredToyForCausalLM(UnregisteredToyConfig(residual_inside=residual_inside))


# ------------------------------------------------------------------ check passes where DropBP is exact
@pytest.mark.parametrize("model_type", ["llama", "bloom", "mpt", "gpt_neox", "opt", "gemma2", "qwen2_moe"])
def test_check_passes_on_table_architectures(model_type):
    report = dropbp.check(tiny_causal_lm(model_type))
    assert report.ok, str(report)
    assert all(r.passed for r in report.results), str(report)  # every check applies to these decoders


def test_post_norm_stack_is_not_the_identity_but_passes():
    torch.manual_seed(0)
    config = T.OPTConfig(hidden_size=32, ffn_dim=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=64,
                         word_embed_proj_dim=32, do_layer_norm_before=False, dropout=0.0)
    report = dropbp.check(T.OPTForCausalLM(config))
    assert report.ok, str(report)
    assert "not the identity" in results(report)["residual stream"].detail


def test_fallback_toy_without_residual_inside_passes():
    report = dropbp.check(toy(residual_inside=False))
    assert report.ok, str(report)
    assert report.branches == ["layers.0.attn", "layers.0.mlp", "layers.1.attn", "layers.1.mlp"]


# ------------------------------------------------------------------ check fails where DropBP would be wrong
def test_branch_that_adds_its_own_residual_fails_both_structural_checks():
    report = dropbp.check(toy(residual_inside=True))
    found = results(report)
    assert not report.ok
    assert found["residual stream"].passed is False
    assert "no gradient reaches the first layer" in found["residual stream"].detail
    assert found["no residual inside"].passed is False
    assert "layers.0.attn" in found["no residual inside"].detail
    assert "adds the residual inside" in found["no residual inside"].detail
    assert found["forward unchanged"].passed  # the forward is exact either way: only the gradient is wrong


def test_a_wrong_fast_sensitivity_fails_the_sensitivity_check(monkeypatch):
    """The check compares the measurement dropbp uses against L + 1 backward passes, so a wrong batched
    measurement (here: off by 10% for one branch) is caught."""
    from dropbp import sensitivity

    original = sensitivity._batched_down_the_blocks

    def off(*args, **kwargs):
        values = original(*args, **kwargs)
        return None if values is None else [values[0] * 1.1, *values[1:]]

    monkeypatch.setattr(sensitivity, "_batched_down_the_blocks", off)
    found = results(dropbp.check(tiny_causal_lm("llama")))
    assert found["sensitivity"].passed is False
    assert "differs from L + 1 backward passes by up to 1.0e-01" in found["sensitivity"].detail


def test_whole_layer_pattern_fails_with_a_clear_message():
    report = dropbp.check(tiny_causal_lm("llama"), branches=["model.layers.?"])
    assert not report.ok
    assert "whole decoder layer" in report.results[0].detail
    assert "\n" not in report.results[0].detail


def test_whole_block_of_a_plain_module_is_caught_dynamically():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 8)

        def forward(self, x):
            return x + torch.tanh(self.linear(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.out = nn.Linear(4, 8), nn.Linear(8, 3)
            self.blocks = nn.ModuleList(Block() for _ in range(2))

        def forward(self, x):
            x = self.inp(x)
            for block in self.blocks:
                x = block(x)
            return self.out(x)

    torch.manual_seed(0)
    report = dropbp.check(Net(), branches=["blocks.?"], inputs=torch.randn(5, 4))
    found = results(report)
    assert found["no residual inside"].passed is False and "blocks.0" in found["no residual inside"].detail
    assert found["residual stream"].passed is False


def test_bloom_modules_that_take_the_residual_are_refused():
    report = dropbp.check(tiny_causal_lm("bloom"), branches=["*.h.*.self_attention", "*.h.*.mlp"])
    assert not report.ok
    assert "takes the residual ('residual')" in report.results[0].detail


def test_check_leaves_the_model_as_it_was():
    model = tiny_causal_lm("llama")
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    assert dropbp.check(model).ok
    assert not model.training and dropbp.find_handle(model) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_check_refuses_an_attached_model_and_a_plain_module_without_inputs():
    model = tiny_causal_lm("llama")
    handle = dropbp.apply(model)
    with pytest.raises(ValueError, match="already attached"):
        dropbp.check(model)
    handle.remove()
    with pytest.raises(ValueError, match="needs inputs="):
        dropbp.check(nn.Sequential(nn.Linear(2, 2)), branches=["0"])


# ------------------------------------------------------------------ the fallback's safety net in training
def test_apply_verifies_fallback_branches_on_a_tiny_copy(caplog):
    rng = torch.random.get_rng_state()
    with pytest.raises(DropBPError, match="generic fallback are unsafe .residual stream"):
        dropbp.apply(toy(residual_inside=True))
    model = toy(residual_inside=False)
    rng = torch.random.get_rng_state()
    caplog.clear()
    with caplog.at_level("INFO", logger="dropbp.verify"):
        handle = dropbp.apply(model)
    assert "is not in the architecture table: verifying the generic fallback's branches on a tiny random copy" in (
        caplog.text)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the copy's random weights came from a forked RNG
    assert handle.branch_source == "fallback" and len(handle.branches) == 4
    handle.remove()
    refused = toy(residual_inside=True)
    with pytest.raises(DropBPError):
        dropbp.apply(refused)
    assert dropbp.find_handle(refused) is None  # nothing left attached
    assert dropbp.apply(tiny_causal_lm("llama")).branch_source == "table"
    assert dropbp.apply(tiny_causal_lm("llama"), branches=["*.mlp"]).branch_source == "patterns"


def test_fallback_branches_without_a_tiny_copy_are_verified_on_the_first_batch(caplog):
    model = toy(residual_inside=True, registered=False)
    with caplog.at_level("INFO", logger="dropbp.verify"):
        handle = dropbp.apply(model)  # no copy can be built: nothing to check at apply, and the log says why
    assert "are not verified" in caplog.text and "verify them on the first batch" in caplog.text
    assert handle.branch_source == "fallback"
    batch = torch.randint(3, 64, (2, 8))
    with pytest.raises(DropBPError, match="generic fallback are unsafe"):
        require_sound_branches(model, handle, {"input_ids": batch, "labels": batch})
    handle.remove()
    model = toy(residual_inside=False, registered=False)
    handle = dropbp.apply(model)
    step = handle.step_count
    require_sound_branches(model, handle, {"input_ids": batch, "labels": batch})
    assert handle.step_count == step  # the check draws no mask
    handle.remove()


def test_callback_refuses_unsafe_fallback_branches_at_the_first_training_forward(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    batch = torch.randint(3, 64, (2, 8))
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none")
    for residual_inside in (True, False):
        model = toy(residual_inside, registered=False)
        model.train()
        callback = dropbp.DropBPCallback(sensitivity_at=None)
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model)
        if residual_inside:
            with pytest.raises(DropBPError, match="unsafe"):
                model(input_ids=batch, labels=batch)
        else:
            model(input_ids=batch, labels=batch).loss.backward()
            assert model.layers[0].norm.weight.grad is not None
        assert callback._verifier is None  # checked once, then the hook is gone
        callback.handle.remove()


def test_finetune_refuses_unsafe_fallback_branches(tmp_path, capsys):
    from conftest import byte_tokenizer

    folder = tmp_path / "toy"
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    ToyForCausalLM(ToyConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, max_position_embeddings=256)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "run"
    code = main(["finetune", "--model", str(folder), "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2",
                 "--seq-len", "160", "--eval-size", "2", "--method", "full", "--sensitivity-at", "none"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert code == 2 and err.startswith("dropbp finetune: error: DropBP: the branches found by the generic fallback")
    assert not out.exists()  # nothing half-written


# ------------------------------------------------------------------ the command
def test_check_command_passes_on_bloom(capsys):
    assert main(["check", "bloom"]) == 0
    out = capsys.readouterr().out
    assert "PASS  residual stream" in out and out.strip().endswith("all checks passed")


def test_check_command_exits_2_on_a_whole_layer_pattern(capsys):
    assert main(["check", "llama", "--branches", "model.layers.?"]) == 2
    out = capsys.readouterr().out
    assert "FAIL  branches" in out and "whole decoder layer" in out


def test_check_command_on_a_model_folder(tmp_path, capsys):
    tiny_causal_lm("mpt").save_pretrained(tmp_path / "mpt")
    assert main(["check", str(tmp_path / "mpt"), "--real-weights"]) == 0
    assert "real weights" in capsys.readouterr().out
