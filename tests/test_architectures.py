"""The paper-scale architectures: parameter counts, reference key layouts, checkpoint loading.

Nothing here imports the reference repositories. Their state-dict layouts and forward passes are
written out below from reading the definitions (TRADES 6e8e11b ``models/resnet.py`` and
``models/wideresnet.py``, robust_overfitting c47a25c ``preactresnet.py``, HAT 3177a4f
``core/models/``), so that a checkpoint in a reference's layout can be built here, loaded into
our models and checked to compute what the reference computes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memloss_addon.experiments.architectures import (
    ARCHITECTURE_NAMES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    NORMALIZATIONS,
    InputNormalization,
    PreActResNet18,
    ResNet18,
    WideResNet,
    build_architecture,
    count_parameters,
    reference_name,
    resolve_normalization,
)
from memloss_addon.experiments.models import ALL_MODEL_NAMES, build_model, describe_models
from memloss_addon.experiments.reference_weights import (
    convert_reference_state_dict,
    load_reference_checkpoint,
    load_reference_state_dict,
    to_reference_state_dict,
)

# Parameter counts for 10 classes.
EXPECTED_COUNTS = {
    # TRADES 6e8e11b models/resnet.py ResNet18(): the published CIFAR ResNet-18 figure.
    "resnet18": 11_173_962,
    # robust_overfitting c47a25c preactresnet.py PreActResNet18(): by hand, ResNet-18's convs
    # and linear layer with other BatchNorms. ResNet-18's BN parameters: stem 2*64 + blocks
    # 4*(2*64 + 2*128 + 2*256 + 2*512) + shortcut BNs 2*(128 + 256 + 512) = 9,600. PreAct's:
    # blocks 2*(64+64) * 2 + 2*(64+128) + 2*(128+128) + 2*(128+256) + 2*(256+256) + 2*(256+512)
    # + 2*(512+512) = 6,784, final BN 2*512 = 1,024, in all 7,808. 11,173,962 - 1,792.
    "preact-resnet18": 11_172_170,
    # TRADES 6e8e11b models/wideresnet.py WideResNet() without sub_block1: the published
    # WRN-34-10 figure (46.16M).
    "wrn-34-10": 46_160_474,
    # HAT 3177a4f core/models/wideresnet.py wideresnet("wrn-28-10"): the published WRN-28-10
    # figure (36.48M).
    "wrn-28-10": 36_479_194,
}
# TRADES' unused sub_block1 (NetworkBlock(5, 16, 160)): first block bn1 2*16 + conv1 16*160*9
# + bn2 2*160 + conv2 160*160*9 + convShortcut 16*160 = 256,352; four more blocks of
# 2*160 + 160*160*9 + 2*160 + 160*160*9 = 461,440 each.
SUB_BLOCK1 = 256_352 + 4 * 461_440
TRADES_WRN_34_10_WITH_SUB_BLOCK1 = 48_262_586


# -- the references' state-dict layouts, written from their definitions -------------------------


def _conv(keys, name, out_c, in_c, k):
    keys[f"{name}.weight"] = (out_c, in_c, k, k)


def _bn(keys, name, c):
    for part in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{name}.{part}"] = (c,)
    keys[f"{name}.num_batches_tracked"] = ()


def ref_resnet18_layout(num_classes=10, w=64):
    """TRADES models/resnet.py (= HAT core/models/resnet.py, MART resnet.py), ResNet18()."""
    keys: dict[str, tuple[int, ...]] = {}
    _conv(keys, "conv1", w, 3, 3)
    _bn(keys, "bn1", w)
    in_planes = w
    for layer, planes, stride in ((1, w, 1), (2, 2 * w, 2), (3, 4 * w, 2), (4, 8 * w, 2)):
        for block in range(2):
            p = f"layer{layer}.{block}."
            s = stride if block == 0 else 1
            _conv(keys, p + "conv1", planes, in_planes, 3)
            _bn(keys, p + "bn1", planes)
            _conv(keys, p + "conv2", planes, planes, 3)
            _bn(keys, p + "bn2", planes)
            if s != 1 or in_planes != planes:
                _conv(keys, p + "shortcut.0", planes, in_planes, 1)
                _bn(keys, p + "shortcut.1", planes)
            in_planes = planes
    keys["linear.weight"] = (num_classes, 8 * w)
    keys["linear.bias"] = (num_classes,)
    return keys


def ref_preact_layout(num_classes=10, w=64):
    """robust_overfitting preactresnet.py (= HAT core/models/preact_resnet.py)."""
    keys: dict[str, tuple[int, ...]] = {}
    _conv(keys, "conv1", w, 3, 3)
    in_planes = w
    for layer, planes, stride in ((1, w, 1), (2, 2 * w, 2), (3, 4 * w, 2), (4, 8 * w, 2)):
        for block in range(2):
            p = f"layer{layer}.{block}."
            s = stride if block == 0 else 1
            _bn(keys, p + "bn1", in_planes)
            _conv(keys, p + "conv1", planes, in_planes, 3)
            _bn(keys, p + "bn2", planes)
            _conv(keys, p + "conv2", planes, planes, 3)
            if s != 1 or in_planes != planes:
                _conv(keys, p + "shortcut.0", planes, in_planes, 1)
            in_planes = planes
    _bn(keys, "bn", 8 * w)
    keys["linear.weight"] = (num_classes, 8 * w)
    keys["linear.bias"] = (num_classes,)
    return keys


def _network_block(keys, name, n, in_planes, out_planes):
    for i in range(n):
        p = f"{name}.layer.{i}."
        cin = in_planes if i == 0 else out_planes
        _bn(keys, p + "bn1", cin)
        _conv(keys, p + "conv1", out_planes, cin, 3)
        _bn(keys, p + "bn2", out_planes)
        _conv(keys, p + "conv2", out_planes, out_planes, 3)
        if cin != out_planes:
            _conv(keys, p + "convShortcut", out_planes, cin, 1)


def ref_wrn_layout(depth=34, k=10, num_classes=10, sub_block1=False):
    """TRADES models/wideresnet.py (sub_block1=True; = MART wideresnet.py), robust_overfitting
    wideresnet.py and HAT core/models/wideresnet.py (sub_block1=False)."""
    n = (depth - 4) // 6
    ch = (16, 16 * k, 32 * k, 64 * k)
    keys: dict[str, tuple[int, ...]] = {}
    _conv(keys, "conv1", 16, 3, 3)
    _network_block(keys, "block1", n, ch[0], ch[1])
    if sub_block1:
        _network_block(keys, "sub_block1", n, ch[0], ch[1])
    _network_block(keys, "block2", n, ch[1], ch[2])
    _network_block(keys, "block3", n, ch[2], ch[3])
    _bn(keys, "bn1", ch[3])
    keys["fc.weight"] = (num_classes, ch[3])
    keys["fc.bias"] = (num_classes,)
    return keys


def layout_parameters(layout):
    """Parameters (not BN statistics) of a layout: what the reference's parameters() holds."""
    stats = ("running_mean", "running_var", "num_batches_tracked")
    total = 0
    for key, shape in layout.items():
        if not key.endswith(stats):
            total += int(torch.Size(shape).numel())
    return total


