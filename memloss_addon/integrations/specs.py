"""The integration patches: small anchored edits to public adversarial-training repositories.

Each :class:`RepoPatch` lists the files that identify the repository, a few :class:`Edit` s (find
an exact anchor line, then insert after/before it or replace it) and a new file of ours,
``memloss_shim.py`` (one beside each patched script's folder), which creates the
:class:`~memloss_addon.integrations.hook.TrainingHook` the edited lines call. A patch may cover
several training scripts of one repository; each script, with the files its training path runs
through, stays within the line budget. Anchors are the only upstream text carried here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["LINE_BUDGET", "PATCHES", "Edit", "RepoPatch", "SHIM_PATH"]

SHIM_PATH = "memloss_shim.py"
LINE_BUDGET = 15
"""Upstream lines (added plus removed) a patch may change per training script."""

Action = Literal["insert_after", "insert_before", "replace"]


@dataclass(frozen=True)
class Edit:
    """One anchored change to one file.

    Args:
        path: file inside the repository, ``/``-separated.
        anchor: consecutive lines (without line endings) that must occur exactly ``count`` times.
        action: insert ``lines`` after or before each match, or replace each match with them.
        lines: the new lines, with their indentation.
        count: how many times the anchor must occur (each occurrence is edited).

    Example:
        >>> Edit("a.py", ("x = 1",), "insert_after", ("y = 2",)).changed_lines
        1
    """

    path: str
    anchor: tuple[str, ...]
    action: Action
    lines: tuple[str, ...]
    count: int = 1

    def __post_init__(self) -> None:
        if self.action not in ("insert_after", "insert_before", "replace"):
            raise ValueError(f"unknown edit action {self.action!r}")
        if not self.anchor:
            raise ValueError(f"edit of {self.path!r} has an empty anchor")
        if self.count < 1:
            raise ValueError(f"edit of {self.path!r} has count {self.count}; it must be >= 1")

    @property
    def changed_lines(self) -> int:
        """Upstream lines added plus removed by this edit."""
        removed = len(self.anchor) if self.action == "replace" else 0
        return (removed + len(self.lines)) * self.count


@dataclass(frozen=True)
class RepoPatch:
    """A patch for one repository.

    Args:
        name: the name users pass to ``memloss patch``.
        repository: ``owner/name`` on GitHub.
        commit: the upstream commit the anchors were taken from.
        required_files: files whose presence identifies the repository.
        edits: the anchored edits, applied in order.
        new_files: files of ours to create, path to text.
        scripts: each training script the patch covers, with the edited files its training path
            runs through (the script first); empty: one script, every edited file counts.

    Raises:
        ValueError: ``scripts`` names a file no edit touches, or leaves an edited file out.

    Example:
        >>> PATCHES["trades"].changed_lines <= LINE_BUDGET
        True
        >>> PATCHES["mart"].changed_lines_by_script()
        {'train_wideresnet.py': 10, 'train_resnet.py': 10}
    """

    name: str
    repository: str
    commit: str
    required_files: tuple[str, ...]
    edits: tuple[Edit, ...]
    new_files: dict[str, str] = field(default_factory=dict)
    scripts: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        edited = set(self.edited_files)
        covered: set[str] = set()
        for script, files in self.scripts.items():
            unknown = sorted(set(files) - edited)
            if unknown:
                raise ValueError(
                    f"patch {self.name!r}: script {script!r} lists files no edit touches: "
                    f"{', '.join(unknown)}"
                )
            covered.update(files)
        if self.scripts and covered != edited:
            raise ValueError(
                f"patch {self.name!r}: edited files on no script's path: "
                f"{', '.join(sorted(edited - covered))}"
            )

    @property
    def changed_lines(self) -> int:
        """Upstream lines added plus removed by all edits (new files of ours do not count)."""
        return sum(edit.changed_lines for edit in self.edits)

    def changed_lines_by_script(self) -> dict[str, int]:
        """Upstream lines changed on each script's path (the budget is per script).

        Without ``scripts`` the one entry is the first edited file with all lines.
        """
        if not self.scripts:
            return {self.edited_files[0]: self.changed_lines}
        return {
            script: sum(edit.changed_lines for edit in self.edits if edit.path in files)
            for script, files in self.scripts.items()
        }

    @property
    def edited_files(self) -> tuple[str, ...]:
        """The upstream files the edits touch, in first-touch order."""
        return tuple(dict.fromkeys(edit.path for edit in self.edits))


def _shim(name: str, *, cuda_fallback: bool = False, root: str = ".") -> str:
    lines = [
        f'"""MemLoss hook for this repository (added by `memloss patch {name}`; removed by',
        f'`memloss patch {name} {root} --revert`)."""',
        "",
    ]
    if cuda_fallback:
        lines += [
            "from memloss_addon.integrations.hook import TrainingHook, keep_cuda_calls_on_cpu",
            "",
            "# The script calls .cuda() in several places; on a machine without CUDA they keep",
            "# tensors on the CPU instead of failing.",
            "keep_cuda_calls_on_cpu()",
        ]
    else:
        lines += ["from memloss_addon.integrations.hook import TrainingHook"]
    lines += ["", "memloss = TrainingHook()", ""]
    return "\n".join(lines)


