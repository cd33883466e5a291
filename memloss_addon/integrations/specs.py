"""The integration patches: small anchored edits to four public adversarial-training repositories.

Each :class:`RepoPatch` lists the files that identify the repository, a few :class:`Edit` s (find
an exact anchor line, then insert after/before it or replace it) and one new file of ours,
``memloss_shim.py``, which creates the :class:`~memloss_addon.integrations.hook.TrainingHook` the
edited lines call. Anchors are the only upstream text carried here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["PATCHES", "Edit", "RepoPatch", "SHIM_PATH"]

SHIM_PATH = "memloss_shim.py"

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

    Example:
        >>> PATCHES["trades"].changed_lines <= 15
        True
    """

    name: str
    repository: str
    commit: str
    required_files: tuple[str, ...]
    edits: tuple[Edit, ...]
    new_files: dict[str, str] = field(default_factory=dict)

    @property
    def changed_lines(self) -> int:
        """Upstream lines added plus removed by all edits (new files of ours do not count)."""
        return sum(edit.changed_lines for edit in self.edits)

    @property
    def edited_files(self) -> tuple[str, ...]:
        """The upstream files the edits touch, in first-touch order."""
        return tuple(dict.fromkeys(edit.path for edit in self.edits))


def _shim(name: str, *, cuda_fallback: bool = False) -> str:
    lines = [
        f'"""MemLoss hook for this repository (added by `memloss patch {name}`; removed by',
        f'`memloss patch {name} . --revert`)."""',
        "",
    ]
    if cuda_fallback:
        lines += [
            "from memloss_addon.integrations.hook import TrainingHook, keep_cuda_calls_on_cpu",
            "",
            "# The loss calls .cuda() in several places; on a machine without CUDA they keep",
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


def _pgd_loop_patch(
    *,
    name: str,
    repository: str,
    commit: str,
    script: str,
    loss_file: str,
    loss_import: str,
    script_import: str,
    loss_line: str,
    extra_loss_edits: tuple[Edit, ...],
    save_anchor: str,
) -> RepoPatch:
    """TRADES and MART share the layout of Yaodong Yu's training script."""
    loop = "    for batch_idx, (data, target) in enumerate(train_loader):"
    return RepoPatch(
        name=name,
        repository=repository,
        commit=commit,
        required_files=(script, loss_file),
        edits=(
            Edit(script, (script_import,), "insert_after", (_IMPORT,)),
            Edit(
                script,
                ("args = parser.parse_args()",),
                "insert_before",
                ("memloss.add_arguments(parser)",),
            ),
            Edit(
                script,
                (loop,),
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
                (
                    "            memloss.save(os.path.join(model_dir, 'memory-last.pt'), "
                    "epoch=epoch)",
                ),
            ),
            Edit(loss_file, (loss_import,), "insert_after", (_IMPORT,)),
            Edit(
                loss_file,
                ("    x_adv = x_natural.detach() + 0.001 * " + _RANDN_CUDA,),
                "replace",
                ("    x_adv = x_natural.detach() + 0.001 * " + _RANDN_HERE,),
            ),
            *extra_loss_edits,
            Edit(loss_file, (loss_line,), "insert_after", ("    memloss.record(x_adv, logits)",)),
        ),
        new_files={SHIM_PATH: _shim(name)},
    )


TRADES = _pgd_loop_patch(
    name="trades",
    repository="yaodongyu/TRADES",
    commit="6e8e11b7c281371c2f027ffadfbaea80361f09de",
    script="train_trades_cifar10.py",
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
    script="train_wideresnet.py",
    loss_file="mart.py",
    loss_import="from torch.autograd import Variable",
    script_import="from mart import mart_loss",
    loss_line="    loss = loss_adv + float(beta) * loss_robust",
    extra_loss_edits=(),
    save_anchor="                       os.path.join(model_dir, "
    "'opt-res-checkpoint_epoch{}.tar'.format(epoch)))",
)

HAT = RepoPatch(
    name="hat",
    repository="imrahulr/hat",
    commit="3177a4f827480e97ac8ea4c5c6acab197cf97e66",
    required_files=("train.py", "core/utils/train.py", "core/utils/hat.py"),
    edits=(
        Edit("train.py", ("from core import setup",), "insert_after", (_IMPORT,)),
        Edit(
            "train.py",
            ("parse = parser_train()",),
            "insert_after",
            ("memloss.add_arguments(parse)",),
        ),
        Edit(
            "train.py",
            ("    trainer.save_model(os.path.join(LOG_DIR, 'weights-last.pt'))",),
            "insert_after",
            ("    memloss.save(os.path.join(LOG_DIR, 'memory-last.pt'), epoch=epoch)",),
        ),
        Edit("core/utils/train.py", ("from .utils import seed",), "insert_after", (_IMPORT,)),
        Edit(
            "core/utils/train.py",
            (
                "        for data in tqdm(dataloader, desc='Epoch {}: '.format(epoch), "
                "disable=not verbose):",
            ),
            "replace",
            (
                "        for data in tqdm(memloss.indexed(dataloader), "
                "desc='Epoch {}: '.format(epoch), disable=not verbose):",
            ),
        ),
        Edit(
            "core/utils/train.py",
            ("            x, y = data",),
            "replace",
            ("            x, y, idx = data",),
        ),
        Edit(
            "core/utils/train.py",
            (
                "                    loss, batch_metrics = self.hat_loss(x, y, h=self.params.h, "
                "beta=self.params.beta, gamma=self.params.gamma)",
            ),
            "insert_after",
            (
                "                    loss = loss + memloss.term(self.model, idx, x, y, "
                "metrics=batch_metrics)",
            ),
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
            "replace",
            ("    x_adv = x.detach() + 0.001 * torch.randn(x.shape).to(x.device).detach()",),
        ),
        # hat_loss and at_hat_loss end with the same line; both record.
        Edit(
            "core/utils/hat.py",
            ("    loss = loss_clean + beta * loss_adv + gamma * loss_help",),
            "insert_after",
            ("    memloss.record(x_adv, out_clean)",),
            count=2,
        ),
    ),
    new_files={SHIM_PATH: _shim("hat")},
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
            ("    loss = loss_natural + beta * loss_robust",),
            "insert_after",
            ("    memloss.record(x_adv, nat_logit)",),
        ),
    ),
    new_files={SHIM_PATH: _shim("st", cuda_fallback=True)},
)

PATCHES: dict[str, RepoPatch] = {patch.name: patch for patch in (TRADES, MART, HAT, ST)}
