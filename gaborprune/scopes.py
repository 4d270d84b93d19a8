"""The names of what the sparsity pressure and pruning act on, which the training config, the pressure
and the prune specs all validate against (a leaf without imports, so a config stays light)."""

#: What the sparsity pressure pushes to zero (`gaborprune.sparsity`): channel groups and kernels, or kernels only.
STRUCTURES = ("channel", "kernel")
#: Where it presses channel groups: the Gabor banks, or every convolution (`gaborprune.prune.groups`).
SCOPES = ("banks", "all")
#: How `scope` all ranks channels with a `ratio` (`gaborprune.prune.importance`): the BatchNorm gain,
#: or the first-order loss change of removing each, from labelled training batches.
IMPORTANCES = ("gain", "taylor")
