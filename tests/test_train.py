from dataclasses import asdict, replace

import pytest
import torch

from fullrange import batches, checkpoint, losses, models, toy, train

SIZE = 8


@pytest.fixture(scope="module")
def data():
    return toy.synthetic_images(32, size=SIZE, channels=3, seed=0)


def _model():
    return models.tiny_unet(SIZE, 3, width=8)


@pytest.mark.parametrize("name", list(losses.RECIPES))
def test_one_step_decreases_the_loss_on_a_fixed_batch(name, data):
    images, labels = data
    recipe = losses.get_recipe(name)
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    cond = {"class_labels": labels[:16]}

    def loss():
        return losses.batch_loss(model, images[:16], cond, recipe, torch.Generator().manual_seed(7))

    before = loss()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after.item() < before.item()


def test_recipes_differ_in_what_they_feed_the_model(data):
    """Same draw, different recipe: the noisy input (offset, pyramid) or the target (v) changes."""
    images, labels = data
    seen = {}
    for name, recipe in losses.RECIPES.items():
        calls = []

        def model(x_t, t, class_labels, calls=calls):
            calls.append(x_t)
            return torch.zeros_like(x_t)

        seen[name] = (
            losses.batch_loss(
                model, images[:4], {"class_labels": labels[:4]}, recipe, torch.Generator().manual_seed(1)
            ),
            calls[0],
        )
    assert not torch.equal(seen["baseline"][1], seen["offset"][1])
    assert not torch.equal(seen["baseline"][1], seen["pyramid"][1])
    assert seen["baseline"][0].item() != pytest.approx(seen["ztsnr"][0].item())


CONFIG = train.TrainConfig(steps=6, batch_size=4, lr=1e-3, warmup=2, checkpoint_every=3, ema_decay=0.999, seed=0)


class _Stop(Exception):
    pass


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    _resume_is_exact({}, str(tmp_path))


def test_resume_refuses_another_recipe(tmp_path, data):
    images, labels = data
    train.train(
        _model(),
        batches.labelled(images, labels, 5),
        losses.get_recipe("baseline"),
        replace(CONFIG, steps=2),
        tmp_path,
        progress=False,
    )
    with pytest.raises(
        ValueError, match=r"differs from the checkpoint's in recipe.name \('baseline' in the checkpoint"
    ):
        train.train(
            _model(),
            batches.labelled(images, labels, 5),
            losses.get_recipe("offset"),
            replace(CONFIG, steps=2),
            tmp_path,
            progress=False,
        )
    with pytest.raises(ValueError, match=r"train.lr \(0.001 in the checkpoint, 0.002 now\)"):
        train.train(
            _model(),
            batches.labelled(images, labels, 5),
            losses.get_recipe("baseline"),
            replace(CONFIG, steps=2, lr=2e-3),
            tmp_path,
            progress=False,
        )
    with pytest.raises(ValueError, match="at step 2, beyond the 1 steps asked for"):
        train.train(
            _model(),
            batches.labelled(images, labels, 5),
            losses.get_recipe("baseline"),
            replace(CONFIG, steps=1),
            tmp_path,
            progress=False,
        )
    # More steps than the checkpoint's run: it continues from step 2.
    longer = train.train(
        _model(),
        batches.labelled(images, labels, 5),
        losses.get_recipe("baseline"),
        replace(CONFIG, steps=4),
        tmp_path,
        progress=False,
    )
    assert len(longer.losses) == 4 and checkpoint.Checkpoint(tmp_path / "checkpoint.safetensors").step == 4


def _poisoned(good, bad):
    """``good``'s batches, made all nan on the calls (counted from 1) where ``bad(call)``."""
    calls = []

    def poisoned(batch_size, generator):
        calls.append(1)
        batch = good(batch_size, generator)
        return batches.Batch(batch.x0 * float("nan"), batch.cond) if bad(len(calls)) else batch

    return poisoned


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data):
    images, labels = data
    poisoned = _poisoned(batches.labelled(images, labels, 5), lambda call: call >= 4)

    config = replace(CONFIG, steps=6, checkpoint_every=2)
    with pytest.raises(train.TrainingDiverged, match=r"the loss is nan at step 3: .* last good checkpoint is step 2"):
        train.train(_model(), poisoned, losses.get_recipe("baseline"), config, tmp_path, progress=False)
    ckpt = checkpoint.Checkpoint(tmp_path / "checkpoint.safetensors")
    assert ckpt.step == 2 and all(torch.isfinite(t).all() for t in ckpt.group("model").values())


