"""L-inf attacks for evaluation, and guards that keep a caller's state intact around them.

Evaluation runs inside three guards:

- :func:`preserve_rng_state` restores the torch CPU and CUDA generators, Python's ``random`` and
  NumPy's global generator on exit. torchattacks' APGD, APGD-T, FAB and Square call
  ``torch.manual_seed`` on every call, which would otherwise reset the caller's stream (shuffling,
  augmentation, dropout) each time an evaluation runs.
- :func:`memloss_addon.model_state.preserved_training_flags` records every submodule's
  ``training`` flag and puts each one back exactly. torchattacks calls ``model.train()`` after an
  attack, which flips every submodule and wipes per-module freezes (a frozen BatchNorm, a helper
  model kept in eval mode).
- :func:`memloss_addon.model_state.frozen_parameters` switches ``requires_grad`` off for the
  model's parameters, so attacks that call ``backward()`` (torchattacks' FAB does) never write
  into the parameters' ``.grad``.

The attacks themselves are :func:`pgd_linf` (PGD on cross-entropy or on the CW margin loss, run
by the package's one PGD loop, :func:`memloss_addon.objectives.pgd.sign_ascent`) and
:func:`autoattack_linf`, the standard AutoAttack chain built from torchattacks' APGD, APGDT, FAB
and Square with the reference iteration counts (see :class:`AutoAttackConfig`). torchattacks is
an optional extra (``pip install "memloss-addon[attacks]"``), imported only when AutoAttack runs.

All attacks expect inputs in [0, 1]; put any mean/std normalization inside the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_choice, finite_number, positive_int
from ..model_state import frozen_parameters, preserved_training_flags
from ..objectives.pgd import project_linf, sign_ascent

__all__ = [
    "AttackLoss",
    "AutoAttackConfig",
    "AutoAttackResult",
    "LogitsFn",
    "AUTOATTACK_NAMES",
    "autoattack_linf",
    "build_autoattack",
    "cw_margin_loss",
    "import_torchattacks",
    "model_logits",
    "predict_labels",
    "preserve_rng_state",
    "pgd_linf",
    "run_attack_chain",
]

LogitsFn = Callable[[Any], Tensor]
"""Maps a model's raw output (a tensor, tuple or dict) to the logits tensor of shape (N, C)."""

AttackLoss = Literal["ce", "cw"]
ATTACK_LOSSES: tuple[AttackLoss, ...] = get_args(AttackLoss)

_INSTALL_HINT = 'pip install "memloss-addon[attacks]"'


# --------------------------------------------------------------------------------------------
# Guards
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def preserve_rng_state() -> Iterator[None]:
    """Restore every global random number generator to its state at entry.

    Covers the torch CPU generator, the generators of all CUDA devices (when CUDA is available),
    Python's ``random`` module and NumPy's global generator. Code inside the block may reseed or
    draw freely; the caller's stream continues on exit as if the block had never run.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> with preserve_rng_state():
        ...     _ = torch.manual_seed(123)
        ...     _ = torch.rand(5)
        >>> after = torch.rand(1)
        >>> _ = torch.manual_seed(0)
        >>> torch.equal(after, torch.rand(1))
        True
    """
    # Querying the CUDA states initialises CUDA; that is needed anyway, because a
    # torch.cuda.manual_seed issued before initialisation is queued and would be applied later.
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=cuda_devices, device_type="cuda"):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


# --------------------------------------------------------------------------------------------
# Losses and projection
# --------------------------------------------------------------------------------------------


def cw_margin_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample Carlini-Wagner margin ``max_{k != y} z_k - z_y``, computed in fp32.

    Positive exactly when the sample is misclassified (ties aside). PGD on this loss is the
    "CW" attack of the TRADES/MART evaluations (without their clamp at -kappa).

    Args:
        logits: tensor of shape (N, C), C >= 2.
        labels: integer tensor of shape (N,).

    Returns:
        Tensor of shape (N,).

    Example:
        >>> import torch
        >>> cw_margin_loss(torch.tensor([[2.0, 0.5, 1.0]]), torch.tensor([0]))
        tensor([-1.])
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, C) with C >= 2, got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    logits = logits.float()
    true_logit = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return others.amax(dim=1) - true_logit


def model_logits(model: nn.Module, x: Tensor, logits_fn: LogitsFn | None = None) -> Tensor:
    """Return ``logits_fn(model(x))`` (or ``model(x)``), checked to be logits of shape (N, C).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model_logits(nn.Linear(2, 3), torch.zeros(4, 2)).shape
        torch.Size([4, 3])
    """
    return output_logits(model(x), logits_fn)


