import pytest
import torch

from sslprune.config import Task as TaskConfig
from sslprune.data.augment import Normalize
from sslprune.models import build_model
from sslprune.tasks import UNLABELLED, Batch, build_task
from sslprune.tasks.rotation import rotate4


IDENTITY = Normalize(torch.zeros(3), torch.ones(3))


def task(name, feature_dim, num_classes, num_train=64, **options):
    return build_task(TaskConfig(task=name, **options), feature_dim, num_classes, num_train)


def batch(x, y, seed=0):
    return Batch(x, y, torch.arange(len(x)), torch.Generator().manual_seed(seed))


def test_rot90_views_are_exact_rotations():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    inputs, targets = rotate4(x)
    assert inputs.shape == (8, 3, 4, 4)
    assert targets.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(inputs[:2], x)
    # k=1 is 90 degrees counter-clockwise: the top-right pixel moves to the top-left.
    assert torch.equal(inputs[2:4][..., 0, 0], x[..., 0, -1])
    assert torch.equal(inputs[2:4][..., -1, 0], x[..., 0, 0])
    # 180 degrees is a flip of both axes; 270 is three 90s.
    assert torch.equal(inputs[4:6], x.flip(2).flip(3))
    assert torch.equal(inputs[6:8], torch.rot90(torch.rot90(torch.rot90(x, 1, (2, 3)), 1, (2, 3)), 1, (2, 3)))
    # Four quarter turns give the original back; no interpolation anywhere.
    r = x
    for _ in range(4):
        r = torch.rot90(r, 1, (2, 3))
    assert torch.equal(r, x)
    # every rotation keeps exactly the same multiset of values
    for k in range(4):
        assert torch.equal(inputs[2 * k:2 * k + 2].flatten().sort().values, x.flatten().sort().values)


def test_rotation_never_reads_labels():
    torch.manual_seed(0)
    b = build_model("convnet")
    t = task("rotation", b.feature_dim, 10)
    assert t.head.out_features == 4
    x = torch.rand(4, 3, 8, 8)
    l1 = t.step(b.eval(), batch(x, torch.tensor([0, 1, 2, 3])), IDENTITY)
    l2 = t.step(b.eval(), batch(x, torch.tensor([9, 9, 9, 9])), IDENTITY)
    assert torch.equal(l1[0], l2[0]) and l1[1:] == l2[1:]


@pytest.mark.parametrize("name", ["rotation", "exemplar", "npid", "vicreg"])
def test_self_supervised_training_never_reads_labels(name):
    """A training step with the true labels and with garbage gives the same loss, the same
    gradients and the same task state after it (NPID's memory bank included): no label leaks."""
    import copy
    options = {"nce_negatives": 16} if name == "npid" else {"projector_dim": 32} if name == "vicreg" else {}
    torch.manual_seed(0)
    b0, t0 = build_model("convnet"), task(name, 128, 3, num_train=64, **options)
    x = (torch.rand(8, 3, 8, 8) * 255).to(torch.uint8)
    results = []
    for y in (torch.arange(8) % 3, torch.full((8,), 7)):
        b, t = copy.deepcopy(b0), copy.deepcopy(t0)
        loss, correct, n = t.step(b.train(), batch(x, y, seed=3), IDENTITY)
        loss.backward()
        results.append((loss.detach(), int(correct), n, [p.grad.clone() for p in b.parameters()],
                        {k: v.clone() for k, v in t.state_dict().items()}))
    (l1, c1, n1, g1, s1), (l2, c2, n2, g2, s2) = results
    assert torch.equal(l1, l2) and (c1, n1) == (c2, n2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_labels_task_head_matches_classes():
    b = build_model("convnet")
    t = task("labels", b.feature_dim, 7)
    assert t.head.out_features == 7 and t.head.in_features == b.feature_dim


@pytest.mark.parametrize("name", ["labels", "rotation", "exemplar", "npid", "s4l", "vicreg"])
def test_losses_decrease_on_a_fixed_batch(name):
    """Same images, same random views (the generator is re-seeded every step), 40 Adam steps.
    NPID starts from a bank filled with the batch: from a random bank its loss first rises while
    the bank fills with the (initially similar) embeddings of a random network."""
    torch.manual_seed(0)
    b = build_model("convnet")
    options = {"nce_negatives": 16} if name == "npid" else {"label_fraction": 0.5} if name == "s4l" else \
        {"projector_dim": 32} if name == "vicreg" else {}
    t = task(name, b.feature_dim, 3, num_train=64, **options)
    x, y = (torch.rand(16, 3, 8, 8) * 255).to(torch.uint8), torch.arange(16) % 3
    if name == "s4l":
        y[8:] = UNLABELLED
    if name == "npid":  # a bank that already holds this batch, and Z as a random bank gives it (N)
        with torch.no_grad():
            t.bank[:16] = t.embed(b, x, IDENTITY)
            t.z.fill_(64.0)
    opt = torch.optim.Adam([*b.parameters(), *t.parameters()], lr=1e-2)
    losses = []
    for _ in range(40):
        loss = t.step(b, batch(x, y, seed=1), IDENTITY)[0]
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], (name, losses[0], losses[-5:])