_IMPORT = "from memloss_shim import memloss"
_RANDN_CUDA = "torch.randn(x_natural.shape).cuda().detach()"
_RANDN_HERE = "torch.randn(x_natural.shape).to(x_natural.device).detach()"
# The random start of TRADES-style attacks, on the input's device, started from the memory with
# --mem-attack-init (memloss.attack_init returns the start itself without the flag).
_START_CUDA = "    x_adv = x_natural.detach() + 0.001 * " + _RANDN_CUDA
_START_HERE = (
    "    x_adv = memloss.attack_init(x_natural, x_natural.detach() + 0.001 * "
    + _RANDN_HERE
    + ", epsilon)"
)


def _pgd_loop_script_edits(script: str, script_import: str, save_anchor: str) -> tuple[Edit, ...]:
    """The edits of one training script in the layout of Yaodong Yu's TRADES script."""
    return (
        Edit(script, (script_import,), "insert_after", (_IMPORT,)),
        Edit(
            script,
            ("args = parser.parse_args()",),
            "insert_before",
            ("memloss.add_arguments(parser)",),
        ),
        Edit(
            script,
            ("    for batch_idx, (data, target) in enumerate(train_loader):",),
            "replace",
            (
                "    for batch_idx, (data, target, idx) in "
                "enumerate(memloss.indexed(train_loader)):",
            ),
        ),
        Edit(
            script,
            ("                           beta=args.beta)",),
            "insert_after",
            ("        loss = loss + memloss.term(model, idx, data, target)",),
        ),
        Edit(
            script,
            (save_anchor,),
            "insert_after",
            ("            memloss.save(os.path.join(model_dir, 'memory-last.pt'), epoch=epoch)",),
        ),
    )


def _pgd_loop_patch(
    *,
    name: str,
    repository: str,
    commit: str,
    scripts: tuple[str, ...],
    loss_file: str,
    loss_import: str,
    script_import: str,
    loss_line: str,
    extra_loss_edits: tuple[Edit, ...],
    save_anchor: str,
) -> RepoPatch:
    """TRADES and MART share the layout of Yaodong Yu's training script."""
    script_edits = tuple(
        edit
        for script in scripts
        for edit in _pgd_loop_script_edits(script, script_import, save_anchor)
    )
    return RepoPatch(
        name=name,
        repository=repository,
        commit=commit,
        required_files=(*scripts, loss_file),
        edits=(
            *script_edits,
            Edit(loss_file, (loss_import,), "insert_after", (_IMPORT,)),
            Edit(loss_file, (_START_CUDA,), "replace", (_START_HERE,)),
            *extra_loss_edits,
            Edit(loss_file, (loss_line,), "insert_after", ("    memloss.record(x_adv, logits)",)),
        ),
        new_files={SHIM_PATH: _shim(name)},
        scripts={script: (script, loss_file) for script in scripts},
    )