def output_logits(out: Any, logits_fn: LogitsFn | None = None) -> Tensor:
    """Return ``logits_fn(out)`` (or ``out``), checked to be logits of shape (N, C).

    Example:
        >>> import torch
        >>> output_logits((torch.zeros(4, 3), None), lambda out: out[0]).shape
        torch.Size([4, 3])
    """
    logits = logits_fn(out) if logits_fn is not None else out
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise TypeError(
            "the model output must be logits of shape (N, C); pass logits_fn to extract them "
            f"from a tuple or dict output (got {type(logits).__name__})"
        )
    return logits


# --------------------------------------------------------------------------------------------
# PGD
# --------------------------------------------------------------------------------------------


def pgd_linf(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    loss: AttackLoss = "ce",
    random_start: bool = True,
    generator: torch.Generator | None = None,
    logits_fn: LogitsFn | None = None,
) -> Tensor:
    """L-inf projected gradient ascent (Madry et al.) on cross-entropy or on the CW margin.

    Start: ``x + eps * (2u - 1)`` with ``u ~ U[0, 1)`` drawn by ``torch.rand`` from ``generator``
    (or from the global generator when it is None), clipped to [0, 1]; or ``x`` itself when
    ``random_start`` is False. Each of the ``steps`` steps is
    ``x_adv <- P(x_adv + step_size * sign(grad))`` where P projects onto the eps-ball around
    ``x`` and then onto [0, 1] and ``grad`` is the gradient of the summed per-sample loss (so
    samples do not interact). The last iterate is returned, as in the TRADES and MART
    evaluations. The model is run as given: switch it to eval mode first for evaluation.

    Args:
        model: classifier on inputs in [0, 1].
        x: clean inputs.
        y: integer labels of shape (N,).
        eps: radius of the L-inf ball (> 0).
        step_size: size of each sign step (> 0).
        steps: number of steps (>= 0).
        loss: ``"ce"`` (cross-entropy) or ``"cw"`` (:func:`cw_margin_loss`). (default: "ce")
        random_start: start from a uniform point in the ball. (default: True)
        generator: random generator for the start, on ``x``'s device. (default: None)
        logits_fn: maps the model's output to logits. (default: None, the output itself)

    Returns:
        Detached adversarial examples, same shape as ``x``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> x, y = torch.full((2, 1, 2, 2), 0.5), torch.tensor([0, 1])
        >>> adv = pgd_linf(net, x, y, eps=0.1, step_size=0.05, steps=3)
        >>> bool((adv - x).abs().max() <= 0.1 + 1e-6)
        True
    """
    finite_number("eps", eps, positive=True)
    finite_number("step_size", step_size, positive=True)
    positive_int("steps", steps, minimum=0)
    check_choice("loss", loss, ATTACK_LOSSES)
    x = x.detach()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        start = (x + eps * (2 * noise - 1)).clamp(0.0, 1.0)
    else:
        start = x.clone()

    def objective(out: Any) -> Tensor:
        logits = output_logits(out, logits_fn).float()
        if loss == "ce":
            return F.cross_entropy(logits, y, reduction="sum")
        return cw_margin_loss(logits, y).sum()

    return sign_ascent(model, x, start, objective, eps=eps, step_size=step_size, steps=steps)


# --------------------------------------------------------------------------------------------
# AutoAttack
# --------------------------------------------------------------------------------------------


def import_torchattacks() -> Any:
    """Import torchattacks, or raise ImportError saying how to install it."""
    try:
        import torchattacks
    except ImportError as err:
        raise ImportError(
            "AutoAttack evaluation needs torchattacks, an optional dependency; install it with "
            f"`{_INSTALL_HINT}`"
        ) from err
    return torchattacks


@dataclasses.dataclass(frozen=True)
class AutoAttackConfig:
    """Iteration counts of the standard L-inf AutoAttack chain (Croce and Hein, ICML 2020).

    The defaults are the reference implementation's ``version="standard"``: APGD-CE with 100
    iterations, APGD-T (targeted DLR loss) with 100 iterations on each of ``n_classes - 1`` target
    classes, FAB-T with 100 iterations on each of ``n_classes - 1`` targets, and Square with 5000
    queries (p_init 0.8); one restart each. torchattacks' own ``AutoAttack`` keeps 10 iterations
    for APGD and FAB and is weaker; this chain passes the counts explicitly.

    Args:
        apgd_steps: iterations of APGD-CE. (default: 100)
        apgdt_steps: iterations of APGD-T per target class. (default: 100)
        fab_steps: iterations of FAB-T per target class. (default: 100)
        square_queries: query budget of Square. (default: 5000)
        n_target_classes: target classes tried by APGD-T and FAB-T; None means
            ``n_classes - 1``, the reference's 9 on 10 classes. (default: None)

    Example:
        >>> AutoAttackConfig().apgd_steps, AutoAttackConfig.fast().square_queries
        (100, 100)
    """

    apgd_steps: int = 100
    apgdt_steps: int = 100
    fab_steps: int = 100
    square_queries: int = 5000
    n_target_classes: int | None = None

    def __post_init__(self) -> None:
        for field in ("apgd_steps", "apgdt_steps", "fab_steps", "square_queries"):
            positive_int(field, getattr(self, field))
        if self.n_target_classes is not None:
            positive_int("n_target_classes", self.n_target_classes)

    @classmethod
    def fast(cls) -> AutoAttackConfig:
        """A much cheaper chain for smoke tests and CI: 10 iterations, 3 targets, 100 queries.

        Its numbers are not comparable with published AutoAttack accuracies.
        """
        return cls(
            apgd_steps=10, apgdt_steps=10, fab_steps=10, square_queries=100, n_target_classes=3
        )

    def targets(self, n_classes: int) -> int:
        """Number of target classes used on a model with ``n_classes`` outputs."""
        if self.n_target_classes is None:
            return n_classes - 1
        if self.n_target_classes > n_classes - 1:
            raise ValueError(
                f"n_target_classes={self.n_target_classes} exceeds n_classes - 1 = {n_classes - 1}"
            )
        return self.n_target_classes


