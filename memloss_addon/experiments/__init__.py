"""The experiments: train, compare and evaluate base objectives with and without MemLoss.

Everything needed to run MemLoss without a training codebase of one's own: datasets (scikit-learn's
bundled digits, local CIFAR/SVHN, synthetic CIFAR-shaped data), small models, the training loop
with checkpoints, the seed-paired comparison, PGD and AutoAttack evaluation, the patch tool for
reference repositories, and the ``memloss`` command. It uses the optional extras
(``pip install "memloss-addon[attacks,examples]"``); the add-on itself never imports it.
"""
