"""--pretrained FILE: public self-supervised checkpoints load strictly into our torchvision-layout ResNets.

Each file is our own ResNet-50's weights written the way that project writes them (prefixes, wrapper
dicts, heads, projectors, momentum encoders, non-tensor entries)."""
import argparse

import pytest
import torch
from safetensors.torch import load_file, save_file

from sslprune.errors import UserError
from sslprune.models import build_model, load_pretrained
from sslprune.models.checkpoints import describe


@pytest.fixture(scope="module")
def reference():
    """ResNet-50 weights with non-default buffers, so a skipped BN statistic would show."""
    torch.manual_seed(0)
    sd = build_model("resnet50").state_dict()
    for k, v in sd.items():
        if k.endswith("running_mean"):
            v.normal_()
        elif k.endswith("running_var"):
            v.uniform_(0.5, 2)
        elif k.endswith("num_batches_tracked"):
            v.fill_(7)
    return sd


def under(prefix, sd, skip_nbt=False):
    return {prefix + k: v for k, v in sd.items() if not (skip_nbt and k.endswith("num_batches_tracked"))}


def other(prefix, sd):
    """A momentum encoder / student: the same tensors (stored once) but a different stem."""
    out = under(prefix, sd)
    out[prefix + "conv1.weight"] = torch.zeros_like(sd["conv1.weight"])
    return out


def mlp(prefix, *dims):
    """A projector or head: Linear layers `prefix{0,2,..}.weight/bias` of the given widths (narrowed)."""
    out = {}
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        out[f"{prefix}{2 * i}.weight"] = torch.randn(b, a)
        out[f"{prefix}{2 * i}.bias"] = torch.zeros(b)
    return out


OPTIMIZER = {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0, 1, 2]}]}


def moco_v2(sd):
    return {"epoch": 200, "arch": "resnet50", "optimizer": OPTIMIZER, "state_dict": {
        **under("module.encoder_q.", sd), **mlp("module.encoder_q.fc.", 2048, 256, 128),
        **other("module.encoder_k.", sd), **mlp("module.encoder_k.fc.", 2048, 256, 128),
        "module.queue": torch.randn(128, 1024), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}}


def moco_v3(sd):
    return {"epoch": 100, "arch": "resnet50", "optimizer": OPTIMIZER, "scaler": {"scale": 65536.0},
            "state_dict": {**under("module.base_encoder.", sd), **mlp("module.base_encoder.fc.", 2048, 256, 128),
                           **other("module.momentum_encoder.", sd), **mlp("module.momentum_encoder.fc.", 2048, 128),
                           **mlp("module.predictor.", 128, 256, 128)}}


def dino_teacher(sd):
    return {"student": {**other("module.backbone.", sd), **mlp("module.head.mlp.", 2048, 256)},
            "teacher": {**under("backbone.", sd), **mlp("head.mlp.", 2048, 256),
                        "head.last_layer.weight_g": torch.ones(60000, 1)},
            "optimizer": OPTIMIZER, "epoch": 3, "fp16_scaler": None,
            "args": argparse.Namespace(arch="resnet50", lr=0.03, out_dim=60000, data_path="/imagenet")}


def dino_ddp(sd):
    return {"teacher": {**under("module.backbone.", sd), **mlp("module.head.mlp.", 2048, 256)}, "epoch": 3}


def swav(sd):  # the released swav_800ep_pretrain.pth.tar: a bare state dict; here without num_batches_tracked
    return {**under("module.", sd, skip_nbt=True), **mlp("module.projection_head.", 2048, 256, 128),
            "module.prototypes.weight": torch.randn(3000, 128)}


def simclr(sd):
    return {**under("module.", sd), **mlp("module.projection_head.", 2048, 256, 128)}


def solo_learn(sd):
    return {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.9.0", "callbacks": {},
            "optimizer_states": [OPTIMIZER], "lr_schedulers": [{"last_epoch": 3}],
            "state_dict": {**under("backbone.", sd), **mlp("projector.", 2048, 256, 128),
                           **mlp("predictor.", 128, 256, 128), **other("momentum_backbone.", sd),
                           **mlp("momentum_projector.", 2048, 256, 128), **mlp("classifier.", 2048, 100)}}