TRADES = _pgd_loop_patch(
    name="trades",
    repository="yaodongyu/TRADES",
    commit="6e8e11b7c281371c2f027ffadfbaea80361f09de",
    scripts=("train_trades_cifar10.py",),
    loss_file="trades.py",
    loss_import="import torch.optim as optim",
    script_import="from trades import trades_loss",
    loss_line="    loss = loss_natural + beta * loss_robust",
    extra_loss_edits=(
        Edit(
            "trades.py",
            ("        delta = 0.001 * " + _RANDN_CUDA,),
            "replace",
            ("        delta = 0.001 * " + _RANDN_HERE,),
        ),
    ),
    save_anchor="                       os.path.join(model_dir, "
    "'opt-wideres-checkpoint_epoch{}.tar'.format(epoch)))",
)

MART = _pgd_loop_patch(
    name="mart",
    repository="YisenWang/MART",
    commit="2d83e17b381dd2ee52223695e517bf6d5ff09c2c",
    scripts=("train_wideresnet.py", "train_resnet.py"),
    loss_file="mart.py",
    loss_import="from torch.autograd import Variable",
    script_import="from mart import mart_loss",
    loss_line="    loss = loss_adv + float(beta) * loss_robust",
    extra_loss_edits=(),
    save_anchor="                       os.path.join(model_dir, "
    "'opt-res-checkpoint_epoch{}.tar'.format(epoch)))",
)

# HAT's loss functions add the term themselves, before HAT's own backward pass (train-wa.py's
# hat_loss back-propagates the clean and adversarial part inside the function); the scripts only
# add the flags, track the loader's indices and save the memory.
_HAT_TERM = "    loss = loss + memloss.term(model, None, x, y, adv=x_adv, logits=out_clean)"
_HAT_SAVE = "    memloss.save(os.path.join(LOG_DIR, 'memory-last.pt'), epoch=epoch)"


def _hat_script_edits(script: str, import_anchor: str, del_anchor: str) -> tuple[Edit, ...]:
    return (
        Edit(script, (import_anchor,), "insert_after", (_IMPORT,)),
        Edit(
            script, ("parse = parser_train()",), "insert_after", ("memloss.add_arguments(parse)",)
        ),
        Edit(
            script,
            (del_anchor,),
            "insert_after",
            ("train_dataloader = memloss.tracked(train_dataloader)",),
        ),
        Edit(
            script,
            ("    trainer.save_model(os.path.join(LOG_DIR, 'weights-last.pt'))",),
            "insert_after",
            (_HAT_SAVE,),
        ),
    )