def random_state(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif (
            key.endswith(("bn1.weight", "bn2.weight", "bn.weight", "1.weight")) and len(shape) == 1
        ):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.2
    return state


# -- the references' forward passes (eval mode), written from their definitions ------------------


def _bn_eval(s, name, x):
    return F.batch_norm(
        x,
        s[f"{name}.running_mean"],
        s[f"{name}.running_var"],
        s[f"{name}.weight"],
        s[f"{name}.bias"],
        training=False,
        eps=1e-5,
    )


def _conv_f(s, name, x, stride=1):
    weight = s[f"{name}.weight"]
    return F.conv2d(x, weight, stride=stride, padding=weight.shape[-1] // 2)


def ref_resnet18_forward(s, x):
    out = F.relu(_bn_eval(s, "bn1", _conv_f(s, "conv1", x)))
    for layer, stride in ((1, 1), (2, 2), (3, 2), (4, 2)):
        for block in range(2):
            p = f"layer{layer}.{block}."
            st = stride if block == 0 else 1
            o = F.relu(_bn_eval(s, p + "bn1", _conv_f(s, p + "conv1", out, st)))
            o = _bn_eval(s, p + "bn2", _conv_f(s, p + "conv2", o))
            if f"{p}shortcut.0.weight" in s:
                sc = _bn_eval(s, p + "shortcut.1", _conv_f(s, p + "shortcut.0", out, st))
            else:
                sc = out
            out = F.relu(o + sc)
    out = F.avg_pool2d(out, 4).flatten(1)
    return F.linear(out, s["linear.weight"], s["linear.bias"])


def ref_preact_forward(s, x):
    out = _conv_f(s, "conv1", x)
    for layer, stride in ((1, 1), (2, 2), (3, 2), (4, 2)):
        for block in range(2):
            p = f"layer{layer}.{block}."
            st = stride if block == 0 else 1
            o = F.relu(_bn_eval(s, p + "bn1", out))
            sc = _conv_f(s, p + "shortcut.0", o, st) if f"{p}shortcut.0.weight" in s else out
            o = _conv_f(s, p + "conv1", o, st)
            o = _conv_f(s, p + "conv2", F.relu(_bn_eval(s, p + "bn2", o)))
            out = o + sc
    out = F.relu(_bn_eval(s, "bn", out))
    out = F.avg_pool2d(out, 4).flatten(1)
    return F.linear(out, s["linear.weight"], s["linear.bias"])


def ref_wrn_forward(s, x, depth):
    n = (depth - 4) // 6
    out = _conv_f(s, "conv1", x)
    for name, stride in (("block1", 1), ("block2", 2), ("block3", 2)):
        for i in range(n):
            p = f"{name}.layer.{i}."
            st = stride if i == 0 else 1
            equal = f"{p}convShortcut.weight" not in s
            if not equal:
                out = F.relu(_bn_eval(s, p + "bn1", out))
                o = out
            else:
                o = F.relu(_bn_eval(s, p + "bn1", out))
            o = F.relu(_bn_eval(s, p + "bn2", _conv_f(s, p + "conv1", o, st)))
            o = _conv_f(s, p + "conv2", o)
            out = (out if equal else _conv_f(s, p + "convShortcut", out, st)) + o
    out = F.relu(_bn_eval(s, "bn1", out))
    out = F.avg_pool2d(out, 8).flatten(1)
    return F.linear(out, s["fc.weight"], s["fc.bias"])


# -- parameter counts ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHITECTURE_NAMES)
def test_parameter_counts_equal_the_references(name):
    with torch.device("meta"):
        model = build_architecture(name, num_classes=10)
    assert count_parameters(model) == EXPECTED_COUNTS[name]


def test_the_reference_layouts_hold_the_same_counts():
    """The layouts written from the reference files agree with the literals, independently."""
    assert layout_parameters(ref_resnet18_layout()) == EXPECTED_COUNTS["resnet18"]
    assert layout_parameters(ref_preact_layout()) == EXPECTED_COUNTS["preact-resnet18"]
    assert layout_parameters(ref_wrn_layout(34, 10)) == EXPECTED_COUNTS["wrn-34-10"]
    assert layout_parameters(ref_wrn_layout(28, 10)) == EXPECTED_COUNTS["wrn-28-10"]
    with_sub = layout_parameters(ref_wrn_layout(34, 10, sub_block1=True))
    assert with_sub == TRADES_WRN_34_10_WITH_SUB_BLOCK1 == EXPECTED_COUNTS["wrn-34-10"] + SUB_BLOCK1


def test_describe_models_lists_every_model_with_its_count():
    counts = dict(describe_models())
    assert list(counts) == list(ALL_MODEL_NAMES)
    for name, expected in EXPECTED_COUNTS.items():
        assert counts[name] == expected
    assert dict(describe_models(num_classes=100))["resnet18"] == 11_173_962 + 90 * 513


# -- construction and forward passes -------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options",
    [
        ("resnet18", {"base_width": 4}),
        ("preact-resnet18", {"base_width": 4}),
        ("wrn-34-10", {"widen_factor": 1}),
        ("wrn-28-10", {"widen_factor": 1}),
    ],
)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_tiny_widths_run_for_any_class_count(name, options, num_classes):
    model = build_model(
        name, sample_shape=(3, 32, 32), num_classes=num_classes, normalization=None, **options
    )
    out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, num_classes) and torch.isfinite(out).all()
    out.sum().backward()