def test_validation_callback_and_loss_log(tmp_path, data):
    images, labels = data
    seen = []
    result = train.train(
        _model(),
        batches.labelled(images, labels, 5),
        losses.get_recipe("baseline"),
        CONFIG,
        tmp_path,
        progress=False,
        on_checkpoint=lambda step, model: seen.append(step),
    )
    assert seen == [3, 6] and len(result.losses) == 6
    saved = checkpoint.Checkpoint(tmp_path / "checkpoint.safetensors")
    assert saved.group("log")["loss"].tolist() == result.losses and saved.meta["recipe"]["name"] == "baseline"


@pytest.mark.parametrize(
    "change,match",
    [
        ({"steps": 0}, "steps must be positive"),
        ({"batch_size": -1}, "batch_size must be positive"),
        ({"ema_decay": 1.0}, "ema_decay"),
    ],
)
def test_bad_config(change, match):
    with pytest.raises(ValueError, match=match):
        replace(CONFIG, **change)


def test_bad_model_size():
    with pytest.raises(ValueError, match="even sample_size"):
        models.tiny_unet(0)


def test_output_directory_that_is_a_file(tmp_path, data):
    images, labels = data
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        train.train(
            _model(),
            batches.labelled(images, labels, 5),
            losses.get_recipe("baseline"),
            CONFIG,
            target,
            progress=False,
        )


def test_gradient_accumulation_equals_the_bigger_batch(tmp_path, data):
    """Two accumulated batches of 4 take the same step as one batch of the same 8 samples."""
    images, labels = data
    recipe = losses.get_recipe("ztsnr")
    draws = []

    def counted(batch_size, generator):
        draws.append(batch_size)
        return batches.labelled(images, labels, 5, dropout=0.0)(batch_size, generator)

    config = replace(CONFIG, steps=1, batch_size=4, grad_accum=2, grad_clip=0.0)
    accumulated = train.train(_model(), counted, recipe, config, tmp_path / "a", progress=False)
    assert draws == [4, 4]

    # The same 8 samples, noises and timesteps in one batch: replay the generator's draws.
    generator = torch.Generator().manual_seed(config.seed)
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr_at(0, config), weight_decay=0.0)
    total = 0.0
    for _ in range(2):
        batch = batches.labelled(images, labels, 5, dropout=0.0)(4, generator)
        total = total + losses.batch_loss(model, batch.x0, batch.cond, recipe, generator) / 2
    total.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(accumulated.model.get_parameter(name), p, atol=1e-6, rtol=1e-5)
    assert accumulated.losses[0] == pytest.approx(total.item(), rel=1e-5)


def test_no_ema_is_kept_when_ema_is_off(tmp_path, data):
    """ema_decay = 0: nothing cloned, updated or saved; the checkpoint holds the model and Adam's two moments."""
    images, labels = data
    config = replace(CONFIG, steps=2, ema_decay=0.0)
    result = train.train(
        _model(), batches.labelled(images, labels, 5), losses.get_recipe("baseline"), config, tmp_path, progress=False
    )
    assert result.ema is None
    saved = checkpoint.Checkpoint(tmp_path / "checkpoint.safetensors")
    assert saved.names("ema") == [] and len(saved.names("model")) == len(list(result.model.parameters()))
    assert {name.split(".")[1] for name in saved.names("optimizer")} == {"exp_avg", "exp_avg_sq", "step"}
    with pytest.raises(ValueError, match="no EMA"):
        result.apply_ema()