HAT = RepoPatch(
    name="hat",
    repository="imrahulr/hat",
    commit="3177a4f827480e97ac8ea4c5c6acab197cf97e66",
    required_files=(
        "train.py",
        "train-wa.py",
        "core/utils/hat.py",
        "gowal21uncovering/utils/hat.py",
    ),
    edits=(
        *_hat_script_edits("train.py", "from core import setup", "del train_dataset, test_dataset"),
        *_hat_script_edits(
            "train-wa.py",
            "from gowal21uncovering.utils import WATrainer",
            "del train_dataset, test_dataset, eval_dataset",
        ),
        Edit(
            "core/utils/hat.py",
            ("from .context import ctx_noparamgrad_and_eval",),
            "insert_after",
            (_IMPORT,),
        ),
        Edit(
            "core/utils/hat.py",
            ("    x_adv = x.detach() + 0.001 * torch.randn(x.shape).cuda().detach()",),
            "insert_after",
            ("    x_adv = memloss.attack_init(x, x_adv, epsilon)",),
        ),
        # hat_loss and at_hat_loss end with the same line; both add the term.
        Edit(
            "core/utils/hat.py",
            ("    loss = loss_clean + beta * loss_adv + gamma * loss_help",),
            "insert_after",
            (_HAT_TERM,),
            count=2,
        ),
        Edit(
            "gowal21uncovering/utils/hat.py",
            ("from core.utils import track_bn_stats",),
            "insert_after",
            (_IMPORT,),
        ),
        Edit(
            "gowal21uncovering/utils/hat.py",
            ("    x_adv = torch.clamp(x_adv, 0.0, 1.0)",),
            "insert_after",
            ("    x_adv = memloss.attack_init(x, x_adv, epsilon)",),
        ),
        # hat_loss: before its own backward pass of the clean and adversarial part.
        Edit(
            "gowal21uncovering/utils/hat.py",
            ("    loss = loss_clean + beta * loss_adv",),
            "insert_after",
            (_HAT_TERM,),
        ),
        Edit(
            "gowal21uncovering/utils/hat.py",
            ("    loss = loss_clean + beta * loss_adv + gamma * loss_help",),
            "insert_after",
            (_HAT_TERM,),
        ),
    ),
    # HAT calls .cuda() in its attacks and evaluation (e.g. the CW loss of train-wa.py's).
    new_files={SHIM_PATH: _shim("hat", cuda_fallback=True)},
    scripts={
        "train.py": ("train.py", "core/utils/hat.py"),
        # Without --tau, train-wa.py trains with core/utils/hat.py; with it, with gowal21uncovering.
        "train-wa.py": ("train-wa.py", "core/utils/hat.py", "gowal21uncovering/utils/hat.py"),
    },
)

ST = RepoPatch(
    name="st",
    repository="qizhangli/ST-AT",
    commit="82fc69ffec8963c364a56f41c245cdb8861d1738",
    required_files=("train_stat.py", "losses.py"),
    edits=(
        Edit("train_stat.py", ("from losses import stat_loss",), "insert_after", (_IMPORT,)),
        Edit(
            "train_stat.py",
            ("args = parser.parse_args()",),
            "insert_before",
            ("memloss.add_arguments(parser)",),
        ),
        Edit(
            "train_stat.py",
            ('device = torch.device("cuda")',),
            "replace",
            ('device = torch.device("cuda" if torch.cuda.is_available() else "cpu")',),
        ),
        Edit(
            "train_stat.py",
            ("    for batch_idx, (data, target) in enumerate(train_loader):",),
            "replace",
            (
                "    for batch_idx, (data, target, idx) in "
                "enumerate(memloss.indexed(train_loader)):",
            ),
        ),
        Edit(
            "train_stat.py",
            ("                                                    loss_mode=args.loss_mode)",),
            "insert_after",
            ("        loss = loss + memloss.term(model, idx, data, target)",),
        ),
        Edit(
            "train_stat.py",
            ('        start_epoch = 1 + state_dicts["epoch"]',),
            "insert_after",
            (
                "        memloss.resume(os.path.join(os.path.dirname(args.resume), "
                "'memory_cur.pt'), epoch=state_dicts['epoch'])",
            ),
        ),
        Edit(
            "train_stat.py",
            ("                   os.path.join(model_dir, 'ep_cur.pt'))",),
            "insert_after",
            ("        memloss.save(os.path.join(model_dir, 'memory_cur.pt'), epoch=epoch)",),
        ),
        Edit("losses.py", ("from utils import *",), "insert_after", (_IMPORT,)),
        Edit(
            "losses.py",
            (_START_CUDA,),
            "replace",
            (
                "    x_adv = memloss.attack_init(x_natural, x_natural.detach() + 0.001 * "
                + _RANDN_CUDA
                + ", epsilon)",
            ),
        ),
        Edit(
            "losses.py",
            ("    loss = loss_natural + beta * loss_robust",),
            "insert_after",
            ("    memloss.record(x_adv, nat_logit)",),
        ),
    ),
    new_files={SHIM_PATH: _shim("st", cuda_fallback=True)},
    scripts={"train_stat.py": ("train_stat.py", "losses.py")},
)