def test_width_options_are_checked():
    with pytest.raises(ValueError, match="widen_factor"):
        build_architecture("resnet18", widen_factor=2)
    with pytest.raises(ValueError, match="base_width"):
        build_architecture("wrn-34-10", base_width=2)
    with pytest.raises(ValueError, match="width options"):
        build_model("digits-cnn", sample_shape=(1, 8, 8), num_classes=10, base_width=2)
    with pytest.raises(ValueError, match="depth"):
        WideResNet(depth=33)
    with pytest.raises(ValueError, match="unknown"):
        build_model("resnet-1000", sample_shape=(3, 32, 32), num_classes=10)  # type: ignore


def test_the_small_models_are_unchanged():
    assert type(build_model("small-resnet", sample_shape=(3, 32, 32), num_classes=10)).__name__ == (
        "SmallResNet"
    )


def test_normalization_inside_the_model():
    assert resolve_normalization("cifar10") == (CIFAR10_MEAN, CIFAR10_STD)
    assert CIFAR10_STD == (0.2471, 0.2435, 0.2616)  # robust_overfitting utils.py line 18
    assert NORMALIZATIONS["cifar10-hat"][1] == (0.2023, 0.1994, 0.2010)  # type: ignore[index]
    layer = InputNormalization("cifar10")
    x = torch.rand(2, 3, 4, 4)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.equal(layer(x), (x - mean) / std)
    assert torch.equal(InputNormalization(None)(x), x)
    assert torch.equal(InputNormalization("identity")(x), x)
    # Not in the state dict: published checkpoints have no such entries.
    assert not any("normalize" in k for k in ResNet18(base_width=2).state_dict())
    with pytest.raises(ValueError, match="unknown normalization"):
        InputNormalization("imagenet")
    with pytest.raises(ValueError, match="positive"):
        InputNormalization(((0.5,), (0.0,)))