def lightly(sd):
    return {"epoch": 3, "state_dict": {**under("backbone.", sd), **mlp("projection_head.layers.", 2048, 128),
                                       **other("backbone_momentum.", sd),
                                       **mlp("projection_head_momentum.layers.", 2048, 128)}}


def lightly_sequential(sd):  # backbone = nn.Sequential(*list(resnet.children())[:-1])
    index = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    body = {"backbone." + index[k.split(".")[0]] + k[len(k.split(".")[0]):]: v for k, v in sd.items()}
    return {**body, **mlp("prediction_head.layers.", 2048, 128)}


def lightly_dino(sd):  # lightly's examples/pytorch/dino.py: backbone = nn.Sequential(*resnet.children()[:-1])
    teacher = {k.replace("backbone.", "teacher_backbone.", 1): v for k, v in lightly_sequential(sd).items()
               if k.startswith("backbone.")}
    student = {k.replace("teacher_", "student_", 1): (torch.zeros_like(v) if k.endswith(".0.weight") and v.dim() == 4
                                                      and k.count(".") == 2 else v) for k, v in teacher.items()}
    return {"state_dict": {**student, **teacher, **mlp("student_head.layer.", 2048, 256),
                           **mlp("teacher_head.layer.", 2048, 256)}, "epoch": 3}


def vissl(sd):
    trunk = under("_feature_blocks.", sd)
    heads = mlp("0.clf.0.", 2048, 128)
    return {"phase_idx": 3, "iteration": 1000, "type": "checkpoint", "loss": {},
            "classy_state_dict": {"train": True, "optimizer": OPTIMIZER, "base_model": {
                "model": {"trunk": trunk, "heads": heads}, "meta": {"model_version": 1}}}}


CASES = {  # name: (writer, file name, layout, prefix, wrapper, dropped key groups)
    "moco-v2": (moco_v2, "moco_v2_800ep_pretrain.pth.tar", "moco-v2", "module.encoder_q.", "state_dict",
                ["module.encoder_k.*", "module.encoder_q.fc.*", "module.queue", "module.queue_ptr"]),
    "moco-v3": (moco_v3, "r-50-100ep.pth.tar", "moco-v3", "module.base_encoder.", "state_dict",
                ["module.base_encoder.fc.*", "module.momentum_encoder.*", "module.predictor.*"]),
    "dino-teacher": (dino_teacher, "dino_resnet50_pretrain_full_checkpoint.pth", "dino", "backbone.", "teacher",
                     ["head.*"]),
    "dino-ddp": (dino_ddp, "checkpoint.pth", "dino", "module.backbone.", "teacher", ["module.head.*"]),
    "swav": (swav, "swav_800ep_pretrain.pth.tar", "swav", "module.", "",
             ["module.projection_head.*", "module.prototypes.*"]),
    "simclr": (simclr, "simclr.pth", "simclr", "module.", "", ["module.projection_head.*"]),
    "solo-learn": (solo_learn, "byol-imagenet.ckpt", "solo-learn", "backbone.", "state_dict",
                   ["classifier.*", "momentum_backbone.*", "momentum_projector.*", "predictor.*", "projector.*"]),
    "lightly": (lightly, "lightly.ckpt", "lightly", "backbone.", "state_dict",
                ["backbone_momentum.*", "projection_head.*", "projection_head_momentum.*"]),
    "lightly-sequential": (lightly_sequential, "lightly.pth", "lightly-sequential", "backbone.", "",
                           ["prediction_head.*"]),
    "lightly-dino": (lightly_dino, "dino.ckpt", "lightly-dino-sequential", "teacher_backbone.", "state_dict",
                     ["student_backbone.*", "student_head.*", "teacher_head.*"]),
    "vissl": (vissl, "model_final_checkpoint_phase199.torch", "vissl", "_feature_blocks.",
              "classy_state_dict.base_model.model.trunk", []),
}