class _LogitsModel(nn.Module):
    """Presents ``logits_fn(model(x))`` as a plain module, the interface torchattacks expects."""

    def __init__(self, model: nn.Module, logits_fn: LogitsFn | None) -> None:
        super().__init__()
        self.model = model
        self.logits_fn = logits_fn
        if next(model.parameters(), None) is None:
            # torchattacks reads its device from the first parameter.
            self.device_anchor = nn.Parameter(torch.empty(0), requires_grad=False)
        self.training = False

    def train(self, mode: bool = True) -> _LogitsModel:
        # torchattacks calls eval() before and train() after every attack, which would flip every
        # submodule of the wrapped model; its modes stay with the caller.
        self.training = mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        return model_logits(self.model, x, self.logits_fn)


@dataclasses.dataclass
class AutoAttackResult:
    """Outcome of an attack chain on one batch.

    Attributes:
        robust: bool tensor (N,): classified correctly on the clean input and on every attack's
            output.
        adv: the successful adversarial example for non-robust samples that the chain fooled,
            the clean input otherwise.
        remaining: number of robust samples after the clean check and after each attack, in
            order (length ``1 + len(attacks)``).
    """

    robust: Tensor
    adv: Tensor
    remaining: list[int]


@torch.no_grad()
def predict_labels(model: nn.Module, x: Tensor, logits_fn: LogitsFn | None = None) -> Tensor:
    """Return the predicted class of each input, computed without gradients.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> predict_labels(nn.Identity(), torch.tensor([[0.0, 2.0, 1.0]]))
        tensor([1])
    """
    return model_logits(model, x, logits_fn).argmax(dim=1)


def run_attack_chain(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: Sequence[Callable[[Tensor, Tensor], Tensor]],
    *,
    eps: float,
    logits_fn: LogitsFn | None = None,
) -> AutoAttackResult:
    """Run attacks in sequence, each on the samples that are still classified correctly.

    A sample counts as robust only if the model classifies it correctly on the clean input and
    on the output of every attack: the per-sample worst case over the chain. Each attack's output
    is projected onto the eps-ball around ``x`` intersected with [0, 1] before it is judged, so an
    attack can never be credited with a point outside the threat model.

    Args:
        model: classifier, already in the mode to evaluate in.
        x: clean inputs in [0, 1].
        y: integer labels (N,).
        attacks: callables ``(x_subset, y_subset) -> adv_subset``.
        eps: radius of the L-inf ball.
        logits_fn: maps the model's output to logits. (default: None)

    Returns:
        An :class:`AutoAttackResult`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(2, 2))
        >>> x, y = torch.rand(4, 1, 1, 2), torch.tensor([0, 1, 0, 1])
        >>> result = run_attack_chain(net, x, y, [lambda a, b: a], eps=0.1)
        >>> torch.equal(result.robust, net(x).argmax(1) == y)
        True
    """
    finite_number("eps", eps, positive=True)
    robust = predict_labels(model, x, logits_fn) == y
    adv = x.detach().clone()
    remaining = [int(robust.sum())]
    for attack in attacks:
        index = robust.nonzero().squeeze(1)
        if index.numel() > 0:
            x_sub = x[index]
            adv_sub = project_linf(attack(x_sub, y[index]).detach().to(x.dtype), x_sub, eps)
            fooled = predict_labels(model, adv_sub, logits_fn) != y[index]
            adv[index[fooled]] = adv_sub[fooled]
            robust[index[fooled]] = False
        remaining.append(int(robust.sum()))
    return AutoAttackResult(robust=robust, adv=adv, remaining=remaining)


