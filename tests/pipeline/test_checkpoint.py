"""Training checkpoints: atomic save, latest, load (weights, optimizer, scheduler, RNG, state)."""

import random

import numpy as np
import pytest
import torch

from pipeline import checkpoint, io
from pipeline.errors import KDError


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """These tests draw from and reset the global generators; leave them as they were found."""
    saved = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    yield
    torch.set_rng_state(saved[0])
    np.random.set_state(saved[1])
    random.setstate(saved[2])


def trainer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def step(model, opt, sched, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def save(out, n, model=None, opt=None, sched=None, keep=2, **state):
    if model is None:
        model, opt, sched = trainer()
    return checkpoint.save(out, n, {"cursor": n * 10, **state}, model=model.state_dict(),
                           optimizer=opt.state_dict(), scheduler=sched.state_dict(), keep=keep)


def test_round_trip_restores_training_exactly(tmp_path):
    model, opt, sched = trainer()
    for s in range(3):
        step(model, opt, sched, s)
    path = checkpoint.save(tmp_path, 3, {"cursor": {"shard": 1, "row": 17}, "epoch": 0},
                           model=model.state_dict(), optimizer=opt.state_dict(),
                           scheduler=sched.state_dict(), extra={"scaler": {"scale": 8.0}})
    assert path == tmp_path / "checkpoints" / "step-000000003"
    assert checkpoint.latest(tmp_path) == path

    ck = checkpoint.load(path, rank=0, world_size=1)
    assert ck["state"] == {"cursor": {"shard": 1, "row": 17}, "epoch": 0, "step": 3, "world_size": 1}
    assert ck["extra"] == {"scaler": {"scale": 8.0}}

    model2, opt2, sched2 = trainer(seed=123)  # different initial weights
    assert not torch.equal(model2[0].weight, model[0].weight)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["optimizer"])
    sched2.load_state_dict(ck["scheduler"])
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        s1, s2 = opt.state[p1], opt2.state[p2]
        assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"])
        assert float(s1["step"]) == float(s2["step"]) == 3.0
    assert sched2.last_epoch == 3
    assert sched2.get_last_lr() == pytest.approx([1e-2 / 4])
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)

    # and training continues identically from the restored copy
    step(model, opt, sched, 99)
    step(model2, opt2, sched2, 99)
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p1, p2)


def test_load_refuses_another_world_size(tmp_path):
    path = save(tmp_path, 1)
    with pytest.raises(KDError, match=r"written by 1 process\(es\), this run has 2"):
        checkpoint.load(path, rank=0, world_size=2)


def test_rewriting_a_step_replaces_it(tmp_path):
    save(tmp_path, 5, lr_seen=1)
    model, opt, sched = trainer(seed=7)
    path = save(tmp_path, 5, model, opt, sched, lr_seen=2)
    ck = checkpoint.load(path, 0, 1)
    assert ck["state"]["lr_seen"] == 2
    assert torch.equal(ck["model"]["0.weight"], model[0].weight)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000000005"]


def test_rng_round_trip(tmp_path):
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    torch.rand(3), np.random.rand(3), random.random()  # advance away from the seeded state
    path = save(tmp_path, 1)  # captures the global RNG states now

    def draw():
        return torch.rand(4).tolist(), np.random.rand(4).tolist(), [random.random() for _ in range(4)]

    first = draw()
    second = draw()
    assert first != second
    checkpoint.set_rng_state(checkpoint.load(path, 0, 1)["rng"])
    assert draw() == first
    assert draw() == second


def test_rng_state_in_memory_round_trip():
    state = checkpoint.rng_state()
    assert {"torch", "numpy", "python"} <= set(state)
    a = (torch.randn(2).tolist(), np.random.randint(0, 1 << 30), random.randrange(1 << 30))
    checkpoint.set_rng_state(state)
    assert (torch.randn(2).tolist(), np.random.randint(0, 1 << 30), random.randrange(1 << 30)) == a


def test_latest_none_when_nothing_saved(tmp_path):
    assert checkpoint.latest(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    assert checkpoint.latest(tmp_path) is None


def test_latest_picks_highest_complete_step(tmp_path):
    save(tmp_path, 9, keep=10)
    save(tmp_path, 10, keep=10)
    best = save(tmp_path, 100, keep=10)
    root = tmp_path / "checkpoints"
    (root / "step-000000200").mkdir()  # incomplete: no state.json
    temp = io.tmp_name(root / "step-000000300")  # a killed writer's temporary, fully written
    temp.mkdir()
    (temp / "state.json").write_text('{"step": 300}')
    assert checkpoint.latest(tmp_path) == best
    assert checkpoint.load(best, 0, 1)["state"]["step"] == 100


def test_keep_prunes_old_checkpoints(tmp_path):
    for n in (1, 2, 3, 4):
        save(tmp_path, n, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000000003", "step-000000004"]
    save(tmp_path, 5, keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000000005"]


def test_clean_removes_only_temporaries(tmp_path):
    kept = save(tmp_path, 2)
    root = tmp_path / "checkpoints"
    tmp_dir = io.tmp_name(root / "step-000000003")
    tmp_dir.mkdir()
    (tmp_dir / "model.safetensors").write_bytes(b"half")
    tmp_file = io.tmp_name(kept / "model.safetensors")
    tmp_file.write_bytes(b"half")
    checkpoint.clean(tmp_path)
    assert not tmp_dir.exists() and not tmp_file.exists()
    assert sorted(p.name for p in root.iterdir()) == ["step-000000002"]
    assert sorted(p.name for p in kept.iterdir()) == ["model.json", "model.safetensors", "optimizer.json", "optimizer.safetensors",
                                                      "rng-0.json", "rng-0.safetensors", "state.json"]
    checkpoint.clean(tmp_path / "elsewhere")  # nothing there: no error


def test_remove_all(tmp_path):
    save(tmp_path, 1)
    (tmp_path / "config.json").write_text("{}")  # the output directory's other files stay
    checkpoint.remove_all(tmp_path)
    assert not (tmp_path / "checkpoints").exists()
    assert (tmp_path / "config.json").exists()
    assert checkpoint.latest(tmp_path) is None
    checkpoint.remove_all(tmp_path)  # already gone: no error
