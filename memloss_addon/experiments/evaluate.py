"""Clean and L-inf robust accuracy of a classifier: clean, PGD, CW-PGD and AutoAttack.

:func:`evaluate` runs the model in eval mode without parameter gradients and leaves the caller's
state as it found it: every submodule's train/eval flag, every parameter's ``requires_grad``,
and the global random streams (torch CPU and CUDA, Python ``random``, NumPy) are restored, so an
evaluation inside a training loop changes neither later shuffling nor augmentation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from memloss_addon.experiments.attacks import (
    AUTOATTACK_NAMES,
    AutoAttackConfig,
    LogitsFn,
    build_autoattack,
    import_torchattacks,
    model_logits,
    pgd_linf,
    predict_labels,
    preserve_rng_state,
    run_attack_chain,
)
from memloss_addon.model_state import frozen_parameters, preserved_training_flags

__all__ = ["AttackName", "evaluate"]

AttackName = Literal["clean", "pgd", "cw", "autoattack"]

logger = logging.getLogger(__name__)


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    eps: float,
    attacks: Sequence[AttackName] = ("clean", "pgd", "cw"),
    pgd_steps: int = 20,
    pgd_step_size: float | None = None,
    random_start: bool = True,
    autoattack: AutoAttackConfig | None = None,
    logits_fn: LogitsFn | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Accuracy of ``model`` on ``loader``, clean and under L-inf attacks of radius ``eps``.

    What runs for each name in ``attacks``:

    - ``"clean"``: accuracy on the inputs as given.
    - ``"pgd"``: PGD on cross-entropy (:func:`~memloss_addon.experiments.attacks.pgd_linf`),
      ``pgd_steps`` steps (default 20) of size ``pgd_step_size``, uniform random start; the
      last iterate is judged, as in the TRADES and MART evaluations. The default step size is
      ``2.5 * eps / pgd_steps`` (the usual rule since Madry et al.; 1/255 for eps = 8/255 and 20
      steps), which keeps short attacks able to cross the ball. The TRADES evaluation uses 0.003
      (about eps/10): pass ``pgd_step_size=0.003`` to match it.
    - ``"cw"``: the same PGD on the Carlini-Wagner margin ``max_{k != y} z_k - z_y``.
    - ``"autoattack"``: the standard L-inf AutoAttack chain built from torchattacks: APGD-CE
      (100 iterations), APGD-T (100 iterations on each of n_classes - 1 targets), FAB-T (100
      iterations on each of n_classes - 1 targets), Square (5000 queries), one restart each;
      each attack only sees the samples still classified correctly, so a sample counts as robust
      only if it is classified correctly clean and after every attack. ``autoattack`` changes the
      counts (for example :meth:`AutoAttackConfig.fast` for smoke tests; such numbers are not
      comparable with published ones). Needs ``pip install "memloss-addon[attacks]"`` and a
      model with at least 4 classes on (N, C, H, W) inputs. The sub-attacks are torchattacks'
      ports of the reference code; for leaderboard submissions use the official ``autoattack``
      package.

    The number of classes is read from the model's output. Batches go to the device of the
    model's parameters (or stay where they are for a model without parameters). Inputs must be
    in [0, 1]: put normalization inside the model.

    Randomness: PGD draws its starts from a ``torch.Generator`` seeded with ``seed``, CW-PGD from
    one seeded with ``seed + 1``, both on the batch's device and consumed batch after batch; the
    AutoAttack sub-attacks seed the global generator with ``seed`` on every call (inside a
    guard that restores it). Results are therefore reproducible for a fixed loader order.

    Args:
        model: classifier mapping inputs in [0, 1] to logits (or to an output ``logits_fn``
            reads them from).
        loader: iterable of batches ``(x, y)`` or ``(x, y, ...)``, e.g. a DataLoader over an
            ``IndexedDataset``.
        eps: L-inf radius (> 0), e.g. 8/255.
        attacks: which accuracies to compute, any of "clean", "pgd", "cw", "autoattack".
            AutoAttack is opt-in because it needs the optional torchattacks and is slow.
            (default: ("clean", "pgd", "cw"))
        pgd_steps: steps of PGD and CW-PGD. (default: 20)
        pgd_step_size: their step size. (default: None, meaning ``2.5 * eps / pgd_steps``)
        random_start: start PGD and CW-PGD from a uniform point in the ball. (default: True)
        autoattack: AutoAttack iteration counts. (default: None, the reference's counts)
        logits_fn: maps the model's output (tuple, dict, ...) to logits. (default: None)
        seed: seed of all attack randomness. (default: 0)
        progress: show a tqdm progress bar over batches when tqdm is installed. (default: True)

    Returns:
        ``{name: accuracy}`` for each requested name, in the order given; accuracies are
        fractions in [0, 1] over all samples of the loader.

    Raises:
        ValueError: for an unknown or repeated attack name, a bad ``eps``/step setting, or an
            empty loader.
        ImportError: for ``"autoattack"`` when torchattacks is not installed.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> batches = [(torch.rand(8, 1, 2, 2), torch.randint(0, 3, (8,)))]
        >>> acc = evaluate(net, batches, eps=8 / 255, progress=False)
        >>> sorted(acc), all(0.0 <= v <= 1.0 for v in acc.values())
        (['clean', 'cw', 'pgd'], True)
    """
    names = _check_attacks(attacks)
    if not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if isinstance(pgd_steps, bool) or not isinstance(pgd_steps, int) or pgd_steps < 1:
        raise ValueError(f"pgd_steps must be a positive int, got {pgd_steps!r}")
    step_size = 2.5 * eps / pgd_steps if pgd_step_size is None else pgd_step_size
    if not isinstance(step_size, (int, float)) or not step_size > 0:
        raise ValueError(f"pgd_step_size must be a positive number, got {pgd_step_size!r}")
    if "autoattack" in names:
        import_torchattacks()  # fail before any work when the extra is missing
    device = next((p.device for p in model.parameters()), None)

    correct = dict.fromkeys(names, 0)
    total = 0
    chain = None
    generators: dict[str, torch.Generator] = {}
    with preserve_rng_state(), preserved_training_flags(model), frozen_parameters(model):
        model.eval()
        bar = _progress_bar(loader, enabled=progress)
        for batch in bar:
            x, y = _split_batch(batch, device)
            if not generators:
                generators = {
                    "pgd": torch.Generator(device=x.device).manual_seed(seed),
                    "cw": torch.Generator(device=x.device).manual_seed(seed + 1),
                }
            with torch.no_grad():
                logits = model_logits(model, x, logits_fn)
            if "clean" in correct:
                correct["clean"] += int((logits.argmax(dim=1) == y).sum())
            for loss in ("pgd", "cw"):
                if loss in correct:
                    adv = pgd_linf(
                        model,
                        x,
                        y,
                        eps=eps,
                        step_size=step_size,
                        steps=pgd_steps,
                        loss="ce" if loss == "pgd" else "cw",
                        random_start=random_start,
                        generator=generators[loss],
                        logits_fn=logits_fn,
                    )
                    correct[loss] += int((predict_labels(model, adv, logits_fn) == y).sum())
            if "autoattack" in correct:
                if x.dim() != 4:
                    raise ValueError(
                        "AutoAttack expects image batches of shape (N, C, H, W), got "
                        f"{tuple(x.shape)}"
                    )
                if chain is None:
                    chain = build_autoattack(
                        model,
                        eps=eps,
                        n_classes=logits.shape[1],
                        config=autoattack,
                        seed=seed,
                        logits_fn=logits_fn,
                        device=x.device,
                    )
                result = run_attack_chain(
                    model, x, y, [attack for _, attack in chain], eps=eps, logits_fn=logits_fn
                )
                correct["autoattack"] += int(result.robust.sum())
                logger.debug(
                    "AutoAttack robust counts after clean, %s: %s",
                    ", ".join(AUTOATTACK_NAMES),
                    result.remaining,
                )
            total += y.shape[0]
            if hasattr(bar, "set_postfix"):
                bar.set_postfix({name: f"{count / total:.3f}" for name, count in correct.items()})
    if total == 0:
        raise ValueError("loader yielded no samples")
    return {name: count / total for name, count in correct.items()}


def _check_attacks(attacks: Sequence[str]) -> list[str]:
    if isinstance(attacks, str):
        raise TypeError(f"attacks must be a sequence of names, not the string {attacks!r}")
    names = list(attacks)
    allowed = get_args(AttackName)
    for name in names:
        if name not in allowed:
            raise ValueError(f"unknown attack {name!r}; choose from {allowed}")
    if not names:
        raise ValueError("attacks must name at least one of " + ", ".join(allowed))
    if len(set(names)) != len(names):
        raise ValueError(f"attacks contains a repeated name: {names!r}")
    return names


def _split_batch(batch: Any, device: torch.device | None) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(
            f"each batch must be a tuple (x, y) or (x, y, ...), got {type(batch).__name__}"
        )
    x, y = batch[0], batch[1]
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(
            f"batch inputs and labels must be tensors, got {type(x).__name__} and "
            f"{type(y).__name__}"
        )
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if device is not None:
        x, y = x.to(device), y.to(device)
    return x, y.long()


def _progress_bar(loader: Iterable[Any], *, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return loader
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional extra: evaluate without a bar
        return loader
    total = len(loader) if hasattr(loader, "__len__") else None
    return tqdm(loader, total=total, desc="evaluate", leave=False)
