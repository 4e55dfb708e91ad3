import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.catalog import read_catalog
from training import rundir
from training.data import build_product_set
from training.factory import create_model, create_tokenizer, get_model_config, preprocess_config
from training.train import (
    OtherRunError,
    TrainCfg,
    augment_pixels,
    build_optimizer,
    compute_loss,
    main,
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


# Runs training.train's CLI with rundir.save_hook set to SIGKILL the process at the nth time a save reaches
# `point` (no clean shutdown); "aside" also takes away the atomic exchange, as on a system without one.
KILL_IN_SAVE = """
import collections, os, signal, sys
import training.train
from training import rundir
point, nth = sys.argv[1], int(sys.argv[2])
seen = collections.Counter()
def hook(at):
    seen[at] += 1
    if at == point and seen[at] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
rundir.save_hook = hook
if point == "aside":
    rundir._exchange = lambda a, b: False
training.train.main(sys.argv[3:])
"""
KILLED_RUN = dict(batch_size=8, max_steps=4, save_every=1)  # a save after each of the first 4 steps of 27


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, catalog_path) -> Path:
    """The run that the killed runs, once resumed, must reproduce, uninterrupted."""
    tmp = tmp_path_factory.mktemp("whole")
    return train(_cfg(tmp, catalog=str(catalog_path), **KILLED_RUN))


