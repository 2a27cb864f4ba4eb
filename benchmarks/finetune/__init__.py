"""The fine-tuning quality benchmark behind ``benchmarks/quality.py``, by concern.

* :mod:`.training`: the optimizer, schedule, training loop and evaluation.
* :mod:`.tasks`: the two tasks (data, model, loss, metric) and their pre-trainings.
* :mod:`.methods`: the compared fine-tuning methods and how each is built.
* :mod:`.diagnostics`: what 1LoRA's ``x.sum(-1)`` looks like at the adapted layers.
* :mod:`.protocol`: the learning-rate sweep, seeds, memory estimate, deployment check.
* :mod:`.verdict`: rankings and the statements drawn from them.
* :mod:`.report`: tables, the plot and the JSON file.
"""
