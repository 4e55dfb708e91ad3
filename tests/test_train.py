import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from training.catalog import read_catalog
from training.data import build_product_set
from training.factory import create_model, create_tokenizer, preprocess_config
from training.train import TrainCfg, build_optimizer, compute_loss, make_batch, parse_args, train


def _cfg(tmp_path, **kw):
    base = dict(model="test-tiny", limit=240, batch_size=16, val_queries=40, eval_at_start=False,
                warmup_steps=2, cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"))
    base.update(kw)
    return TrainCfg(**base)


def test_loss_decreases_on_real_catalog_rows(tmp_path, catalog_path):
    cfg = _cfg(tmp_path, catalog=str(catalog_path), lr=3e-3, lr_pretrained=1e-4)
    df, report = read_catalog(cfg.catalog, limit=64)
    model = create_model("test-tiny")
    image_cfg = preprocess_config(model.cfg)["image"]
    products = build_product_set(df, image_cfg, report)
    tokenizer = create_tokenizer("test-tiny")
    optimizer = build_optimizer(model, cfg)
    batch = make_batch(products, np.arange(32), cfg, step=0, hard_pool=None)
    losses = []
    for _ in range(8):
        loss = compute_loss(model, tokenizer, products, batch, image_cfg, cfg, step=0)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_training_writes_an_export_ready_checkpoint_with_validation(tmp_path, catalog_path):
    out = train(_cfg(tmp_path, catalog=str(catalog_path), eval_at_start=True, hard_negatives=True))
    config = json.loads((out / "config.json").read_text())
    assert config["model_cfg"]["embed_dim"] == 128
    assert config["preprocess_cfg"]["image"]["image_size"] == 32
    assert config["train_cfg"]["hard_negatives"] is True
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    first, last = config["history"][0], config["history"][-1]
    assert first["step"] == 0 and last["step"] > 0
    assert {"recall@1", "recall@10", "recall@100", "mrr@10", "image_recall@10"} <= set(last)
    reloaded = create_model(out)  # rebuilds from the checkpoint alone
    saved = load_file(str(out / "model.safetensors"))
    torch.testing.assert_close(reloaded.state_dict()["text_proj.weight"], saved["text_proj.weight"])


def test_an_interrupted_run_resumes_exactly(tmp_path, catalog_path):
    whole = train(_cfg(tmp_path, catalog=str(catalog_path), out=str(tmp_path / "whole")))
    cut = _cfg(tmp_path, catalog=str(catalog_path), out=str(tmp_path / "cut"), max_steps=5)
    train(cut)  # "killed" after step 5: the state on disk is that of step 5
    state = torch.load(tmp_path / "cut" / "training_state.pt", weights_only=False)
    assert state["step"] == 5
    resumed = train(_cfg(tmp_path, catalog=str(catalog_path), out=str(tmp_path / "cut")))
    log_whole = [json.loads(x) for x in (whole / "train_log.jsonl").read_text().splitlines()]
    log_resumed = [json.loads(x) for x in (resumed / "train_log.jsonl").read_text().splitlines()]
    assert len(log_whole) == len(log_resumed) > 6
    assert log_resumed[5]["loss"] == pytest.approx(log_whole[5]["loss"], abs=1e-5)
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_cli_help_and_overrides(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--catalog", "--batch-size", "--lr-pretrained", "--hard-negatives", "--image-col"):
        assert flag in text
    conf = tmp_path / "run.json"
    conf.write_text(json.dumps({"epochs": 3, "batch_size": 8}))
    cfg, _ = parse_args(["--config", str(conf), "--batch-size", "4"])
    assert (cfg.epochs, cfg.batch_size) == (3, 4)
    conf.write_text(json.dumps({"epochz": 3}))
    with pytest.raises(TypeError):
        parse_args(["--config", str(conf)])