@pytest.mark.parametrize(("point", "survivor"), [
    ("weights", 1),  # the new weights staged, not their training state: the step-1 checkpoint survives
    ("aside", 2),  # without an atomic exchange, between its two renames: the staged step 2 is moved in
    ("published", 2),  # swapped in, the old generation not yet deleted: step 2
])
def test_a_run_killed_inside_a_save_resumes_exactly(tmp_path, catalog_path, whole_run, point, survivor):
    """SIGKILL at a point inside the step-2 save, then resume: the same steps, losses, metrics and weights as
    one whole run. A kill there once left the step-2 weights beside the step-1 training state."""
    cfg = _cfg(tmp_path, catalog=str(catalog_path), **KILLED_RUN)
    args = ["--model", "test-tiny", "--catalog", str(catalog_path), "--limit", "240", "--batch-size", "8",
            "--val-queries", "40", "--no-eval-at-start", "--warmup-steps", "2", "--max-steps", "4",
            "--save-every", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")]
    assert parse_args(args)[0] == cfg
    killed = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, point, "2", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL: the hook fired
    out = Path(cfg.out)
    rundir.recover(out)  # what every run does first
    assert torch.load(out / "training_state.pt", weights_only=False)["step"] == survivor
    resumed = train(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"]  # no stage, nothing aside
    log_whole = [json.loads(x) for x in (whole_run / "train_log.jsonl").read_text().splitlines()]
    log_resumed = [json.loads(x) for x in (resumed / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log_whole] == [1, 2, 3, 4]
    assert log_resumed == log_whole  # every step once, the same losses to the last logged digit
    times = {"seconds", "train_seconds"}
    history = [json.loads((run / "config.json").read_text())["history"] for run in (whole_run, resumed)]
    assert [{k: v for k, v in h.items() if k not in times} for h in history[0]] == \
        [{k: v for k, v in h.items() if k not in times} for h in history[1]]
    a, b = load_file(str(whole_run / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_of_another_configuration_is_refused(tmp_path, catalog_path):
    """--out holding a run of another recipe, model config or catalog content refuses, in one sentence and
    touching nothing; what changes neither weights nor metrics (saving, validating, where, when to stop) resumes."""
    cfg = _cfg(tmp_path, catalog=str(catalog_path), max_steps=1)
    out = train(cfg)
    moved = tmp_path / "moved.parquet"  # the same content elsewhere: the same catalog
    shutil.copy(catalog_path, moved)
    train(dataclasses.replace(cfg, catalog=str(moved), max_steps=2, save_every=5, val_every=7, device="cpu",
                              eval_at_start=True, cache_dir=str(tmp_path / "cache2")))
    state_file = out / "training_state.pt"
    assert torch.load(state_file, weights_only=False)["step"] == 2
    recorded = json.loads((out / "config.json").read_text())["run_identity"]
    assert recorded["catalog"]["products"] == 240 and recorded["recipe"]["limit"] == 240
    assert "device" not in recorded["recipe"] and recorded["model_cfg"]["embed_dim"] == 128

    other_model = tmp_path / "tiny-64.json"
    other_model.write_text(json.dumps({**get_model_config("test-tiny").to_dict(), "embed_dim": 64}))
    before = state_file.stat().st_mtime_ns
    for change, expected in [
        ({"lr": 2e-3}, "lr 0.001 -> 0.002"),
        ({"epochs": 2}, "epochs 1 -> 2"),  # a longer cosine schedule: not a continuation
        ({"limit": 200}, "limit 240 -> 200; catalog "),
        ({"model": str(other_model)}, "model config (embed_dim)"),
    ]:
        with pytest.raises(OtherRunError, match=rf"^{re.escape(str(out))} holds a run trained with another "
                                                 rf"configuration \(.*{re.escape(expected)}.*\): pass another "
                                                 rf"--out, or delete {re.escape(str(out))} "):
            train(dataclasses.replace(cfg, max_steps=2, **change))
    assert state_file.stat().st_mtime_ns == before

    with pytest.raises(SystemExit) as exit_:  # the command line: the same sentence, exit status 1
        main(["--model", "test-tiny", "--catalog", str(catalog_path), "--limit", "240", "--batch-size", "16",
              "--lr", "0.002", "--out", str(out)])
    message = str(exit_.value.code)
    assert message.startswith(f"error: {out} holds a run") and message.endswith("to train this one there")
    assert "\n" not in message and "lr 0.001 -> 0.002" in message

    # A run saved before identities were recorded: compared by its config.json's recipe and catalog path
    # (the last save read the moved copy).
    state = torch.load(state_file, weights_only=False)
    del state["identity"]
    torch.save(state, state_file)
    with pytest.raises(OtherRunError, match=r"\(limit 240 -> 200\)"):
        train(dataclasses.replace(cfg, catalog=str(moved), limit=200, max_steps=2))
    recorded = re.escape(str(catalog_path.resolve()))  # the path as the run records it: symlinks resolved
    with pytest.raises(OtherRunError, match=rf"\(catalog {re.escape(str(moved))} -> {recorded} \("):
        train(dataclasses.replace(cfg, max_steps=2))


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


def test_look_partners_share_the_anchor_look(tmp_path, catalog_path):
    from core.queries import look
    from training.data import group_indices
    from training.train import look_partners
    df, report = read_catalog(str(catalog_path), limit=240)
    products = build_product_set(df, None, report)
    train_idx = np.arange(len(products))
    pools = group_indices(products, train_idx, look)
    anchors = train_idx[:120]
    partners = look_partners(anchors, pools, products, train_idx, np.random.default_rng(0))
    for a, b in zip(anchors, partners):
        if len(pools[look(products.attrs[a])]) > 1:  # a look of one product falls back to any product
            assert b != a and look(products.attrs[b]) == look(products.attrs[a])
    paired = sum(len(pools[look(products.attrs[a])]) > 1 for a in anchors)
    assert paired > 60  # the slice has looks of several products; else the test proves nothing


def test_logit_adjusted_heads_favour_rare_labels_less(tmp_path, catalog_path):
    """With the prior added in the loss, a head that outputs the prior's log itself scores no better than flat
    logits: the heads need not learn label frequency, so their own logits rank labels as if balanced."""
    from training.train import AttributeHeads
    df, report = read_catalog(str(catalog_path), limit=240)
    products = build_product_set(df, None, report)
    idx = np.arange(len(products))
    plain = AttributeHeads(products, idx, part_dim=8)
    adjusted = AttributeHeads(products, idx, part_dim=8, logit_adjust=1.0)
    adjusted.load_state_dict(plain.state_dict())
    for heads in (plain, adjusted):
        for head in heads.heads.values():
            torch.nn.init.zeros_(head.weight)
            torch.nn.init.zeros_(head.bias)
    image = torch.zeros(len(idx), 8)
    # Flat logits: plain CE is the labels' entropy under a uniform guess; adjusted CE is the CE of the prior,
    # which is lower whenever labels are imbalanced (they are, in any real catalog slice).
    assert adjusted(image, idx).item() < plain(image, idx).item() - 0.1


def test_look_pairs_training_runs_and_resumes_the_same(tmp_path, catalog_path):
    cfg = _cfg(tmp_path, catalog=str(catalog_path), look_pairs=True, attribute_logit_adjust=1.0, attribute_scale=True,
               max_steps=3)
    train(cfg)
    config = json.loads((Path(cfg.out) / "config.json").read_text())
    assert config["train_cfg"]["look_pairs"] is True
    assert config["train_cfg"]["attribute_logit_adjust"] == 1.0


def test_calibration_without_a_photo_keeps_the_weight_and_says_so(catalog_path, caplog):
    from training.calibrate import calibrate
    model, tokenizer = create_model("test-tiny"), create_tokenizer("test-tiny")
    df, report = read_catalog(str(catalog_path), limit=16)
    image_cfg = preprocess_config(model.cfg)["image"]
    products = build_product_set(df, image_cfg, report)
    record = calibrate(model, tokenizer, products, np.array([], dtype=np.int64), image_cfg)
    assert record["chosen"] == model.cfg.image_query_text_weight and record["rows"] == [] and record["products"] == 0
    assert "uncalibrated" in caplog.text