# robust_overfitting (PGD-AT) and AWP's AT script share one layout: a Batches class around a
# DataLoader, attack_pgd returning a perturbation, inputs normalised inside the loop, a loss with
# no clean term. The patch tracks the loader's indices (so Batches is untouched), adds the term
# before the step's backward pass (the hook runs the clean pass only when the term needs it) and
# starts attack_pgd from the memory with --mem-attack-init.
_PGD_AT_UNSUPPORTED = "{'mixup': [True], 'attack': ['free', 'none']}"
_PGD_AT_TERM = (
    "            robust_loss = robust_loss + memloss.term(model, None, X, y, "
    "adv=torch.clamp(X + delta[:X.size(0)], min=lower_limit, max=upper_limit), "
    "preprocess=normalize)"
)
_PGD_AT_INIT = "        delta = memloss.attack_init(X, delta, epsilon, norm=norm, delta=True)"
_DELTA_CLAMP = "        delta = clamp(delta, lower_limit-X, upper_limit-X)"
_RESUMING = "        logger.info(f'Resuming at epoch {start_epoch}')"
_RESUME = (
    "        memloss.resume(os.path.join(args.fname, f'memory_{start_epoch-1}.pt'), "
    "epoch=start_epoch-1)"
)
_OPT_SAVE = "torch.save(opt.state_dict(), os.path.join(args.fname, f'opt_{epoch}.pth'))"
_MEM_SAVE = "memloss.save(os.path.join(args.fname, f'memory_{epoch}.pt'), epoch=epoch)"


def _pgd_at_script_edits(
    script: str,
    *,
    import_anchor: str,
    unsupported: str,
    loader: Edit,
    save_indent: int,
) -> tuple[Edit, ...]:
    indent = " " * save_indent
    return (
        Edit(script, (import_anchor,), "insert_after", (_IMPORT,)),
        Edit(
            script,
            ("    return parser.parse_args()",),
            "insert_before",
            (f"    memloss.add_arguments(parser, unsupported={unsupported})",),
        ),
        Edit(script, (_DELTA_CLAMP,), "insert_after", (_PGD_AT_INIT,)),
        loader,
        Edit(script, (_RESUMING,), "insert_after", (_RESUME,)),
        Edit(script, ("            opt.zero_grad()",), "insert_before", (_PGD_AT_TERM,)),
        Edit(script, (indent + _OPT_SAVE,), "insert_after", (indent + _MEM_SAVE,)),
    )


def _batches_tracked(script: str) -> Edit:
    return Edit(
        script,
        (
            "    train_batches = Batches(train_set_x, args.batch_size, shuffle=True, "
            "set_random_choices=True, num_workers=2)",
        ),
        "insert_after",
        ("    train_batches.dataloader = memloss.tracked(train_batches.dataloader)",),
    )


def _loader_tracked(script: str) -> Edit:
    return Edit(
        script,
        ("        for i, (X, y) in enumerate(train_loader):",),
        "replace",
        ("        for i, (X, y) in enumerate(memloss.tracked(train_loader)):",),
    )


_RO_SCRIPTS = ("train_cifar.py", "train_svhn.py", "train_cifar100.py")

