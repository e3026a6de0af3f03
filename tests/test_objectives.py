"""Issue 3's invariants: Exemplar views, the NPID bank, S4L's blindness to hidden labels, the
labelled-subset samplers, and every objective's masks going through re-training and the report."""
import pytest
import torch

from sslprune import layout
from sslprune import train as train_mod
from sslprune.config import Task as TaskConfig
from sslprune.data import Dataset, Split
from sslprune.data.augment import Normalize, colour_jitter, random_affine
from sslprune.errors import UserError
from sslprune.labelled import labelled_subset, task_data
from sslprune.layout import LABELLED
from sslprune.lottery import build, prepare, run_replicate
from sslprune.models import build_model
from sslprune.report import collect
from sslprune.retrain import retrain
from sslprune.tasks.sampling import PAIRED, UNIFORM
from sslprune.tasks import UNLABELLED, Batch, build_task

from .conftest import killed_at_evaluation, tiny_dataset, tiny_experiment

IDENTITY = Normalize(torch.zeros(3), torch.ones(3))


# --- augmentation ---------------------------------------------------------------------------

def test_affine_identity_and_flip_are_exact():
    x = torch.rand(4, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    same = random_affine(x, g, scale=(1.0, 1.0), max_degrees=0.0, flip=False)
    assert torch.allclose(same, x, atol=1e-5)
    # flip=True with a full-size, unrotated crop: each image is itself or its mirror image
    out = random_affine(x, torch.Generator().manual_seed(1), scale=(1.0, 1.0), max_degrees=0.0)
    flipped = [torch.allclose(o, i.flip(2), atol=1e-5) for o, i in zip(out, x)]
    assert all(f or torch.allclose(o, i, atol=1e-5) for f, o, i in zip(flipped, out, x))
    assert 0 < sum(flipped) < len(x)


def test_colour_jitter_stays_in_range_and_can_be_off():
    x = torch.rand(8, 3, 6, 6)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(colour_jitter(x, g, p=0.0, grayscale=0.0), x)
    gray = colour_jitter(x, g, p=0.0, grayscale=1.0)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    y = colour_jitter(x, g, p=1.0, grayscale=0.0)
    assert y.min() >= 0 and y.max() <= 1 and not torch.allclose(y, x)
    # A hue rotation alone turns the chroma plane: luma stays, colours change.
    x = torch.rand(8, 3, 6, 6) * 0.2 + 0.4  # far from 0 and 1: no clamping
    hue = colour_jitter(x, g, brightness=0, contrast=0, saturation=0, hue=0.1, p=1.0, grayscale=0.0)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    assert torch.allclose((hue * luma).sum(1), (x * luma).sum(1), atol=1e-5) and not torch.allclose(hue, x, atol=1e-3)


# --- Exemplar --------------------------------------------------------------------------------

def _exemplar():
    torch.manual_seed(0)
    b = build_model("convnet")
    return b, build_task(TaskConfig(task="exemplar"), b.feature_dim, 3, 16)


def test_exemplar_views_differ_and_positives_are_views_of_the_same_image():
    _, t = _exemplar()
    x = (torch.rand(6, 3, 8, 8) * 255).to(torch.uint8)
    y = torch.zeros(6, dtype=torch.long)

    def views(images):
        return t.views(Batch(images, y, torch.arange(6), torch.Generator().manual_seed(3)))

    inputs, ids = views(x)
    assert inputs.shape == (12, 3, 8, 8) and ids.tolist() == [0, 1, 2, 3, 4, 5] * 2
    assert not torch.allclose(inputs[:6], inputs[6:])          # the two views of each image differ
    # A view is made from its own image only: changing image 2 changes exactly the views with id 2.
    changed = x.clone()
    changed[2] = 255 - changed[2]
    inputs2, _ = views(changed)
    differs = (inputs2 - inputs).abs().flatten(1).amax(1) > 1e-6
    assert differs.tolist() == (ids == 2).tolist()


def test_triplet_accuracy_and_loss_follow_the_distances():
    from sslprune.tasks.exemplar import triplet_loss
    ids = torch.tensor([0, 1, 0, 1])
    good = torch.nn.functional.normalize(torch.tensor([[1., 0], [0, 1], [1, .1], [.1, 1]]), dim=1)
    loss, hit = triplet_loss(good, ids, margin=0.5)
    assert hit.sum() == 4 and loss == 0                 # positives 0.1 apart, negatives ~1.3: beyond the margin
    bad = good[[0, 1, 3, 2]]                          # swap: each view's nearest is the other image
    loss, hit = triplet_loss(bad, ids, margin=0.5)
    assert hit.sum() == 0 and loss > 0.5


# --- NPID ------------------------------------------------------------------------------------

def _npid(num_train=40, k=8):
    torch.manual_seed(0)
    b = build_model("convnet")
    return b, build_task(TaskConfig(task="npid", nce_negatives=k), b.feature_dim, 3, num_train)


def test_npid_bank_rows_stay_unit_norm_and_only_the_batch_rows_change():
    b, t = _npid()
    assert torch.allclose(t.bank.norm(dim=1), torch.ones(40))
    before = t.bank.clone()
    idx = torch.tensor([3, 17, 25, 39])
    x = (torch.rand(4, 3, 8, 8) * 255).to(torch.uint8)
    loss, _, _ = t.step(b.train(), Batch(x, torch.zeros(4, dtype=torch.long), idx,
                                         torch.Generator().manual_seed(0)), IDENTITY)
    loss.backward()
    changed = (t.bank != before).any(1)
    assert changed.nonzero().flatten().tolist() == idx.tolist()
    assert torch.allclose(t.bank.norm(dim=1), torch.ones(40), atol=1e-6)
    # eval mode never writes the bank
    before = t.bank.clone()
    t.eval().step(b.eval(), Batch(x, torch.zeros(4, dtype=torch.long), idx, torch.Generator()), IDENTITY)
    assert torch.equal(t.bank, before)


def test_npid_loss_is_wu_et_al_nce_and_z_is_set_on_the_first_batch():
    b, t = _npid(num_train=40, k=8)
    t.z_momentum = 1.0  # Wu et al.: Z estimated once, then fixed
    x = (torch.rand(4, 3, 8, 8) * 255).to(torch.uint8)
    idx = torch.tensor([0, 1, 2, 3])
    bank = t.bank.clone()
    loss, _, _ = t.step(b.train(), Batch(x, torch.zeros(4, dtype=torch.long), idx,
                                         torch.Generator().manual_seed(0)), IDENTITY)
    # The same computation written out: v, K noise rows drawn from the same generator (shared by
    # the batch), and NCE with P_n = 1/N: -[log h(pos) + sum log(1 - h(noise))] / B, h = p / (p + K/N).
    noise = torch.randint(0, 40, (8,), generator=torch.Generator().manual_seed(0))
    v = t.embed(b, x, IDENTITY).detach()
    rows = torch.cat([idx[:, None], noise.expand(4, 8)], 1)                     # (B, K+1)
    p = torch.exp(torch.einsum("bkd,bd->bk", bank[rows], v) / 0.07)
    z = p[:, 1:].mean() * 40
    p = p / z
    h = p / (p + 8 / 40)
    expected = -(torch.log(h[:, 0]).sum() + torch.log(1 - h[:, 1:]).sum()) / 4
    assert torch.allclose(t.z, z, rtol=1e-4) and torch.allclose(loss, expected, rtol=1e-3)
    # z_momentum = 1: later batches leave Z alone.
    z_first = t.z.clone()
    t.step(b, Batch(x, torch.zeros(4, dtype=torch.long), idx + 4, torch.Generator().manual_seed(1)), IDENTITY)
    assert torch.equal(t.z, z_first)


def test_npid_bank_is_sized_from_the_data_and_a_wrong_size_fails_to_load(data):
    exp = tiny_experiment(task="npid", nce_negatives=16)
    _, t = build(exp, data, seed=0)
    assert t.bank.shape == (len(data.train), 128)
    smaller = Dataset("tiny", Split(data.train.images[:50], data.train.labels[:50]), data.test, data.classes)
    b2, t2 = build(exp, smaller, seed=0)
    with pytest.raises(UserError, match="do not match"):
        train_mod.load_weights(b2, t2, train_mod.weights(*build(exp, data, seed=0)))


def test_npid_knn_monitor_votes_with_the_nearest_bank_rows():
    b, t = _npid(num_train=6, k=2)
    t.knn = 3
    # Bank: classes 0 and 1 point along two axes; test embeddings are those axes.
    t.bank[:] = torch.nn.functional.normalize(torch.tensor(
        [[1., .1, 0, 0], [1, .2, 0, 0], [1, 0, .1, 0], [0, 1, .1, 0], [.1, 1, 0, 0], [0, 1, 0, .1]]), dim=1
    ).repeat(1, 32)
    train_labels = torch.tensor([0, 0, 0, 1, 1, 1])
    t.embed = lambda backbone, images, normalize: torch.nn.functional.normalize(images.flatten(1), dim=1)
    test = torch.tensor([[1., 0, 0, 0], [0, 1, 0, 0]]).repeat(1, 32)
    out = t.evaluate(b, test, torch.tensor([0, 1]), IDENTITY, 8, train_labels=train_labels)
    assert out["acc"] == 1.0
    assert t.evaluate(b, test, torch.tensor([1, 0]), IDENTITY, 8, train_labels=train_labels)["acc"] == 0.0
    # Votes are weighted by exp(sim / T): one close neighbour of class 0 outvotes two farther ones
    # of class 1 (a majority vote would say 1). Rows 3-5 are orthogonal to the probe.
    t.bank[:] = torch.nn.functional.normalize(torch.tensor(
        [[1., 0, 0, 0], [0, 1, 0, 0], [0, 1, 0.1, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, -1, 0]]), dim=1).repeat(1, 32)
    probe = torch.nn.functional.normalize(torch.tensor([[1., 0.6, 0, 0]]), dim=1).repeat(1, 32)
    labels = torch.tensor([0, 1, 1, 0, 0, 0])
    assert t.evaluate(b, probe, torch.tensor([0]), IDENTITY, 8, train_labels=labels)["acc"] == 1.0



def test_npid_resume_equals_uninterrupted_bank_included(tmp_path, data, monkeypatch):
    exp = tiny_experiment(task="npid", nce_negatives=16, epochs=3)
    straight = prepare(exp, tmp_path / "a", data, None, ["t"])
    run_replicate(exp, straight, data, 1, 1, progress=False)
    killed = prepare(exp, tmp_path / "b", data, None, ["t"])
    # killed in level 0's second evaluation, after epoch 1's checkpoint
    killed_at_evaluation(monkeypatch, 2, lambda: run_replicate(exp, killed, data, 1, 1, progress=False))
    run_replicate(exp, killed, data, 1, 1, progress=False)
    for level in (0, 1):
        rel = layout.level_dir(straight, 1, level).relative_to(straight) / "train" / layout.MODEL
        a, b = layout.load_tensors(straight / rel), layout.load_tensors(killed / rel)
        assert "task.bank" in a and all(torch.equal(a[k], b[k]) for k in a), rel
        assert layout.load_json(straight / rel.parent / layout.DONE)["test_acc"] == \
            layout.load_json(killed / rel.parent / layout.DONE)["test_acc"]


# --- few labels ------------------------------------------------------------------------------

def test_per_class_subset_has_exact_counts_and_is_reproducible():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    sub = labelled_subset(labels, 0.1, "images", seed=4)
    assert torch.bincount(labels[sub]).tolist() == [5, 3, 2]
    assert torch.equal(sub, labelled_subset(labels, 0.1, "images", seed=4))
    assert not torch.equal(sub, labelled_subset(labels, 0.1, "images", seed=5))
    assert len(sub.unique()) == len(sub)


def test_class_subset_keeps_whole_classes():
    labels = torch.arange(200) % 20
    sub = labelled_subset(labels, 0.1, "classes", seed=0)
    kept = labels[sub].unique()
    assert len(kept) == 2 and len(sub) == 20                     # 2 of 20 classes, all 10 images each
    assert torch.equal(sub, torch.isin(labels, kept).nonzero().flatten())
    assert torch.equal(sub, labelled_subset(labels, 0.1, "classes", seed=0))


def _full_data():
    return tiny_dataset(n_train=120, classes=3)


def test_labels_task_trains_on_the_subset_alone_and_the_subset_is_saved(tmp_path):
    data = _full_data()
    exp = tiny_experiment(task="labels", label_fraction=0.25)
    exp_dir = prepare(exp, tmp_path, data, None, ["t"])
    d = task_data(exp, exp_dir, data)
    assert len(d.train) == 30 and torch.bincount(d.train.labels).tolist() == [10, 10, 10]
    saved = layout.load_tensors(exp_dir / LABELLED)["index"]
    assert torch.equal(data.train.labels[saved], d.train.labels)
    # A saved subset that differs from the one drawn now is refused, not silently replaced.
    layout.save_tensors(exp_dir / LABELLED, {"index": saved + 1})
    with pytest.raises(UserError, match="another labelled subset"):
        task_data(exp, exp_dir, data)


def test_a_fraction_rounding_makes_far_from_its_value_is_said(tmp_path, capsys):
    """3 classes of 40 at 1%: round(0.4) = 0, at least one each: 3 labels (2.5%), not 1%."""
    data = _full_data()
    exp = tiny_experiment(task="labels", label_fraction=0.01)
    task_data(exp, prepare(exp, tmp_path, data, None, ["t"]), data)
    assert "keeps 3 of 120 training labels (2.5%)" in capsys.readouterr().err
    exp = tiny_experiment(task="labels", label_fraction=0.5, label_split="classes")   # round(1.5) = 2 of 3
    task_data(exp, prepare(exp, tmp_path, data, None, ["t"]), data)
    assert "keeps 2 of 3 classes (66.7%)" in capsys.readouterr().err
    exp = tiny_experiment(task="labels", label_fraction=0.25)   # exact: silent
    task_data(exp, prepare(exp, tmp_path, data, None, ["t"]), data)
    assert "warning" not in capsys.readouterr().err


def test_s4l_hides_the_labels_of_unlabelled_images(tmp_path):
    exp = tiny_experiment(task="s4l", label_fraction=0.25, epochs=1)
    data = _full_data()
    exp_dir = prepare(exp, tmp_path, data, None, ["t"])
    d = task_data(exp, exp_dir, data)
    subset = layout.load_tensors(exp_dir / LABELLED)["index"]
    hidden = torch.ones(len(data.train), dtype=torch.bool)
    hidden[subset] = False
    assert (d.train.labels[hidden] == UNLABELLED).all()
    assert torch.equal(d.train.labels[~hidden], data.train.labels[~hidden])
    assert torch.equal(d.train.images, data.train.images)      # S4L keeps every image


def test_s4l_training_never_reads_the_labels_of_unlabelled_images(tmp_path, monkeypatch):
    """The whole lottery (levels 0-1) on the real labels and on labels scrambled outside the
    labelled subset gives bit-identical weights. Which images are labelled is the one choice
    that reads all labels (10% *of each class*); it is held fixed here."""
    import sslprune.labelled as labelled_mod
    exp = tiny_experiment(task="s4l", label_fraction=0.25, epochs=1)
    data = _full_data()
    subset = labelled_subset(data.train.labels, 0.25, "images", 0)
    monkeypatch.setattr(labelled_mod, "labelled_subset", lambda *a: subset)
    hidden = torch.ones(len(data.train), dtype=torch.bool)
    hidden[subset] = False
    scrambled_labels = data.train.labels.clone()
    scrambled_labels[hidden] = (scrambled_labels[hidden] + 1) % 3
    scrambled = Dataset("tiny", Split(data.train.images, scrambled_labels), data.test, data.classes)
    models = []
    for name, dd in (("real", data), ("scrambled", scrambled)):
        exp_dir = prepare(exp, tmp_path / name, dd, None, ["t"])
        run_replicate(exp, exp_dir, dd, 1, 1, progress=False)
        models.append(layout.load_tensors(layout.level_dir(exp_dir, 1, 1) / "train" / layout.MODEL))
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_s4l_label_head_reads_the_unrotated_labelled_images():
    t = build_task(TaskConfig(task="s4l", label_fraction=0.5), 3 * 4 * 4, 3, 8)
    x = (torch.rand(4, 3, 4, 4) * 255).to(torch.uint8)
    y = torch.tensor([2, UNLABELLED, 0, UNLABELLED])
    label_logits, labels, rot_logits, rot_targets = t.forward_both(
        torch.nn.Flatten(), Batch(x, y, torch.arange(4), torch.Generator()), IDENTITY)
    assert labels.tolist() == [2, 0] and rot_logits.shape == (16, 4) and rot_targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert torch.allclose(label_logits, t.head(IDENTITY(x[[0, 2]]).flatten(1)))


def test_s4l_needs_unlabelled_images():
    data = _full_data()  # 40 images per class: a fraction of 0.99 keeps round(39.6) = 40 of each
    with pytest.raises(UserError, match="labels every training image"):
        prepare(tiny_experiment(task="s4l", label_fraction=0.99), "/nonexistent-root", data, None, ["t"])


def test_paired_sampler_splits_every_batch_into_labelled_and_unlabelled_halves():
    labels = torch.full((100,), UNLABELLED)
    labels[torch.arange(0, 100, 10)] = torch.arange(10) % 3      # 10 labelled, 90 unlabelled
    g = torch.Generator().manual_seed(0)
    batches = PAIRED.epoch_batches(labels, 16, g)
    assert batches.shape == (PAIRED.steps_per_epoch(labels, 16), 16) == (11, 16)
    assert (labels[batches[:, :8]] != UNLABELLED).all() and (labels[batches[:, 8:]] == UNLABELLED).all()
    assert len(batches[:, 8:].flatten().unique()) == 88           # an epoch: each unlabelled image at most once
    uniform = UNIFORM.epoch_batches(labels, 16, torch.Generator().manual_seed(0))
    assert uniform.shape == (6, 16) and len(uniform.flatten().unique()) == 96


def test_task_options_for_the_wrong_task_are_refused():
    with pytest.raises(UserError, match="applies to --task npid only"):
        tiny_experiment(task="labels", nce_negatives=10).validate()
    with pytest.raises(UserError, match="needs a labelled and an unlabelled part"):
        tiny_experiment(task="s4l").validate()
    with pytest.raises(UserError, match="keeps 1 class"):
        prepare(tiny_experiment(task="labels", label_fraction=0.2, label_split="classes"), "/nonexistent-root",
                _full_data(), None, ["t"])


# --- every objective through the lottery, re-training and the report ---------------------------

@pytest.mark.parametrize("task,options", [("exemplar", {}), ("npid", {"nce_negatives": 16}),
                                          ("s4l", {"label_fraction": 0.25}),
                                          ("labels", {"label_fraction": 0.25, "label_split": "images"})])
def test_every_objective_prunes_and_its_masks_retrain_on_labels(tmp_path, task, options):
    data = _full_data()
    exp = tiny_experiment(task=task, epochs=1, **options)
    exp_dir = prepare(exp, tmp_path, data, None, ["t"])
    run_replicate(exp, exp_dir, data, 1, 1, progress=False)
    for reset in ("rewind", "reinit"):
        res = retrain(exp, exp_dir, data, 1, 1, reset, progress=False)
        assert 0 <= res["test_acc"] <= 1
    rows = collect([exp_dir])
    label = task if not options.get("label_fraction") else f"{task} 25% of images"
    assert {r["objective"] for r in rows} == {label}
    assert {(r["eval"], r["reset"]) for r in rows} == {("task", "rewind"), ("retrain", "rewind"), ("retrain", "reinit")}
    if task == "s4l":
        assert any(r["metric"] == "test_rotation_acc" for r in rows)


def test_every_preset_is_a_valid_experiment():
    from sslprune.config import PRESETS, Experiment
    for name, values in PRESETS.items():
        exp = Experiment.from_flat({"task": "labels", **values})
        exp.validate()
        assert exp.task.task == values.get("task", "labels"), name


def test_linear_probe_leaves_the_backbone_untouched_and_reads_its_features(data):
    from sslprune.probe import features, fit_probe
    torch.manual_seed(0)
    backbone = build_model("convnet").train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    norm = Normalize(*data.channel_stats())
    f_train = features(backbone, data.train.images, norm)
    f_test = features(backbone, data.test.images, norm)
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # BN running stats included
    assert backbone.training                                        # mode restored
    res = fit_probe(f_train, data.train.labels.numpy(), f_test, data.test.labels.numpy())
    assert res["acc"] > 0.6 and 0 <= res["mean_class_acc"] <= 1    # quadrant classes: random features suffice
    # Shuffled training labels carry no signal: the probe falls towards chance (1/3).
    shuffled = data.train.labels[torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))]
    assert fit_probe(f_train, shuffled.numpy(), f_test, data.test.labels.numpy())["acc"] < res["acc"]
