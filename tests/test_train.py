import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.catalog import read_catalog
from training.data import build_product_set
from training.factory import create_model, create_tokenizer, preprocess_config
from training.train import (
    TrainCfg,
    augment_pixels,
    build_optimizer,
    compute_loss,
    make_batch,
    multi_positive_nce,
    parse_args,
    train,
)

REPO = Path(__file__).resolve().parents[1]


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


def test_photo_search_learns_looks_not_pixels(tiny_checkpoint):
    """Held-out photos find *other* products of their type and colour better once trained.

    The photo's own product is out of its ranking, so memorising pixels scores nothing here (the old
    image metric, R@1 of the own product, read 0.999 before any training).
    """
    history = json.loads((tiny_checkpoint / "config.json").read_text())["history"]
    untrained, trained = history[0], history[-1]
    assert untrained["step"] == 0 and trained["step"] > 0
    assert trained["image_queries"] >= 50
    assert trained["image_ndcg@10"] > untrained["image_ndcg@10"] + 0.15, (untrained, trained)
    assert trained["image_recall@10"] > untrained["image_recall@10"] + 0.15


def test_photo_loss_pulls_every_same_look_product_and_ignores_the_own_one():
    a = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    b = torch.cat([a, torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)])
    scale = torch.tensor(3.0)
    own = torch.zeros(2, 5, dtype=torch.bool)
    own[0, 0] = own[1, 1] = True
    positives = torch.zeros(2, 5, dtype=torch.bool)
    positives[0, 2] = True  # row 1 has none: it does not count
    loss = multi_positive_nce(a, b, scale, positives, own)
    logits = scale.exp() * a[0] @ b[1:].T  # the own product (column 0) is out of the softmax
    assert loss.item() == pytest.approx(-(logits.log_softmax(-1)[1]).item(), rel=1e-5)
    b_moved = b.clone()
    b_moved[0] = -b[0]  # moving the own product changes nothing
    assert multi_positive_nce(a, b_moved, scale, positives, own).item() == pytest.approx(loss.item(), rel=1e-5)


def test_photo_augmentation_keeps_colours():
    pixels = torch.rand(4, 3, 16, 16)
    out = augment_pixels(pixels, torch.Generator().manual_seed(0), 0.6)
    assert out.shape == pixels.shape and not torch.equal(out, pixels)
    # Crops and flips resample pixels; they never shift a channel's range (no hue jitter).
    assert (out.amin(dim=(2, 3)) >= pixels.amin(dim=(2, 3)) - 1e-5).all()
    assert (out.amax(dim=(2, 3)) <= pixels.amax(dim=(2, 3)) + 1e-5).all()


def test_a_killed_run_resumes_exactly(tmp_path, catalog_path):
    """SIGKILL mid-run (no clean shutdown), then resume: the same steps, losses and weights as one whole run."""
    whole = train(_cfg(tmp_path, catalog=str(catalog_path), out=str(tmp_path / "whole")))
    cut = tmp_path / "cut"
    args = ["--model", "test-tiny", "--catalog", str(catalog_path), "--limit", "240", "--batch-size", "16",
            "--val-queries", "40", "--no-eval-at-start", "--warmup-steps", "2", "--save-every", "3",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(cut)]
    run = subprocess.Popen([sys.executable, "-m", "training.train", *args], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True, cwd=REPO)
    state_file, deadline = cut / "training_state.pt", time.monotonic() + 300
    try:
        while not (state_file.is_file() and _saved_step(state_file) >= 6):
            assert run.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint at step 6 within 300 s"
            time.sleep(0.1)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    killed_at = _saved_step(state_file)
    resumed = train(_cfg(tmp_path, catalog=str(catalog_path), out=str(cut), save_every=3))
    log_whole = [json.loads(x) for x in (whole / "train_log.jsonl").read_text().splitlines()]
    log_resumed = [json.loads(x) for x in (resumed / "train_log.jsonl").read_text().splitlines()]
    assert 6 <= killed_at < len(log_whole)  # killed mid-run
    assert [x["step"] for x in log_resumed] == [x["step"] for x in log_whole]  # nothing logged twice
    for a, b in zip(log_whole, log_resumed):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4), a["step"]
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3)


def _saved_step(state_file) -> int:
    try:
        return torch.load(state_file, weights_only=False)["step"]
    except Exception:  # noqa: BLE001  (read while being replaced: try again)
        return -1


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