@pytest.mark.parametrize("case", CASES)
def test_public_checkpoint_loads_strictly(case, reference, tmp_path):
    writer, name, layout, prefix, wrapper, dropped = CASES[case]
    torch.save(writer(reference), tmp_path / name)
    fresh = build_model("resnet50")
    report = load_pretrained(fresh, tmp_path / name)
    assert (report["layout"], report["prefix"], report["wrapper"], report["dropped"]) == \
        (layout, prefix, wrapper, dropped)
    for k, v in fresh.state_dict().items():
        if not (case == "swav" and k.endswith("num_batches_tracked")):  # absent from that file
            assert torch.equal(v, reference[k]), k
    absent = sum(k.endswith("num_batches_tracked") for k in reference) if case == "swav" else 0
    assert report["loaded"] == len(reference) - absent
    assert describe(report).startswith(f"pretrained: {layout} layout (prefix '{prefix}'")


def small():
    """A small ResNet (0.27M) for what is not about a project's layout."""
    torch.manual_seed(1)
    return build_model("resnet20").state_dict()


def test_safetensors_in_torchvision_layout_and_ours(reference, tmp_path):
    save_file({**reference, "fc.weight": torch.randn(1000, 2048), "fc.bias": torch.zeros(1000)},
              str(tmp_path / "resnet50.safetensors"))
    fresh = build_model("resnet50")
    report = load_pretrained(fresh, tmp_path / "resnet50.safetensors")
    assert report == {"layout": "torchvision", "prefix": "", "wrapper": "", "loaded": len(reference),
                      "dropped": ["fc.*"], "dropped_keys": 2}
    assert all(torch.equal(v, reference[k]) for k, v in fresh.state_dict().items())
    ours = small()  # a level's model.safetensors, loaded as before
    save_file({**under("backbone.", ours), "task.head.weight": torch.randn(10, 64)}, str(tmp_path / "model.safetensors"))
    fresh = build_model("resnet20")
    report = load_pretrained(fresh, tmp_path / "model.safetensors")
    assert all(torch.equal(v, ours[k]) for k, v in fresh.state_dict().items())
    assert describe(report) == (f"pretrained: sslprune layout (prefix 'backbone.'): {len(ours)} tensors loaded, "
                                f"1 head/projector key group dropped (task.*)")


def test_prefix_override_and_ambiguity(tmp_path):
    ref = small()
    # BYOL-style online/target networks: the backbone's keys under two prefixes, neither registered.
    torch.save({**under("online_network.encoder.", ref), **other("target_network.encoder.", ref)},
               tmp_path / "byol.pth")
    with pytest.raises(UserError, match="several prefixes .*'online_network.encoder.'.*--pretrained-prefix"):
        load_pretrained(build_model("resnet20"), tmp_path / "byol.pth")
    fresh = build_model("resnet20")
    report = load_pretrained(fresh, tmp_path / "byol.pth", prefix="online_network.encoder.")
    assert (report["layout"], report["dropped"]) == ("custom", ["target_network.*"])
    assert all(torch.equal(v, ref[k]) for k, v in fresh.state_dict().items())
    # An override wins over detection, "" means no prefix, and the wrapper path may lead it.
    torch.save(moco_v2(ref), tmp_path / "moco.pth")
    with pytest.raises(UserError, match="under --pretrained-prefix ''.*module.encoder_q"):
        load_pretrained(build_model("resnet20"), tmp_path / "moco.pth", prefix="")
    fresh = build_model("resnet20")
    assert load_pretrained(fresh, tmp_path / "moco.pth", prefix="module.encoder_k.")["prefix"] == "module.encoder_k."
    assert not fresh.conv1.weight.any()                                    # the momentum encoder's stem
    fresh = build_model("resnet20")
    report = load_pretrained(fresh, tmp_path / "moco.pth", prefix="state_dict.module.encoder_q.")
    assert (report["layout"], report["prefix"], report["wrapper"]) == ("moco-v2", "module.encoder_q.", "state_dict")
    assert all(torch.equal(v, ref[k]) for k, v in fresh.state_dict().items())


