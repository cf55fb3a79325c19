"""Many processes: torchrun with 2 CPU processes over gloo, against one process with the
same global batch (2 x 16 = 1 x 32) and seed.

Two torchrun runs are made once per module (each costs ~15 s on two cores): a whole one, and one
sent SIGTERM after step 4, the first of epoch 2, which stops every rank after step 5 (the ranks
agree on stop requests in the next step's all-reduce). Reference runs with one process are made in-process.
The model is the tiny one from conftest.py in fp32, with SyncBatchNorm on so that the BatchNorm
statistics are those of the global batch, as in the one-process run.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import TINY, any_arch
from helpers.faults import ENV as SIGNAL_AT_STEP
from helpers.faults import SCRIPT as VAE_WITH_FAULTS
from image_autoencoding.cli import main
from image_autoencoding.config import load_config
from image_autoencoding.data.batches import Normalizer, steps_per_epoch, training_batches
from image_autoencoding.data.image_data import load_image_data
from image_autoencoding.evaluation.evaluate import evaluate_split
from image_autoencoding.models.factory import build_model
from image_autoencoding.runs.checkpoint import load_checkpoint
from image_autoencoding.runs.checkpointing import Checkpointing
from image_autoencoding.runs.loading import load_from_run
from image_autoencoding.training.callbacks import Callback
from image_autoencoding.training.distributed import Distributed
from image_autoencoding.training.interrupts import TrainingInterrupted
from image_autoencoding.training.sharded_evaluation import shard_range
from image_autoencoding.training.steps.vae import VAEObjective
from image_autoencoding.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]

# Per-process batch 16; the one-process references use 32. 2 epochs of 3 steps, 50 valid images.
COMMON = [
    "data.dataset=digits", *[o for o in TINY if not o.startswith("train.batch_size")], "train.epochs=2",
    "train.precision=fp32", "train.device=cpu", "train.eval_images=50", "train.checkpoint_every=1",
]
# alpha=1/batch_size: the step's KL weight must be 1/32 (the global batch) on every rank for the two
# runs to agree. The KL warm-up is checked by its weights per step instead (see
# test_ranks_agree_on_losses_flags_and_stop_requests...): from a first step with KL weight 0 this
# tiny run is chaotic, and one process with 1 or 2 threads (summation order alone) ends epoch 1
# with validation KL 0.0592 against 0.0606.
KL = ["train.alpha=1/batch_size"]
TWO = [*COMMON, *KL, "train.batch_size=16", "train.sync_batchnorm=true"]
ONE = [*COMMON, *KL, "train.batch_size=32"]


def _torchrun(args: list[str], signal_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (SIGNAL_AT_STEP, "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    if signal_at:
        env[SIGNAL_AT_STEP] = signal_at
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               VAE_WITH_FAULTS, "train", "--quiet", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)


def _run_dir(output: Path) -> Path:
    (run,) = (output / "results" / "vae").iterdir()  # exactly one run folder
    return run


def _metrics(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def _one_process(args: list[str]) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--quiet", *args]) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    two = _torchrun([*TWO, f"train.output_dir={root / 'two'}"])
    assert two.returncode == 0, two.stderr[-3000:]
    stopped = _torchrun([*TWO, f"train.output_dir={root / 'stopped'}"], "SIGTERM@4")
    assert stopped.returncode != 0 and "SIGTERM" in stopped.stderr, stopped.stderr[-3000:]
    _one_process([*ONE, f"train.output_dir={root / 'one'}"])
    return {"two": _run_dir(root / "two"), "stopped": _run_dir(root / "stopped"), "one": _run_dir(root / "one"),
            "root": root, "two_stdout": two.stdout}


def _assert_rows_close(rows: list[dict[str, str]], reference: list[dict[str, str]], rel: float) -> None:
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in reference]
    for row, expected in zip(rows, reference, strict=True):
        for column in expected:
            if column not in ("images_per_s", "seconds"):
                assert float(row[column]) == pytest.approx(float(expected[column]), rel=rel, abs=1e-6), column


def test_two_processes_train_as_one_process_with_the_global_batch(runs):
    two, one = _metrics(runs["two"]), _metrics(runs["one"])
    # The first epoch's 3 steps agree to the 6 digits metrics.csv keeps; the differences are float
    # summation order (two half-batch sums, all-reduced), which RMSprop's early steps amplify a little.
    _assert_rows_close(two[:1], one[:1], rel=2e-5)
    _assert_rows_close(two, one, rel=1e-3)
    weights_two = load_checkpoint(runs["two"] / "checkpoints/epoch_1.pt").model
    weights_one = load_checkpoint(runs["one"] / "checkpoints/epoch_1.pt").model
    for key, value in weights_one.items():
        torch.testing.assert_close(weights_two[key], value, rtol=1e-3, atol=1e-4, msg=key)
    state = load_checkpoint(runs["two"] / "checkpoints/last.pt")
    assert state.world_size == 2 and state.step == 6 and state.config["train"]["batch_size"] == 16


def test_only_rank_0_writes_one_complete_run_folder(runs):
    run = runs["two"]
    assert runs["two_stdout"].strip() == str(run)  # printed once, by rank 0
    assert [r["epoch"] for r in _metrics(run)] == ["1", "2"]
    for name in ("config.yaml", "train.log", "report.md", "metrics.json", "checkpoints/best.pt",
                 "checkpoints/epoch_1.pt", "checkpoints/epoch_2.pt", "checkpoints/last.pt",
                 "images/valid/reconstruction_epoch_002.png", "images/samples/samples_epoch_002.png"):
        assert (run / name).is_file(), name
    assert len(list((run / "tensorboard").iterdir())) == 1  # one events file: one writer
    log = (run / "train.log").read_text()
    assert log.count("epoch 2/2") == 1 and "2 processes, global batch 32 (16 per process)" in log
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


def test_validation_across_ranks_equals_one_process_scoring_every_image(runs):
    """The last metrics.csv row was scored 25 images per rank; here one process scores the same 50
    images with the same weights, as `vae evaluate` does."""
    trained = load_from_run(runs["two"], "last")
    config, model = trained.config, trained.model
    data = load_image_data(config.data, progress=False)
    normalize = Normalizer(config.data, torch.device("cpu"))
    evaluation = evaluate_split(model, data.valid.images, normalize, torch.device("cpu"), 32, limit=50)
    assert evaluation.n == 50
    last = _metrics(runs["two"])[-1]
    for name, value in evaluation.means().items():
        assert float(last[f"valid_{name}"]) == pytest.approx(value, rel=1e-5), name


def test_a_two_process_run_resumes_inside_an_epoch_with_one_process(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["stopped"], run)
    state = load_checkpoint(run / "checkpoints/last.pt")
    assert (state.step, state.epoch_progress["steps"], state.world_size) == (5, 2, 2)
    # Inside an epoch the global batch must stay: 1 x 16 is refused, naming it; 1 x 32 continues.
    assert main(["train", "--quiet", "--resume", str(run), "train.batch_size=16"]) == 2
    assert "global batch" in capsys.readouterr().err
    _one_process(["--resume", str(run), "train.batch_size=32"])

    # It ends where the uninterrupted two-process run ended (to float summation order: measured
    # 1.2e-7 at most), and its epoch rows are that run's.
    resumed = load_checkpoint(run / "checkpoints/last.pt")
    uninterrupted = load_checkpoint(runs["two"] / "checkpoints/last.pt")
    assert resumed.step == uninterrupted.step == 6 and resumed.world_size == 1
    for key, value in uninterrupted.model.items():
        torch.testing.assert_close(resumed.model[key], value, rtol=1e-5, atol=1e-6, msg=key)
    _assert_rows_close(_metrics(run), _metrics(runs["two"]), rel=2e-5)


def vae_gan_first_step(rank: int, root: Path, world: int, model: tuple[str, ...] = ()) -> None:
    """The first VAE-GAN step (free bits and prior samples on: every term that draws noise or sums
    over the batch) on one of `world` gloo ranks (spawned), or in the one process, of the tiny model
    or the one `model`'s overrides describe; rank 0 saves the gradients each network's optimizer
    stepped with, and the step's loss sums, to gan{world}.pt."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    try:
        tiny = any_arch(COMMON) if model else COMMON  # `model` names its own architecture's keys
        config = load_config(None, [*tiny, "model.mode=vae-gan", "model.discriminator_channels=[8,16,16,16,32]",
                                    "train.gan_prior_samples=true", "train.free_bits=0.05", "train.sync_batchnorm=true",
                                    f"train.batch_size={32 // world}", f"train.output_dir={root}", *model])
        trainer = Trainer(config, load_image_data(config.data, progress=False),
                          dist=Distributed(rank, rank, world))
        values = trainer.train_epoch(1, max_steps=1)
        networks = {"encoder": trainer.model.encoder, "decoder": trainer.model.decoder,
                    "discriminator": trainer.training_step.discriminator}
        grads = {f"{name}.{key}": p.grad for name, net in networks.items() for key, p in net.named_parameters()}
        if rank == 0:
            torch.save({"grads": grads, "values": values}, root / f"gan{world}.pt")
    finally:
        torch.set_num_threads(threads)  # the one-process reference runs in the test's own process
        if world > 1:
            dist.destroy_process_group()


