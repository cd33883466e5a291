"""Clean and L-inf robust accuracy of a classifier: clean, PGD, CW-PGD and AutoAttack.

:func:`evaluate` runs the model in eval mode without parameter gradients and leaves the caller's
state as it found it: every submodule's train/eval flag, every parameter's ``requires_grad``,
and the global random streams (torch CPU and CUDA, Python ``random``, NumPy) are restored, so an
evaluation inside a training loop changes neither later shuffling nor augmentation.

Its arguments are checked once by
:class:`~memloss_addon.experiments.evaluation_settings.EvaluationSettings`, and the accuracies are
counted by :class:`~memloss_addon.experiments.attack_scoring.AttackScorer`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Sized
from typing import Any

from torch import nn

from memloss_addon.experiments.attack_scoring import AttackScorer, split_batch, units_per_batch
from memloss_addon.experiments.attacks import (
    AutoAttackConfig,
    LogitsFn,
    import_torchattacks,
    preserve_rng_state,
)
from memloss_addon.experiments.evaluation_settings import AttackName, EvaluationSettings
from memloss_addon.model_state import frozen_parameters, preserved_training_flags

__all__ = ["evaluate"]


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
        progress: show a tqdm progress bar when tqdm is installed; it advances after each
            attack on each batch (each AutoAttack sub-attack counts), and names the attack
            running. (default: True)

    Returns:
        ``{name: accuracy}`` for each requested name, in the order given; accuracies are
        fractions in [0, 1] over all samples of the loader.

    Raises:
        TypeError: for ``attacks`` given as a string, a setting of the wrong type (e.g. a float
            ``pgd_steps``), or a batch that is not a tuple ``(x, y, ...)`` of tensors.
        ValueError: for an unknown or repeated attack name, a bad ``eps``/step setting, an
            empty loader, or labels that do not match the inputs.
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
    settings = EvaluationSettings(
        eps=eps,
        attacks=attacks,
        pgd_steps=pgd_steps,
        pgd_step_size=pgd_step_size,
        random_start=random_start,
        autoattack=autoattack,
        logits_fn=logits_fn,
        seed=seed,
    )
    if "autoattack" in settings.attacks:
        import_torchattacks()  # fail before any work when the extra is missing
    device = next((p.device for p in model.parameters()), None)
    with preserve_rng_state(), preserved_training_flags(model), frozen_parameters(model):
        model.eval()
        bar = _progress_bar(loader, settings, enabled=progress)
        scorer = AttackScorer(model, settings, on_step=None if bar is None else bar.step)
        try:
            for batch in loader:
                scorer.add(*split_batch(batch, device))
                if bar is not None:
                    bar.show_accuracies(scorer.running_accuracies())
        finally:
            if bar is not None:
                bar.close()
    return scorer.accuracies()


class _AttackBar:
    """A tqdm bar over (batch, attack) units: it moves after each attack of each batch."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def step(self, name: str, finished: bool) -> None:
        if finished:
            self.bar.update(1)
        else:
            self.bar.set_description(f"evaluate: {name}", refresh=True)

    def show_accuracies(self, running: dict[str, float]) -> None:
        self.bar.set_postfix({name: f"{value:.3f}" for name, value in running.items()})

    def close(self) -> None:
        self.bar.close()


def _progress_bar(
    loader: Iterable[Any], settings: EvaluationSettings, *, enabled: bool
) -> _AttackBar | None:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional extra: evaluate without a bar
        return None
    total = len(loader) * units_per_batch(settings) if isinstance(loader, Sized) else None
    return _AttackBar(tqdm(total=total, desc="evaluate", unit="attack", leave=False))