def test_validation_sees_the_ema_weights_swapped_in_place(tmp_path, data):
    """The callback gets the model itself (no copy), in eval mode, holding the EMA weights; training then goes on
    with its own weights, and apply_ema puts the final EMA in place."""
    images, labels = data
    model = _model()
    seen = []

    def callback(step, given):
        assert given is model and not given.training
        seen.append({n: p.detach().clone() for n, p in given.named_parameters()})

    result = train.train(
        model,
        batches.labelled(images, labels, 5),
        losses.get_recipe("baseline"),
        CONFIG,
        tmp_path,
        progress=False,
        on_checkpoint=callback,
    )
    assert model.training
    final = seen[-1]  # at the last checkpoint, which is the end of training
    assert all(torch.equal(final[n], result.ema[n]) for n in final)
    own = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert any(not torch.equal(own[n], final[n]) for n in own)
    saved = checkpoint.Checkpoint(tmp_path / "checkpoint.safetensors")
    assert all(torch.equal(saved.group("model")[n], own[n]) for n in own)
    result.apply_ema()
    assert all(torch.equal(p, final[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize(
    "name,theirs", [("constant", "constant_with_warmup"), ("linear", "linear"), ("cosine", "cosine")]
)
def test_lr_schedules_are_diffusers_after_the_warm_up(name, theirs):
    """After the warm-up each schedule is diffusers' ``get_scheduler``'s; during it, step s trains at diffusers'
    rate of step s + 1 (never at 0)."""
    from diffusers.optimization import get_scheduler

    config = train.TrainConfig(steps=50, lr=1e-3, warmup=10, lr_schedule=name)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.lr)
    schedule = get_scheduler(theirs, optimizer, num_warmup_steps=10, num_training_steps=50)
    rates = []
    for _ in range(51):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    ours = [train.lr_at(s, config) for s in range(50)]
    assert ours[10:] == pytest.approx(rates[10:50], abs=1e-12)
    assert ours[:10] == pytest.approx(rates[1:11], abs=1e-12)
    assert ours[0] == pytest.approx(1e-4) and (
        ours[-1] == pytest.approx(1e-3) if name == "constant" else ours[-1] < 1e-4
    )


def test_a_diverged_run_resumes_from_its_last_good_checkpoint_with_a_lower_lr(tmp_path, data):
    """Every checkpoint written had a finite loss at its weights; the error names the last one, and resuming from it
    may lower the learning rate (once: the marker goes with the resumed run's first checkpoint)."""
    images, labels = data
    good = batches.labelled(images, labels, 5)
    poisoned = _poisoned(good, lambda call: call == 4)

    config = replace(CONFIG, steps=6, checkpoint_every=1)
    # The 4th draw is NaN: step 3's loss; the checkpoint of step 3 is never written, step 2's is the last good one.
    with pytest.raises(train.TrainingDiverged, match=r"the loss is nan at step 3: .* last good checkpoint is step 2"):
        train.train(_model(), poisoned, losses.get_recipe("baseline"), config, tmp_path, progress=False)
    assert (tmp_path / train.DIVERGED).exists()
    with pytest.raises(ValueError, match="cannot resume"):  # anything else still has to match
        train.train(_model(), good, losses.get_recipe("baseline"), replace(config, seed=9), tmp_path, progress=False)
    lines = []
    lower = replace(config, lr=config.lr / 10)
    result = train.train(
        _model(), good, losses.get_recipe("baseline"), lower, tmp_path, progress=False, log=lines.append
    )
    assert lines == [f"resuming from step 2 of 6 ({tmp_path / 'checkpoint.safetensors'})"] and len(result.losses) == 6
    assert not (tmp_path / train.DIVERGED).exists()
    with pytest.raises(ValueError, match="cannot resume"):  # the marker is gone: the lr is the checkpoint's again
        train.train(_model(), good, losses.get_recipe("baseline"), config, tmp_path, progress=False)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"fused_backward": True, "grad_accum": 2, "grad_clip": 0.0}, "needs grad_accum 1"),
        ({"fused_backward": True}, "needs grad_clip 0"),
        ({"fused_backward": True, "grad_clip": 0.0, "mixed_precision": "fp16"}, "does not work with fp16"),
        ({"full_bf16": True}, "full_bf16 needs mixed_precision bf16, got .no."),
        ({"optimizer": "prodigy", "lr": 1.0, "fused_backward": True, "grad_clip": 0.0}, "needs all of them at once"),
        ({"optimizer": "prodigy"}, "lr 0.001 with prodigy: its lr multiplies the step size it estimates; use 1.0"),
        ({"memory": "4gb"}, "memory .4gb. is not one of 24gb, 16gb, 12gb, 8gb"),
    ],
)
def test_memory_settings_refused_with_the_reason(change, match):
    with pytest.raises(ValueError, match=match):
        replace(CONFIG, **change)


def test_prepare_stores_frozen_weights_in_the_half_type_and_trained_ones_in_fp32():
    model = _model()
    frozen = [name for name, p in model.named_parameters() if not name.startswith("conv_out")]
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    trained = train.prepare(model, replace(CONFIG, mixed_precision="bf16"))
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    assert {model.get_parameter(name).dtype for name in frozen} == {torch.bfloat16}
    trained = train.prepare(model, replace(CONFIG, mixed_precision="bf16", full_bf16=True))
    assert {p.dtype for p in trained.values()} == {torch.bfloat16}


FUSED = {"fused_backward": True, "grad_clip": 0.0}