AUTOATTACK_NAMES = ("apgd-ce", "apgd-t", "fab-t", "square")


def build_autoattack(
    model: nn.Module,
    *,
    eps: float,
    n_classes: int,
    config: AutoAttackConfig | None = None,
    seed: int = 0,
    logits_fn: LogitsFn | None = None,
    device: torch.device | str | None = None,
) -> list[tuple[str, Callable[[Tensor, Tensor], Tensor]]]:
    """Build the standard AutoAttack chain (APGD-CE, APGD-T, FAB-T, Square) from torchattacks.

    Args:
        model: classifier on inputs of shape (N, C, H, W) in [0, 1].
        eps: L-inf radius.
        n_classes: number of model outputs (>= 4: the targeted DLR loss reads the 4th logit).
        config: iteration counts. (default: None, the reference's :class:`AutoAttackConfig`)
        seed: seed each sub-attack sets before it runs (it reseeds the global generator:
            run it inside :func:`preserve_rng_state`). (default: 0)
        logits_fn: maps the model's output to logits. (default: None)
        device: device of the inputs. (default: None, the device of the model's first
            parameter, which is how torchattacks chooses it)

    Returns:
        ``[(name, attack), ...]`` in chain order, each attack a callable ``(x, y) -> adv``.
        The attacks run the model in whatever mode it is in (they never switch it): put it in
        eval mode first, as :func:`autoattack_linf` and ``evaluate`` do.
    """
    finite_number("eps", eps, positive=True)
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 4:
        raise ValueError(
            f"AutoAttack needs a classifier with at least 4 classes (APGD-T's targeted DLR "
            f"loss), got n_classes={n_classes!r}"
        )
    config = config if config is not None else AutoAttackConfig()
    targets = config.targets(n_classes)
    ta = import_torchattacks()
    net = _LogitsModel(model, logits_fn)
    common = {"norm": "Linf", "eps": eps, "seed": seed, "verbose": False, "n_restarts": 1}
    # torchattacks' APGDT and FAB try n_classes - 1 targets: pass targets + 1 to get `targets`.
    chain = [
        ("apgd-ce", ta.APGD(net, steps=config.apgd_steps, loss="ce", **common)),
        ("apgd-t", ta.APGDT(net, steps=config.apgdt_steps, n_classes=targets + 1, **common)),
        (
            "fab-t",
            ta.FAB(
                net, steps=config.fab_steps, multi_targeted=True, n_classes=targets + 1, **common
            ),
        ),
        (
            "square",
            ta.Square(net, n_queries=config.square_queries, p_init=0.8, loss="margin", **common),
        ),
    ]
    if device is not None:
        for _, attack in chain:
            attack.set_device(torch.device(device))
    return chain


def autoattack_linf(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    config: AutoAttackConfig | None = None,
    seed: int = 0,
    logits_fn: LogitsFn | None = None,
) -> AutoAttackResult:
    """Standard L-inf AutoAttack on one batch, as the worst case per sample over its chain.

    Runs, in order, APGD-CE, APGD-T, FAB-T and Square (counts from ``config``; the reference
    defaults are 100, 100 x (n_classes - 1) targets, 100 x (n_classes - 1) targets, 5000 queries),
    each on the samples still classified correctly (:func:`run_attack_chain`). The model runs in
    eval mode without parameter gradients; its module flags, parameter flags and the global RNG
    streams are restored afterwards. ``n_classes`` is read from the model's output.

    Args:
        model: classifier on inputs of shape (N, C, H, W) in [0, 1], with at least 4 classes.
        x: clean inputs.
        y: integer labels (N,).
        eps: L-inf radius.
        config: iteration counts. (default: None, the reference's counts)
        seed: seed of the sub-attacks' random starts. (default: 0)
        logits_fn: maps the model's output to logits. (default: None)

    Returns:
        An :class:`AutoAttackResult`; ``result.robust.float().mean()`` is the robust accuracy.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 4))
        >>> x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 2])
        >>> result = autoattack_linf(net, x, y, eps=0.03, config=AutoAttackConfig.fast())
        >>> len(result.remaining), result.robust.dtype
        (5, torch.bool)
    """
    if x.dim() != 4:
        raise ValueError(
            f"AutoAttack expects image batches of shape (N, C, H, W), got {tuple(x.shape)}"
        )
    with preserve_rng_state(), preserved_training_flags(model), frozen_parameters(model):
        model.eval()
        with torch.no_grad():
            n_classes = model_logits(model, x[:1], logits_fn).shape[1]
        chain = build_autoattack(
            model,
            eps=eps,
            n_classes=n_classes,
            config=config,
            seed=seed,
            logits_fn=logits_fn,
            device=x.device,
        )
        return run_attack_chain(
            model, x, y, [attack for _, attack in chain], eps=eps, logits_fn=logits_fn
        )