def test_a_default_model_normalizes_with_cifar10_statistics():
    model = PreActResNet18(base_width=2).eval()
    plain = PreActResNet18(base_width=2, normalization=None).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), plain((x - mean) / std))


def test_wide_resnet_initialisation_follows_the_reference():
    torch.manual_seed(0)
    model = WideResNet(depth=10, widen_factor=4)
    conv = model.stages[2][0].conv2  # 256 -> 256, 3x3: std sqrt(2 / (9 * 256))
    assert abs(conv.weight.std().item() - (2 / (9 * 256)) ** 0.5) < 0.002
    assert torch.equal(model.fc.bias, torch.zeros(10))
    assert torch.equal(model.final_bn.weight, torch.ones(256))


# -- key mapping and loading ---------------------------------------------------------------------

CASES = [
    # (model factory, reference layout, reference forward, normalization of the reference run)
    (
        lambda n: ResNet18(base_width=4, normalization=n),
        lambda: ref_resnet18_layout(w=4),
        ref_resnet18_forward,
    ),
    (
        lambda n: PreActResNet18(base_width=4, normalization=n),
        lambda: ref_preact_layout(w=4),
        ref_preact_forward,
    ),
    (
        lambda n: WideResNet(depth=10, widen_factor=1, normalization=n),
        lambda: ref_wrn_layout(10, 1),
        lambda s, x: ref_wrn_forward(s, x, 10),
    ),
    (
        lambda n: WideResNet(depth=16, widen_factor=2, normalization=n),
        lambda: ref_wrn_layout(16, 2),
        lambda s, x: ref_wrn_forward(s, x, 16),
    ),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_our_keys_map_one_to_one_onto_the_reference_layout(case):
    factory, layout, _ = CASES[case]
    model = factory(None)
    reference = {reference_name(model, k): tuple(v.shape) for k, v in model.state_dict().items()}
    assert reference == layout()


@pytest.mark.parametrize("case", range(len(CASES)))
def test_a_reference_checkpoint_computes_what_the_reference_computes(case):
    factory, layout, forward = CASES[case]
    state = random_state(layout(), seed=case)
    model = factory(None).eval()
    source = "hat"  # HAT defines all three families
    load_reference_state_dict(
        model, {"model_state_dict": {f"module.0.{k}": v for k, v in state.items()}}, source=source
    )
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), forward(state, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name, layout",
    [
        ("resnet18", ref_resnet18_layout),
        ("preact-resnet18", ref_preact_layout),
        ("wrn-34-10", lambda: ref_wrn_layout(34, 10)),
        ("wrn-28-10", lambda: ref_wrn_layout(28, 10)),
    ],
)
def test_full_size_reference_layouts_convert(name, layout):
    with torch.device("meta"):
        model = build_architecture(name, normalization=None)
        state = {k: torch.empty(shape) for k, shape in layout().items()}
    converted, report = convert_reference_state_dict(model, state, source="hat")
    assert set(converted) == set(model.state_dict()) and report.dropped == ()


def test_trades_wide_resnet_checkpoint_loses_only_sub_block1():
    layout = ref_wrn_layout(10, 2, sub_block1=True)
    state = random_state(layout)
    model = WideResNet(depth=10, widen_factor=2, normalization=None).eval()
    report = load_reference_state_dict(model, state, source="trades")
    assert report.dropped and all(k.startswith("sub_block1.") for k in report.dropped)
    assert len(report.dropped) == sum(k.startswith("sub_block1.") for k in layout)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_wrn_forward(state, x, 10), rtol=1e-4, atol=1e-5)
    # MART's wideresnet.py has the same layout.
    assert load_reference_state_dict(model, state, source="mart").dropped == report.dropped


