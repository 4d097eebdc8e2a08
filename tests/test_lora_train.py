"""klein-train-lora on the tiny pipeline: data checks, the loss falls, resuming is exact, diffusers reads the adapter."""

import json

import jax
import numpy as np
import pytest
from tiny_pipeline import load_reference_pipeline

from conftest import noise, random_image
from klein_jax.configs import TINY_TEXT_ENCODER
from klein_jax.lora import LoraAdapters, linear_targets
from klein_jax.train.cli import main as train_main
from klein_jax.train.data import Example, bucket_sizes, epoch_batches, scan_dataset
from klein_jax.train.step import TrainConfig
from klein_jax.train.trainer import LoraTrainer

WIDTH, HEIGHT = 48, 32
STEPS = 15  # enough for the loss to fall by > 20% at learning rate 3e-2


def write_data(folder, sizes):
    folder.mkdir()
    for i, (w, h) in enumerate(sizes):
        random_image(w, h, seed=i).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of sks thing number {i}")
    return folder


def config(**kwargs) -> TrainConfig:
    return TrainConfig(**{"rank": 4, "resolution": 32, "steps": 4, "learning_rate": 2e-3, "checkpoint_every": 100,
                          **kwargs})


def test_bad_files_are_named_before_training(tmp_path, capsys):
    folder = write_data(tmp_path / "data", [(32, 32)])
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "broken.txt").write_text("x")
    random_image(8, 8).save(folder / "nocaption.jpg")
    (folder / "empty.webp").write_bytes(b"")
    (folder / "empty.txt").write_text("  ")
    (folder / "orphan.txt").write_text("no image")
    with pytest.raises(ValueError) as error:
        scan_dataset(folder, 32, 4)
    message = str(error.value)
    assert "4 bad training files" in message
    for name in ("broken.png: cannot be read", "nocaption.jpg: no caption", "empty.txt: empty caption",
                 "orphan.txt: a caption without an image"):
        assert name in message

    references = tmp_path / "refs"
    references.mkdir()
    random_image(8, 8).save(references / "orphan.png")
    (references / "img0.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match=r"2 bad training files: reference orphan.png: no training image orphan.*; "
                                         r"reference img0.png: cannot be read"):
        scan_dataset(write_data(tmp_path / "pairs", [(32, 32)]), 32, 4, references)

    # klein-train-lora names them before it loads the model (which does not even exist here): exit 1, one line
    assert train_main(["--model", str(tmp_path / "no-model"), "--data", str(folder), "--out", str(tmp_path / "o"),
                       "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "4 bad training files" in err[0] and "klein-train-lora: error:" in err[0]


def test_buckets_and_data_order():
    sizes = bucket_sizes(1024, 16)
    assert sizes[4] == (1024, 1024) and (1360, 768) in sizes  # 16:9 at ~1024^2 pixels
    assert all(w % 16 == 0 and h % 16 == 0 and abs(w * h / 1024**2 - 1) < 0.05 for w, h in sizes)

    items = [Example(None, "c", (32, 32))] * 3 + [Example(None, "c", (40, 24))] * 2
    first = epoch_batches(items, 2, seed=0, epoch=0)
    assert first.shape == (3, 2) and np.array_equal(first, epoch_batches(items, 2, seed=0, epoch=0))
    assert all(len({items[i].bucket for i in batch}) == 1 for batch in first)  # one bucket per batch
    assert not np.array_equal(first, epoch_batches(items, 2, seed=0, epoch=1))


@pytest.mark.parametrize("model, edit_pairs", [("tiny_pipeline", False), ("tiny_base_pipeline", True)],
                         ids=["distilled", "base-edit-pairs"])
def test_loss_falls_on_a_fixed_batch(model, edit_pairs, request, tmp_path):
    """Text-to-image on the distilled model; edit pairs (a reference image per target) on the base model."""
    pipe = request.getfixturevalue(model)
    data = write_data(tmp_path / "data", [(32, 32)])
    references = None
    if edit_pairs:
        references = tmp_path / "refs"
        references.mkdir()
        random_image(40, 40, seed=9).save(references / "img0.jpg")
    trainer = LoraTrainer(pipe, data, tmp_path / "out", config(steps=STEPS, learning_rate=3e-2, targets=".*"),
                          references)
    keys = [jax.random.key(100 + i) for i in range(4)]
    lora, _ = trainer.initial_state()
    before = np.mean([trainer.loss(lora, [0], k) for k in keys])
    path = trainer.run()
    after = np.mean([trainer.loss(trainer.lora, [0], k) for k in keys])
    assert after < 0.8 * before, (before, after)
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    assert set(lines[0]) == {"step", "loss", "learning_rate", "grad_norm", "seconds"}
    if edit_pairs:  # the reference's tokens (t = 10) condition the prediction
        batch = trainer.batch([0])
        assert batch["ref_latents"].shape == batch["latents"].shape and set(batch["ref_ids"][:, 0]) == {10}
        other = {**batch, "ref_latents": np.zeros_like(batch["ref_latents"])}
        assert abs(trainer.loss(trainer.lora, [0], keys[0]) - float(trainer._loss(trainer.lora, trainer.base_state,
                                                                                  other, keys[0]))) > 1e-4
    adapters = LoraAdapters(linear_targets(pipe.transformer), np.float32)  # the written adapter loads
    assert len(adapters.adapters[adapters.load(path)].factors) == len(trainer.layout.targets)


def test_resume_continues_exactly(tiny_pipeline, tmp_path):
    data = write_data(tmp_path / "data", [(32, 32), (33, 32), (32, 33)])  # one bucket: one compiled step
    whole = LoraTrainer(tiny_pipeline, data, tmp_path / "whole", config(steps=5))
    whole.run()
    stopped = LoraTrainer(tiny_pipeline, data, tmp_path / "split", config(steps=5))
    assert stopped.run(stop_after=3) is None
    resumed = LoraTrainer(tiny_pipeline, data, tmp_path / "split", config(steps=5))
    resumed.run(resume=True)

    def losses(out):
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "whole") == losses(tmp_path / "split")  # step 4 (N + 1) and 5 included, bit for bit
    for a, b in zip(jax.tree.leaves(whole.lora), jax.tree.leaves(resumed.lora)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_written_adapter_matches_diffusers(tiny_pipeline, tiny_checkpoint, tmp_path):
    data = write_data(tmp_path / "data", [(32, 32)])
    out = tmp_path / "out"
    assert train_main(["--model", str(tiny_checkpoint.klein), "--data", str(data), "--out", str(out),
                       "--rank", "4", "--lora-alpha", "8", "--steps", "6", "--learning-rate", "2e-2",
                       "--resolution", "32", "--dtype", "float32", "--no-progress"]) == 0
    latents = noise(WIDTH, HEIGHT, seed=4)
    reference = load_reference_pipeline(tiny_checkpoint.diffusers)
    reference.set_progress_bar_config(disable=True)

    def diffusers_image():
        import torch

        return reference(prompt=["a photo of sks thing"], width=WIDTH, height=HEIGHT, num_inference_steps=4,
                         latents=torch.from_numpy(latents), output_type="np",
                         text_encoder_out_layers=TINY_TEXT_ENCODER.out_layers).images

    plain = diffusers_image()
    reference.load_lora_weights(out, adapter_name="trained")
    want = diffusers_image()
    assert np.abs(want - plain).max() > 1e-3  # the trained adapter changes the image
    tiny_pipeline.load_lora_weights(out, adapter_name="trained")
    try:
        got = tiny_pipeline("a photo of sks thing", width=WIDTH, height=HEIGHT, latents=latents, output_type="np")
    finally:
        tiny_pipeline.unload_lora_weights()
    assert np.abs(got - want).max() <= 1e-4