def test_a_given_prefix_over_a_sequential_resnet_loads(tmp_path):
    """nn.Sequential(*resnet.children()[:-1]) under a prefix no project registers: --pretrained-prefix
    names it and the children's numbers map back to conv1, bn1, layer1..4."""
    ref = small()
    seq = {k.replace("backbone.", "net.encoder.", 1): v for k, v in lightly_sequential(ref).items()
           if k.startswith("backbone.")}
    torch.save(seq, tmp_path / "seq.pth")
    fresh = build_model("resnet20")
    assert load_pretrained(fresh, tmp_path / "seq.pth", prefix="net.encoder.")["loaded"] == len(ref)
    assert all(torch.equal(v, ref[k]) for k, v in fresh.state_dict().items())


def test_file_matching_no_layout_names_found_and_expected_prefixes(tmp_path):
    # leftthomas/SimCLR: the backbone as an nn.Sequential `f`, keys that fit no ResNet
    torch.save({"f.0.weight": torch.randn(64, 3, 3, 3), "f.1.weight": torch.ones(64), "g.0.weight": torch.randn(8, 64),
                "epoch": 3}, tmp_path / "simclr.pth")
    with pytest.raises(UserError) as e:
        load_pretrained(build_model("resnet50"), tmp_path / "simclr.pth")
    msg = str(e.value)
    assert "does not match any known checkpoint layout" in msg and "\n" not in msg
    assert "its keys start with f.*, g.*;" in msg                           # found
    assert "'module.encoder_q.'" in msg and "'_feature_blocks.'" in msg      # expected
    assert "--pretrained-prefix" in msg and "'conv1.weight'" in msg


def test_resnet18_weights_into_resnet50_name_the_first_mismatch(tmp_path):
    torch.save({"state_dict": under("module.encoder_q.", build_model("resnet18").state_dict()), "epoch": 3},
               tmp_path / "r18.pth.tar")
    with pytest.raises(UserError, match=r"layer1\.0\.conv1\.weight is \(64, 64, 3, 3\) in the file, "
                                        r"\(64, 64, 1, 1\) in the model; check --model$"):
        load_pretrained(build_model("resnet50"), tmp_path / "r18.pth.tar")


class Config:  # a pickled object: not a tensor, a container or a number
    lr = 0.1


def test_files_that_need_full_unpickling_are_refused(tmp_path):
    torch.save({"state_dict": {"conv1.weight": torch.ones(1)}, "cfg": Config()}, tmp_path / "ckpt.pth")
    with pytest.raises(UserError, match=r"holds a pickled .*Config.*weights_only=True") as e:
        load_pretrained(build_model("resnet18"), tmp_path / "ckpt.pth")
    assert "['state_dict']" not in str(e.value)   # advice that holds for files without that key too
    import numpy as np                             # an object array could hold anything: refused too
    torch.save({**small(), "objs": np.array([Config(), 1], dtype=object)}, tmp_path / "obj.pth")
    with pytest.raises(UserError, match=r"holds a pickled .*ObjectDType"):
        load_pretrained(build_model("resnet20"), tmp_path / "obj.pth")


def test_numpy_numbers_beside_the_weights_load_under_numpy_2_and_1_names(tmp_path):
    """Training scripts store best accuracies as numpy scalars and arrays: weights_only allows those
    (numpy numbers, numeric arrays), also when the file was written under numpy 1 (numpy.core)."""
    import io
    import zipfile
    import numpy as np
    ref = small()
    torch.save({"state_dict": ref, "best_acc1": np.float64(71.2), "accs": np.zeros(3, dtype=np.float32)},
               tmp_path / "np2.pth")
    fresh = build_model("resnet20")
    assert load_pretrained(fresh, tmp_path / "np2.pth")["loaded"] == len(ref)
    assert all(torch.equal(v, ref[k]) for k, v in fresh.state_dict().items())
    # the same file as numpy 1 writes it: its pickle names numpy.core.multiarray
    old, new = zipfile.ZipFile(tmp_path / "np2.pth"), io.BytesIO()
    with zipfile.ZipFile(new, "w") as z:
        for item in old.infolist():
            data = old.read(item.filename)
            z.writestr(item, data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
                       if item.filename.endswith("data.pkl") else data)
    assert b"numpy.core.multiarray" in zipfile.ZipFile(new).read("np2/data.pkl")
    (tmp_path / "np1.pth").write_bytes(new.getvalue())
    assert load_pretrained(build_model("resnet20"), tmp_path / "np1.pth")["loaded"] == len(ref)


