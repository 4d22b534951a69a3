"""qvlquant: GPTQ / AWQ / RTN quantization of Qwen vision-language models."""

from qvlquant.version import __version__  # noqa: F401

# The entry points import their modules when first called: ``import qvlquant`` stays light (no torch, no
# transformers), and the modules they load never import this package's namespace back.


def load(path="demo", **kwargs):
    """Load a BF16 or quantized checkpoint folder (or 'demo'). -> (model, processor). See qvlquant.runtime.load.load."""
    from qvlquant.runtime.load import load as _load

    return _load(path, **kwargs)


def quantize(config=None, **settings):
    """Quantize a model and export it: a qvlquant.config.JobConfig, or flat settings named like the CLI flags
    (``qvlquant.quantize(output="out/q", method="awq")``). -> the report. See qvlquant.api.quantize."""
    from qvlquant.api import quantize as _quantize

    return _quantize(config, **settings)


def evaluate(model="demo", base=None, **settings):
    """Accuracy and held-out perplexity of a checkpoint, beside ``base`` (default: the base recorded at quantization;
    'none' to skip). ``settings``: the fields of qvlquant.evaluation.EvalConfig (task, data, limit, ...).
    -> EvalResult (summary, predictions). See qvlquant.evaluation.evaluate_with_baseline."""
    from qvlquant.evaluation import EvalConfig, evaluate_with_baseline

    return evaluate_with_baseline(model, EvalConfig(**settings), base=base)


def check(report, baseline=None, recipe=None, max_drop=None, max_ppl_increase=None):
    """The CI gate: an eval report (dict or JSON path) against its baseline (default: the one embedded in it), under
    the recipe's check: tolerances with ``max_drop`` ({task: points}) and ``max_ppl_increase`` (percent) winning.
    -> CheckResult (.passed, .failed, .rows, .warnings); bad input (a ``max_drop`` task the report lacks
    included) raises ValueError. See qvlquant.eval.check.check."""
    from qvlquant.eval.check import check as _check
    from qvlquant.recipes import check_tolerances

    return _check(report, baseline, check_tolerances(recipe, max_drop, max_ppl_increase), named=max_drop or ())