def test_vae_gan_on_two_processes_takes_the_step_of_one_process_with_the_global_batch(tmp_path):
    """Gradients, not weights after several steps: from the same first gradients, RMSprop's
    sign-sized first updates make this tiny VAE-GAN chaotic (one process with 1 or 2 threads, i.e.
    another summation order, ends 3 steps 6e-3 apart in an encoder weight)."""
    mp.spawn(vae_gan_first_step, args=(tmp_path, 2), nprocs=2)
    vae_gan_first_step(0, tmp_path, 1)
    two, one = torch.load(tmp_path / "gan2.pt"), torch.load(tmp_path / "gan1.pt")
    for key in ("train_recon", "train_kl", "train_loss"):
        assert two["values"][key] == pytest.approx(one["values"][key], rel=1e-5), key
    for key, grad in one["grads"].items():
        # Within 1% of the gradient's largest element: BatchNorm's backward subtracts nearly equal
        # sums, so summation order alone moves some elements that much (see test_train's compile test).
        torch.testing.assert_close(two["grads"][key], grad, rtol=0, atol=1e-2 * float(grad.abs().max()), msg=key)


def ldm_first_step(rank: int, root: Path, world: int) -> None:
    """The first model.mode=ldm step with the discriminator on (its hinge loss, the GAN term and the
    adaptive weight; free bits on) on one of `world` gloo ranks, or in the one process; rank 0 saves
    the gradients each optimizer stepped with (the logvar's too) to ldm{world}.pt."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    try:
        # KL: ldm's default KL weight, 1e-6, leaves the encoder's mean bias a gradient of rounding
        # size only (the seed decoder's BatchNorm cancels a shift of every latent).
        config = load_config(None, [*COMMON, *KL, "model.mode=ldm", "model.patch_discriminator_width=4",
                                    "model.patch_discriminator_layers=2", "train.disc_start=0",
                                    "train.perceptual_weight=0", "train.free_bits=0.05", "train.sync_batchnorm=true",
                                    f"train.batch_size={32 // world}", f"train.output_dir={root}"])
        trainer = Trainer(config, load_image_data(config.data, progress=False), dist=Distributed(rank, rank, world))
        values = trainer.train_epoch(1, max_steps=1)
        step = trainer.training_step
        networks = {"encoder": trainer.model.encoder, "decoder": trainer.model.decoder,
                    "discriminator": step.discriminator, "ldm_loss": step.loss}
        grads = {f"{name}.{key}": p.grad for name, net in networks.items() for key, p in net.named_parameters()}
        if rank == 0:
            torch.save({"grads": grads, "values": values}, root / f"ldm{world}.pt")
    finally:
        torch.set_num_threads(threads)
        if world > 1:
            dist.destroy_process_group()


def test_ldm_on_two_processes_takes_the_step_of_one_process_with_the_global_batch(tmp_path):
    """The adaptive weight is a ratio of gradient norms: computed from each rank's own gradients it
    would differ per rank and from one process's."""
    mp.spawn(ldm_first_step, args=(tmp_path, 2), nprocs=2)
    ldm_first_step(0, tmp_path, 1)
    two, one = torch.load(tmp_path / "ldm2.pt"), torch.load(tmp_path / "ldm1.pt")
    for key in ("train_recon", "train_kl"):
        assert two["values"][key] == pytest.approx(one["values"][key], rel=1e-5), key
    for key, grad in one["grads"].items():
        # Within 1% of the largest element, as the VAE-GAN's above (BatchNorm's backward).
        torch.testing.assert_close(two["grads"][key], grad, rtol=0, atol=1e-2 * float(grad.abs().max()), msg=key)