def test_solo_learn_cifar_stem_loads_with_a_note(tmp_path):
    """solo-learn's CIFAR ResNet-18 pads its 3x3 stem by 2 (solo/methods/base.py), ours by 1: nothing in
    the shapes tells, so the load line says it."""
    torch.manual_seed(2)
    ref = build_model("resnet18_cifar").state_dict()
    torch.save({"epoch": 3, "state_dict": {**under("backbone.", ref), **mlp("projector.", 512, 128),
                                           **mlp("classifier.", 512, 10)}}, tmp_path / "simclr-cifar10.ckpt")
    report = load_pretrained(build_model("resnet18_cifar"), tmp_path / "simclr-cifar10.ckpt")
    assert report["layout"] == "solo-learn" and "pads by 2" in describe(report)
    imagenet = build_model("resnet50").state_dict()   # a 7x7 stem: nothing to say
    torch.save({"state_dict": {**under("backbone.", imagenet), **mlp("projector.", 2048, 128)}}, tmp_path / "in.ckpt")
    assert "note" not in load_pretrained(build_model("resnet50"), tmp_path / "in.ckpt")


def test_lottery_starts_from_a_public_checkpoint_and_records_what_it_loaded(tmp_path, capsys):
    """The user's path: `sslprune lottery --pretrained moco.pth.tar`, detected, reported, recorded."""
    import json

    from sslprune.cli import main

    torch.manual_seed(0)
    source = build_model("resnet20")
    sd = {f"module.encoder_q.{k}": v for k, v in source.state_dict().items()}
    sd |= {f"module.encoder_k.{k}": v + 1 for k, v in source.state_dict().items()}
    sd |= {"module.encoder_q.fc.0.weight": torch.zeros(64, 64), "module.queue": torch.zeros(128, 16)}
    torch.save({"state_dict": sd, "epoch": 200, "arch": "resnet20"}, tmp_path / "moco.pth.tar")
    flags = ["lottery", "--dataset", "digits", "--model", "resnet20", "--task", "rotation", "--optimizer", "adam",
             "--lr", "1e-3", "--batch-size", "64", "--epochs", "1", "--levels", "0", "--replicates", "1",
             "--root", str(tmp_path / "runs"), "--quiet", "--pretrained", str(tmp_path / "moco.pth.tar")]
    assert main(flags) == 0
    err = capsys.readouterr().err
    assert "moco-v2 layout (prefix 'module.encoder_q.', wrapper 'state_dict')" in err
    exp_dir = next((tmp_path / "runs").iterdir())
    record = json.loads((exp_dir / "replicate_1" / "pretrained.json").read_text())
    assert record["loaded"]["layout"] == "moco-v2" and record["loaded"]["loaded"] > 0
    init = load_file(str(exp_dir / "replicate_1" / "init.safetensors"))
    assert torch.equal(init["backbone.conv1.weight"], source.state_dict()["conv1.weight"])  # the query encoder
    # an explicit prefix picks the momentum encoder instead; it is its own experiment
    assert main(flags + ["--pretrained-prefix", "module.encoder_k."]) == 0
    assert len(list((tmp_path / "runs").iterdir())) == 2
    assert main(flags[:-2] + ["--pretrained-prefix", "module."]) == 2      # no --pretrained: refused
    assert "--pretrained-prefix applies to a --pretrained checkpoint" in capsys.readouterr().err