def test_a_fused_backward_trains_as_the_ordinary_step(tmp_path, data):
    """Each tensor stepped inside the backward pass: the same losses and weights as the step after it (AdamW over
    one tensor at a time: float rounding apart)."""
    images, labels = data
    recipe = losses.get_recipe("ztsnr")
    config = replace(CONFIG, steps=4, grad_clip=0.0)
    runs = [
        train.train(
            _model(), batches.labelled(images, labels, 5), recipe, replace(config, **c), tmp_path / n, progress=False
        )
        for n, c in (("plain", {}), ("fused", FUSED))
    ]
    assert runs[0].losses == pytest.approx(runs[1].losses, rel=1e-5)
    for (name, a), b in zip(runs[0].model.named_parameters(), runs[1].model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    saved = checkpoint.Checkpoint(tmp_path / "fused" / "checkpoint.safetensors").optimizer_state()
    assert len(saved["param_groups"]) == len(saved["state"]) == len(list(runs[1].model.parameters()))
    # No hook is left on the model: a backward pass after training leaves the gradients in place.
    losses.batch_loss(runs[1].model, images[:2], {"class_labels": labels[:2]}, recipe, torch.Generator()).backward()
    assert all(p.grad is not None for p in runs[1].model.parameters())


def _resume_is_exact(changes: dict, folder: str) -> None:
    """A run with ``changes`` stopped during step 4 and resumed ends with the losses, weights and EMA of the run that
    was not stopped."""
    from pathlib import Path

    folder = Path(folder)
    images, labels = toy.synthetic_images(32, size=SIZE, channels=3, seed=0)
    recipe = losses.get_recipe("ztsnr")
    config = replace(CONFIG, **changes)
    straight = train.train(_model(), batches.labelled(images, labels, 5), recipe, config, folder / "a", progress=False)
    model = _model()
    forward, calls = model.forward, []

    def failing_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise _Stop
        return forward(*args, **kwargs)

    model.forward = failing_forward
    with pytest.raises(_Stop):
        train.train(model, batches.labelled(images, labels, 5), recipe, config, folder / "b", progress=False)
    assert checkpoint.Checkpoint(folder / "b" / "checkpoint.safetensors").step == 3
    resumed = train.train(_model(), batches.labelled(images, labels, 5), recipe, config, folder / "b", progress=False)
    assert resumed.losses == straight.losses
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    for a, b in zip(straight.ema.values(), resumed.ema.values(), strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)


BF16 = {"mixed_precision": "bf16", "full_bf16": True}


@pytest.mark.parametrize(
    "changes", [FUSED, FUSED | {"optimizer": "adafactor"}, BF16, BF16 | FUSED | {"optimizer": "adafactor"}]
)
def test_resume_is_bit_exact_with_each_memory_setting(changes, tmp_path):
    """bf16 runs go to a process of their own: accelerate keeps one precision per process."""
    import subprocess
    import sys
    from pathlib import Path

    if changes.get("mixed_precision") is None:
        _resume_is_exact(changes, str(tmp_path))
        return
    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_train; "
        f"test_train._resume_is_exact({changes!r}, {str(tmp_path)!r})"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


def test_a_checkpoint_written_before_a_setting_existed_resumes_at_its_default(tmp_path, data):
    """Checkpoints of an earlier version lack the settings added since (here the memory ones): at their defaults
    the run resumes; set otherwise, it is refused naming the setting."""
    images, labels = data
    recipe = losses.get_recipe("baseline")
    config = replace(CONFIG, steps=2)
    train.train(_model(), batches.labelled(images, labels, 5), recipe, config, tmp_path, progress=False)
    path = tmp_path / "checkpoint.safetensors"
    old = checkpoint.Checkpoint(path)
    meta = old.meta
    for key in ("full_bf16", "fused_backward", "memory"):
        del meta["train"][key]
    checkpoint.save_checkpoint(
        path,
        step=old.step,
        model=old.group("model"),
        ema=old.group("ema"),
        optimizer=old.optimizer_state(),
        rng=old.group("rng"),
        log=old.group("log"),
        meta=meta,
    )
    assert train.check_resume(path, {"recipe": recipe.describe(), "train": asdict(replace(config, steps=3))}, 3)
    fused = asdict(replace(config, steps=3, fused_backward=True, grad_clip=0.0))
    with pytest.raises(ValueError, match=r"train.fused_backward \('absent' in the checkpoint, True now\)"):
        train.check_resume(path, {"recipe": recipe.describe(), "train": fused}, 3)