def test_alpha_one_over_batch_size_is_over_the_global_batch():
    cfg = load_config(None, ["train.batch_size=16", "train.alpha=1/batch_size"]).train
    assert cfg.kl_weight(world_size=2) == cfg.kl_weight(1) / 2 == 1 / 32
    assert load_config(None, ["train.alpha=0.5"]).train.kl_weight(world_size=8) == 0.5
    warm = load_config(None, ["train.batch_size=16", "train.alpha=1/batch_size", "train.kl_warmup_steps=4"]).train
    assert [warm.kl_weight(2, step) for step in (0, 2, 4, 9)] == [0.0, 1 / 64, 1 / 32, 1 / 32]


@pytest.mark.parametrize("start_step", [0, 2])
def test_ranks_share_each_global_batch_with_its_flips(start_step):
    """Rank 0's and rank 1's batches interleaved are the one-process batch of twice the size: same
    images, same flips, row p of it being row p // 2 of rank p % 2 (where the reparametrisation
    noise is taken from), and the same step count (global batches)."""
    images = np.random.default_rng(0).integers(0, 256, size=(70, 4, 4, 3), dtype=np.uint8)
    device = torch.device("cpu")
    normalize = Normalizer(load_config().data, device)
    one = list(training_batches(images, 8, 3, 2, device, normalize, start_step=start_step))
    ranks = [list(training_batches(images, 4, 3, 2, device, normalize, start_step=start_step, rank=r, world_size=2))
             for r in (0, 1)]
    # 70 images in global batches of 8: one process keeps the partial 9th batch (6 images), two
    # processes drop it so both have a full share.
    assert len(one) == 9 - start_step and len(ranks[0]) == len(ranks[1]) == 8 - start_step
    assert steps_per_epoch(70, 4, None, world_size=2) == 8
    for whole, first, second in zip(one, *ranks, strict=False):
        assert torch.equal(torch.stack([first, second], dim=1).flatten(0, 1), whole)


