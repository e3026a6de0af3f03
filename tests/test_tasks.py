import torch

from sslprune.models import build_model
from sslprune.tasks import build_task
from sslprune.tasks.rotation import rotate4


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
    t = build_task("rotation", b.feature_dim, 10)
    assert t.head.out_features == 4
    x = torch.randn(4, 3, 8, 8)
    l1 = t.step(b.eval(), x, torch.tensor([0, 1, 2, 3]))
    l2 = t.step(b.eval(), x, torch.tensor([9, 9, 9, 9]))
    assert torch.equal(l1[0], l2[0]) and l1[1:] == l2[1:]


def test_labels_task_head_matches_classes():
    b = build_model("convnet")
    t = build_task("labels", b.feature_dim, 7)
    assert t.head.out_features == 7 and t.head.in_features == b.feature_dim


def test_losses_decrease_on_a_fixed_batch():
    for name in ("labels", "rotation"):
        torch.manual_seed(0)
        b = build_model("convnet")
        t = build_task(name, b.feature_dim, 3)
        x, y = torch.randn(16, 3, 8, 8), torch.arange(16) % 3
        opt = torch.optim.Adam([*b.parameters(), *t.parameters()], lr=1e-2)
        first = None
        for _ in range(30):
            loss = t.step(b, x, y)[0]
            first = first if first is not None else loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 0.5 * first, name
