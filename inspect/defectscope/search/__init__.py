"""``defectscope search``: multi-objective architecture search (validation metric against measured
line-PC latency) on Optuna, over the same Hydra configs and the same ``train()`` as ``defectscope train``.

* :mod:`.space` reads ``search.space`` (ranges, choices, log scales written in YAML) and checks it;
* :mod:`.preflight` runs every check that can fail before the first trial (registry, storage, budgets);
* :mod:`.measure` exports a model and measures its latency through the runtime;
* :mod:`.trial` is one trial: sample, train, export, measure, log;
* :mod:`.stopping` is the early stopping that Optuna's pruners cannot do for two objectives;
* :mod:`.study` opens the study (storage, sampler, seeds, MLflow parent run) and runs it;
* :mod:`.report` writes ``pareto.csv``, the front plot and the one-line commands.
"""