def test_validation_shares_cover_the_split_once_in_order():
    for n in (0, 1, 5, 50, 51):
        for world in (1, 2, 3, 8):
            shares = [shard_range(n, r, world) for r in range(world)]
            assert shares[0][0] == 0 and shares[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(shares, shares[1:], strict=False))
            assert max(b - a for a, b in shares) - min(b - a for a, b in shares) <= 1


def _train_one_epoch_with_a_bad_step_on_rank_1(rank: int, root: Path) -> None:
    """One of two gloo ranks (spawned), per-rank BatchNorm: rank 1 alone finds step 2 non-finite.
    (A NaN in one rank's batch would reach every rank through DDP's gradient average; a loss that
    overflows on one rank alone need not, which is what the agreement is for.)"""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=2)
    try:
        config = load_config(None, [*COMMON, "train.batch_size=16", f"train.output_dir={root}"])
        trainer = Trainer(config, load_image_data(config.data, progress=False),
                          dist=Distributed(rank, rank, 2))

        def overflow_in_step_2_on_rank_1(module, args, output):
            # loss + inf: the gradients stay finite (and are averaged as usual), the loss is not.
            if rank == 1 and trainer.step == 1:
                return output[0] + float("inf"), *output[1:]
            return None

        trainer.training_step.objective.register_forward_hook(overflow_in_step_2_on_rank_1)
        values = trainer.train_epoch(1)
        weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        torch.save({"skipped": values["skipped_steps"], "weights": weights}, root / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_step_found_non_finite_on_one_rank_is_skipped_on_every_rank(tmp_path):
    mp.spawn(_train_one_epoch_with_a_bad_step_on_rank_1, args=(tmp_path,), nprocs=2)
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert first["skipped"] == second["skipped"] == 1  # rank 0 found its own step finite
    assert torch.equal(first["weights"], second["weights"])  # the replicas did not drift apart


def _steps_with_a_stop_request_on_rank_1(rank: int, root: Path) -> None:
    """One of two gloo ranks (spawned): a SIGTERM reaches rank 1 alone, after step 2. Records how
    many collectives each rank made, the step it stopped after, and the KL weight each step handed
    the objective (alpha=1/batch_size with a warm-up; a hook on the step's module)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=2)
    collectives = []
    all_reduce_sum = Distributed.all_reduce_sum

    def counted(self, tensor):
        collectives.append(tensor.numel())
        return all_reduce_sum(self, tensor)

    Distributed.all_reduce_sum = counted
    try:
        config = load_config(None, [*COMMON, *KL, "train.kl_warmup_steps=4", "train.batch_size=16",
                                    "train.max_steps_per_epoch=6", f"train.output_dir={root}"])

        class SigtermOnRank1AfterStep2(Callback):
            def on_step_end(self, trainer, batch, sums) -> None:
                if rank == 1 and trainer.step == 2:
                    trainer.stop.signum = signal.SIGTERM  # what the installed handler records

        trainer = Trainer(config, load_image_data(config.data, progress=False),
                          dist=Distributed(rank, rank, 2),
                          callbacks=[*([Checkpointing(root / "run", config.train)] if rank == 0 else []),
                                     SigtermOnRank1AfterStep2()])
        kl_weights = []
        trainer.training_step.objective.register_forward_pre_hook(
            lambda module, args: kl_weights.append(float(args[1])))
        try:
            trainer.train_epoch(1)
            outcome = "finished"
        except TrainingInterrupted as stop:
            outcome = f"stopped with {stop.exit_status}"
        torch.save({"outcome": outcome, "step": trainer.step, "collectives": collectives, "kl_weights": kl_weights},
                   root / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_losses_flags_and_stop_requests_in_one_collective_per_step(tmp_path):
    """Under torchrun: one all-reduce per step (loss sums, the non-finite flag and the stop
    signals together), so one host wait per step; a SIGTERM that reached one rank stops both after
    the same step, the one after the signal, and rank 0 writes last.pt there. Every rank's step
    trains with one process's KL weight for the global batch of 32 (1/32, ramped over 4 steps)."""
    mp.spawn(_steps_with_a_stop_request_on_rank_1, args=(tmp_path,), nprocs=2)
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    one_process = load_config(None, [*KL, "train.kl_warmup_steps=4", "train.batch_size=32"]).train
    expected = [one_process.kl_weight(1, step) for step in range(3)]
    assert expected == pytest.approx([0.0, 1 / 128, 1 / 64])
    for record in (first, second):
        assert record["outcome"] == "stopped with 143" and record["step"] == 3
        assert record["collectives"] == [2 + 1 + 2] * 3  # sums, flag, SIGINT / SIGTERM counts; 3 steps
        assert record["kl_weights"] == pytest.approx(expected, rel=1e-7)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt").step == 3


def _free_bits_gradients(rank: int, root: Path, world: int, free_bits: float) -> None:
    """This rank's share of the batch through VAEObjective with free bits; then, for two processes,
    the gradient average DDP takes. Saved as root/grads<world>.pt (rank 0)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        # eval(): BatchNorm from running statistics, so halves of the batch see what the whole sees.
        model = build_model(load_config(None, COMMON).model, 16).eval()
        x = torch.load(root / "batch.pt")
        objective = VAEObjective(model, nullcontext, rank, world, free_bits=free_bits)
        torch.manual_seed(1)  # the reparametrisation noise: drawn for the global batch on every rank
        objective(x[rank::world], torch.tensor(1.0))[0].backward()  # the rank's share, as training_batches cuts it
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        if world > 1:
            dist.all_reduce(grads)
            grads /= world
        if rank == 0:
            torch.save(grads, root / f"grads{world}.pt")
    finally:
        if world > 1:
            dist.destroy_process_group()
        torch.set_num_threads(threads)


def test_free_bits_clamp_the_global_batch_means_under_torchrun(tmp_path):
    """Free bits clamp each latent unit's KL averaged over the batch: under torchrun, the global
    batch, so two processes of 16 images train as one process of 32."""
    x = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    torch.save(x, tmp_path / "batch.pt")
    torch.manual_seed(0)
    model = build_model(load_config(None, COMMON).model, 16).eval()
    with torch.no_grad():
        per_unit = model.encoder(x).kl_per_dim()
    whole, rank_0 = per_unit.mean(dim=0), per_unit[0::2].mean(dim=0)  # rank 0's share (see training_batches)
    # A floor between the global mean of one unit and rank 0's mean of it: clamping each rank's
    # own mean would treat that unit differently on rank 0.
    unit = int((whole - rank_0).abs().argmax())
    free_bits = float(whole[unit] + rank_0[unit]) / 2
    assert (whole[unit] > free_bits) != (rank_0[unit] > free_bits)

    _free_bits_gradients(0, tmp_path, 1, free_bits)
    mp.spawn(_free_bits_gradients, args=(tmp_path, 2, free_bits), nprocs=2)
    one, two = torch.load(tmp_path / "grads1.pt"), torch.load(tmp_path / "grads2.pt")
    assert torch.allclose(two, one, rtol=1e-4, atol=1e-5)