def test_trades_and_mart_resnet_checkpoints_load():
    state = random_state(ref_resnet18_layout(w=4))
    model = ResNet18(base_width=4, normalization=None)
    for source in ("trades", "mart"):
        assert load_reference_state_dict(model, state, source=source).dropped == ()
    assert torch.equal(model.fc.weight, state["linear.weight"])
    assert torch.equal(
        model.stages[3][0].shortcut.bn.running_var,  # type: ignore[union-attr]
        state["layer4.0.shortcut.1.running_var"],
    )


def test_robust_overfitting_checkpoints_load_plain_and_wrapped(tmp_path):
    state = random_state(ref_preact_layout(w=4))
    parallel = {f"module.{k}": v for k, v in state.items()}
    model = PreActResNet18(base_width=4, normalization="cifar10").eval()
    # model_{epoch}.pth: the DataParallel state dict (train_cifar.py line 437)
    load_reference_state_dict(model, parallel, source="robust_overfitting")
    # model_best.pth: {"state_dict": ..., "test_robust_acc": ...} (lines 442-448)
    best = {"state_dict": parallel, "test_robust_acc": 0.5, "test_acc": 0.8}
    torch.save(best, tmp_path / "model_best.pth")
    load_reference_checkpoint(model, tmp_path / "model_best.pth", source="robust_overfitting")
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():  # train_cifar.py evaluates model(normalize(X))
        torch.testing.assert_close(
            model(x), ref_preact_forward(state, (x - mean) / std), rtol=1e-4, atol=1e-5
        )
    with pytest.raises(ValueError, match="normalized inputs"):
        load_reference_state_dict(
            PreActResNet18(base_width=4, normalization=None), parallel, source="robust_overfitting"
        )


def test_hat_checkpoints_with_and_without_normalize():
    state = random_state(ref_resnet18_layout(w=4))
    plain = {"model_state_dict": {f"module.0.{k}": v for k, v in state.items()}}
    normalized = {"model_state_dict": {f"module.1.{k}": v for k, v in state.items()}}
    assert (
        load_reference_state_dict(
            ResNet18(base_width=4, normalization=None), plain, source="hat"
        ).normalized
        is False
    )
    assert (
        load_reference_state_dict(
            ResNet18(base_width=4, normalization="cifar10-hat"), normalized, source="hat"
        ).normalized
        is True
    )
    with pytest.raises(ValueError, match="cifar10-hat"):
        load_reference_state_dict(
            ResNet18(base_width=4, normalization=None), normalized, source="hat"
        )
    with pytest.raises(ValueError, match="normalization=None"):
        load_reference_state_dict(ResNet18(base_width=4), plain, source="hat")
    # The check can be turned off (e.g. to study a mismatch on purpose).
    load_reference_state_dict(
        ResNet18(base_width=4), plain, source="hat", check_normalization=False
    )


def test_loading_refuses_what_does_not_fit():
    state = random_state(ref_resnet18_layout(w=4))
    model = ResNet18(base_width=4, normalization=None)
    with pytest.raises(ValueError, match="defines no PreActResNet18"):
        load_reference_state_dict(
            PreActResNet18(base_width=4, normalization=None), state, source="trades"
        )
    with pytest.raises(ValueError, match="number of classes"):
        load_reference_state_dict(
            ResNet18(base_width=4, num_classes=100, normalization=None), state, source="trades"
        )
    with pytest.raises(ValueError, match="1 missing"):
        load_reference_state_dict(
            model, {k: v for k, v in state.items() if k != "linear.bias"}, source="trades"
        )
    with pytest.raises(ValueError, match="1 unexpected"):
        load_reference_state_dict(model, {**state, "extra.weight": torch.zeros(1)}, source="trades")
    with pytest.raises(ValueError, match="unknown source"):
        load_reference_state_dict(model, state, source="madry")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        load_reference_state_dict(torch.nn.Linear(2, 2), state, source="trades")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        load_reference_state_dict(model, {**state, "linear.bias": torch.zeros(3)}, source="trades")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_checkpoints_without_num_batches_tracked_load():
    """Checkpoints written before torch 0.4.1 lack num_batches_tracked."""
    state = random_state(ref_resnet18_layout(w=4))
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    report = load_reference_state_dict(
        ResNet18(base_width=4, normalization=None), old, source="trades"
    )
    assert report.kept and all(k.endswith("num_batches_tracked") for k in report.kept)


def test_to_reference_state_dict_round_trips():
    model = WideResNet(depth=10, widen_factor=2, normalization=None)
    exported = to_reference_state_dict(model)
    assert set(exported) == set(ref_wrn_layout(10, 2))
    other = WideResNet(depth=10, widen_factor=2, normalization=None)
    load_reference_state_dict(
        other, exported, source="robust_overfitting", check_normalization=False
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True)
    )