ROBUST_OVERFITTING = RepoPatch(
    name="robust-overfitting",
    repository="locuslab/robust_overfitting",
    commit="c47a25c5e00c8b2bb35488d962c04dd771b7e9af",
    required_files=(*_RO_SCRIPTS, "preactresnet.py", "utils.py"),
    edits=(
        *_pgd_at_script_edits(
            "train_cifar.py",
            import_anchor="from preactresnet import PreActResNet18",
            unsupported=_PGD_AT_UNSUPPORTED,
            loader=_batches_tracked("train_cifar.py"),
            save_indent=16,
        ),
        *_pgd_at_script_edits(
            "train_svhn.py",
            import_anchor="from preactresnet import PreActResNet18",
            unsupported="{'mixup': [True], 'attack': ['none']}",
            loader=_loader_tracked("train_svhn.py"),
            save_indent=16,
        ),
        *_pgd_at_script_edits(
            "train_cifar100.py",
            import_anchor="from preactresnet import PreActResNet18",
            unsupported="{'mixup': [True], 'attack': ['none']}",
            loader=_loader_tracked("train_cifar100.py"),
            save_indent=8,
        ),
    ),
    new_files={SHIM_PATH: _shim("robust-overfitting", cuda_fallback=True)},
    scripts={script: (script,) for script in _RO_SCRIPTS},
)

_AT_AWP = "AT_AWP/train_cifar10.py"
_TRADES_AWP = "trades_AWP/train_trades_cifar.py"

AWP = RepoPatch(
    name="awp",
    repository="csdongxian/AWP",
    commit="a7acf5d842fccf1bbb4b91644352ce157d370a26",
    required_files=(_AT_AWP, "AT_AWP/utils_awp.py", _TRADES_AWP, "trades_AWP/utils_awp.py"),
    edits=(
        # AT-AWP: the term is added after AWP has perturbed the weights and before the step's
        # backward pass, so the memory's forward pass sees the perturbed weights, as the loss
        # does; AWP's restore() then removes the perturbation as usual.
        *_pgd_at_script_edits(
            _AT_AWP,
            import_anchor="from utils_awp import AdvWeightPerturb",
            unsupported=_PGD_AT_UNSUPPORTED,
            loader=_batches_tracked(_AT_AWP),
            save_indent=16,
        ),
        # TRADES-AWP: the same place, with TRADES' clean logits (computed on the perturbed
        # weights).
        Edit(_TRADES_AWP, ("from utils_awp import TradesAWP",), "insert_after", (_IMPORT,)),
        Edit(
            _TRADES_AWP,
            ("args = parser.parse_args()",),
            "insert_before",
            ("memloss.add_arguments(parser)",),
        ),
        Edit(
            _TRADES_AWP,
            (
                "train_loader = torch.utils.data.DataLoader(trainset, "
                "batch_size=args.batch_size, shuffle=True, **kwargs)",
            ),
            "insert_after",
            ("train_loader = memloss.tracked(train_loader)",),
        ),
        Edit(
            _TRADES_AWP,
            (
                "    if distance == 'l_inf':",
                "        x_adv = x_natural.detach() + 0.001 * "
                "torch.randn(x_natural.shape).to(device).detach()",
            ),
            "insert_after",
            ("        x_adv = memloss.attack_init(x_natural, x_adv, epsilon)",),
        ),
        Edit(
            _TRADES_AWP,
            ("        loss = loss_natural + args.beta * loss_robust",),
            "insert_after",
            (
                "        loss = loss + memloss.term(model, None, x_natural, target, adv=x_adv, "
                "logits=logits)",
            ),
        ),
        Edit(
            _TRADES_AWP,
            (
                "                       os.path.join(model_dir, "
                "'ours-opt-checkpoint_epoch{}.tar'.format(epoch)))",
            ),
            "insert_after",
            ("            memloss.save(os.path.join(model_dir, 'memory-last.pt'), epoch=epoch)",),
        ),
    ),
    # Each script runs from its own folder, which is where it imports the shim from.
    new_files={
        "AT_AWP/" + SHIM_PATH: _shim("awp", cuda_fallback=True, root=".."),
        "trades_AWP/" + SHIM_PATH: _shim("awp", root=".."),
    },
    scripts={_AT_AWP: (_AT_AWP,), _TRADES_AWP: (_TRADES_AWP,)},
)

PATCHES: dict[str, RepoPatch] = {
    patch.name: patch for patch in (TRADES, MART, HAT, ST, ROBUST_OVERFITTING, AWP)
}
