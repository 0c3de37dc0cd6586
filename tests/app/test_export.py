"""Export: a LoRA run merged into one loadable folder, and a full fine-tune's folder loading on its own."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from dropbp.app.cli import main


def run(model_dir, out, *extra):
    code = main(["finetune", "--model", str(model_dir), "--output-dir", str(out), "--max-steps", "4",
                 "--batch-size", "4", "--seq-len", "160", "--eval-size", "2", "--eval-every", "0", *extra])
    assert code == 0
    return out


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def test_merge_writes_a_model_that_equals_the_adapter_on_its_base(model_dir, tmp_path):
    from peft import PeftModel

    out = run(model_dir, tmp_path / "run", "--merge", "--lr", "1e-2")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(merged, ids), logits(adapter, ids), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits(merged, ids), logits(base, ids), atol=1e-4)  # the adapter did something
    generator = pipeline("text-generation", model=str(out / "merged"), device="cpu")
    assert isinstance(generator("12 + 7 =", max_new_tokens=3, do_sample=False)[0]["generated_text"], str)
    assert not any(p.name.endswith(".partial") or "partial-" in p.name for p in out.iterdir())


def test_dropbp_export_merges_a_finished_run(model_dir, tmp_path, capsys):
    out = run(model_dir, tmp_path / "run")
    assert not (out / "merged").exists()
    assert main(["export", str(out), "--output", str(tmp_path / "served")]) == 0
    assert "merged model:" in capsys.readouterr().out
    AutoModelForCausalLM.from_pretrained(tmp_path / "served")
    AutoTokenizer.from_pretrained(tmp_path / "served")


def test_a_full_fine_tune_folder_loads_on_its_own(model_dir, tmp_path, capsys):
    out = run(model_dir, tmp_path / "run", "--method", "full", "--lr", "1e-4")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert tokenizer.pad_token is not None and model.config.vocab_size == len(tokenizer)
    assert main(["export", str(out)]) == 2
    assert "already a loadable model" in capsys.readouterr().err
    assert main(["finetune", "--model", str(model_dir), "--output-dir", str(tmp_path / "x"), "--method", "full",
                 "--merge"]) == 2
    assert "drop --merge" in capsys.readouterr().err


@pytest.mark.parametrize(("files", "message"), [({}, "no config.json"),
                                                ({"config.json": {"method": "lora"}}, "no adapter/adapter_config.json")])
def test_export_refuses_what_is_not_a_finished_lora_run(tmp_path, capsys, files, message):
    for name, value in files.items():
        (tmp_path / name).write_text(json.dumps(value))
    assert main(["export", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
