"""How tests/data/recipe_v1.pt (and recipe_v1_io.pt, its model's outputs) were written: by the
format-1 code of commit 1a4c26c, from the repository root, with PYTHONPATH=tests. Kept for the
record: the files are what tests/test_recipe_steps.py checks old recipes against, and this script
refuses to run on the code after format 1, which would write format 2.
"""

import torch

import gaborprune as gp
import gaborprune.recipe

assert gaborprune.recipe.VERSION == 1, "this script writes the format-1 fixture; it needs the code of commit 1a4c26c"
import gaborprune.train  # noqa: E402
from gaborprune.prune import PruneSpec, prune_model  # noqa: E402
from helpers import kill, randomize_norms  # noqa: E402

torch.manual_seed(0)
model, recipe = gp.load_model("tiny_models:Steps", input_shape=(3, 16, 16))
randomize_norms(model)
gp.convert_model(model, recipe, gp.ConversionSpec(first=1, fit_steps=5))  # the stem becomes a Gabor bank
kill(model.bn0, [0, 1], -1.0)  # relu(-1) = 0: removable
kill(model.bn0, [2, 3], 0.5)  # a constant 0.5 into the 1x1 conv p: folds into p's bias
first = prune_model(model, recipe, PruneSpec(threshold=1e-6))
gp.convert_model(model, recipe, gp.ConversionSpec(targets=("conv2",), fit_steps=5))
kill(model.bn1, list(range(8)), 0.0)  # the branch's inside holds 0: conv1 goes, the Gabor bank conv2 becomes its constant
second = prune_model(model, recipe, PruneSpec(threshold=0.01, scope="all", round_to=1))
recipe.metadata["finetune"] = {"config": gp.train.TrainConfig(epochs=1).to_dict(), "data": "fake:64:4", "epochs_done": 1,
                               "best_accuracy": 25.0, "history": [{"epoch": 1, "test_top1": 25.0}]}  # as finetune wrote it
recipe.metadata["prunes"] = [{"source": "kernels"}, {"source": "scope all"}]  # the CLI's record, abridged
assert first.plan.folds and second.plan.constants, (first.plan.folds, second.plan.constants)
gp.save_recipe("tests/data/recipe_v1.pt", model, recipe, force=True)
torch.manual_seed(1)
x = torch.randn(2, 3, 16, 16)
with torch.no_grad():
    torch.save({"x": x, "y": model.eval()(x)}, "tests/data/recipe_v1_io.pt")
