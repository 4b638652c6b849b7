"""The search space and the search's checks: YAML -> Optuna distributions, the model-registry check,
overrides that reproduce a trial, the early-stopping rule, latency from real exports, and each bad
input's one-line error through the real `defectscope search` entry point."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from omegaconf import OmegaConf

from defectscope.search.errors import SearchConfigError
from defectscope.search.space import check_keys, out_of_space, parse_space, seed_values, suggest


def _space(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg.search.space, resolve=True)


def test_default_space_passes_every_check(compose_train: Callable[..., Any]) -> None:
    from defectscope.search.preflight import check_choices
    from defectscope.search.settings import SearchSettings

    cfg = compose_train(["experiment=synthetic", "paths.launch_dir=."], config_name="search")
    settings = SearchSettings.from_config(OmegaConf.to_container(cfg.search, resolve=True))
    params = parse_space(_space(cfg))
    names = {p.name for p in params}
    assert {
        "model.widths[3]",
        "model.depths[0]",
        "model.kernels[2]",
        "model.stem_pool",
        "model.norm",
    } <= names
    assert {
        "data.loader.max_side",
        "data.batch_size",
        "optim.optimizer.lr",
        "optim.optimizer.weight_decay",
    } <= names
    lr = next(p for p in params if p.name == "optim.optimizer.lr").distribution
    assert isinstance(lr, optuna.distributions.FloatDistribution) and lr.log
    check_keys(params, cfg)
    check_choices(cfg, params)
    # the experiment's own model (resnet_small) lies inside the default space, so the study is seeded with it
    assert out_of_space(params, seed_values(cfg, params)) == []
    assert settings.objectives == ["val/bal_acc", "latency_ms"] and settings.sampler == "tpe"


@pytest.mark.parametrize(
    ("option", "base"),
    [("smoke", ["experiment=smoke", "model=resnet_small"]), ("elpv_proxy", ["experiment=elpv_scratch"])],
)
def test_every_search_option_passes_its_checks(
    option: str, base: list[str], compose_train: Callable[..., Any]
) -> None:
    from defectscope.search.preflight import check_choices
    from defectscope.search.settings import SearchSettings

    cfg = compose_train([*base, f"search={option}", "paths.launch_dir=."], config_name="search")
    SearchSettings.from_config(OmegaConf.to_container(cfg.search, resolve=True))
    params = parse_space(_space(cfg))
    check_keys(params, cfg)
    check_choices(cfg, params)


def test_sampled_values_round_trip_through_overrides(compose_train: Callable[..., Any]) -> None:
    """A trial's parameters, written as the retrain command's overrides, compose the same config."""
    from defectscope.search.report import param_overrides

    cfg = compose_train(["experiment=synthetic", "paths.launch_dir=."], config_name="search")
    params = parse_space(_space(cfg))
    study = optuna.create_study(
        directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=3)
    )
    for _ in range(3):
        values = suggest(study.ask(), params)
        again = compose_train(["experiment=synthetic", *param_overrides(cfg, params, values)])
        for name, value in values.items():
            assert OmegaConf.select(again, name) == value, name


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"optim": {"optimizer": {"lr": {"low": 0.1, "high": 0.01}}}}, "inverted range"),
        ({"model": {"stem_width": {"low": 8, "high": 8}}}, "empty range"),
        ({"model": {"act": {"choices": []}}}, "non-empty list"),
        ({"model": {"act": {"choices": [["relu"]]}}}, "must be scalars"),
        ({"optim": {"optimizer": {"lr": {"low": 0.0, "high": 0.1, "log": True}}}}, "log: true needs low > 0"),
        ({"model": {"act": {"choices": ["relu"], "default": "relu"}}}, "unknown field(s) default"),
        ({"model": {"widths": [{"low": 8, "high": 16, "step": 3}]}}, "not a multiple of step"),
    ],
)
def test_bad_specs_name_the_key(space: dict[str, Any], message: str) -> None:
    with pytest.raises(SearchConfigError, match=r"^search\.space\.") as err:
        parse_space(space)
    assert message in str(err.value)


def test_unknown_key_outside_the_model(compose_train: Callable[..., Any]) -> None:
    cfg = compose_train(["paths.launch_dir=."], config_name="search")
    params = parse_space({"optim": {"optimizer": {"momentumm": {"low": 0.1, "high": 0.9}}}})
    with pytest.raises(
        SearchConfigError, match=r"search\.space\.optim\.optimizer\.momentumm: unknown parameter"
    ) as err:
        check_keys(params, cfg)
    assert "lr" in str(err.value)  # lists the keys that do exist there


def test_blur_goes_through_the_model_registry(compose_train: Callable[..., Any]) -> None:
    """`model.blur` is one more entry of the space; whether it is valid is the model registry's call."""
    from defectscope.models.registry import accepted_kwargs
    from defectscope.search.preflight import check_choices

    cfg = compose_train(["paths.launch_dir=."], config_name="search")
    params = parse_space({"model": {"blur": {"choices": [0, 3]}}})
    if "blur" in accepted_kwargs("resnet"):
        check_choices(cfg, params)
    else:
        with pytest.raises(SearchConfigError, match=r"model registry: model 'resnet': unknown kwarg.*'blur'"):
            check_choices(cfg, params)


def test_stopping_rule_needs_a_faster_and_better_finished_trial() -> None:
    from defectscope.search.stopping import dominated_by

    peers = [(2.0, [[1, 0.5], [2, 0.8], [3, 0.9]]), (0.5, [[1, 0.4], [2, 0.6]])]
    rule = {"maximize": True, "min_delta": 0.0}
    assert dominated_by(3.0, 0.7, 2, peers, **rule) == (2.0, 0.8)  # slower and worse than trial A at epoch 2
    assert dominated_by(1.0, 0.7, 2, peers, **rule) is None  # faster than A; better than the faster B
    assert dominated_by(1.0, 0.55, 2, peers, **rule) == (0.5, 0.6)
    assert (
        dominated_by(3.0, 0.7, 3, [(0.5, [[1, 0.4], [2, 0.99]])], **rule) is None
    )  # B never reached epoch 3
    assert dominated_by(3.0, 0.75, 2, peers, maximize=True, min_delta=0.1) is None  # within min_delta


@pytest.mark.slow
def test_latency_comes_from_the_exported_model(compose_train: Callable[..., Any], tmp_path: Path) -> None:
    """A bigger architecture, exported (BN folded, parity-gated) and run through the runtime, measures slower."""
    from defectscope.runtime.image import LoaderConfig
    from defectscope.search.measure import LatencySettings, export_untrained, measure_latency
    from defectscope.search.preflight import DataFacts, build_model, untrained_info

    cfg = compose_train(["paths.launch_dir=."], config_name="search")
    facts = DataFacts(["good", "bad"], "good", 1, [0.5], [0.2], (128, 128), 10)
    small = {f"model.widths[{i}]": w for i, w in enumerate([8, 8, 16, 16])}
    small.update({f"model.depths[{i}]": 1 for i in range(4)})
    big = {f"model.widths[{i}]": w for i, w in enumerate([32, 64, 128, 256])}
    big.update({f"model.depths[{i}]": 3 for i in range(4)})
    settings = LatencySettings(batch=4, warmup=2, repeats=9, threads=1)
    ms = {}
    for name, values in (("small", small), ("big", big)):
        model = build_model(cfg, values, 2)
        info = untrained_info(cfg, facts, LoaderConfig(channels=1), values)
        path = export_untrained(model, info, tmp_path / f"{name}.onnx")
        lat = measure_latency(path, 128, 128, settings)
        assert lat.batch == 4 and (lat.height, lat.width) == (128, 128) and len(lat.batch_ms) == 9
        ms[name] = lat.ms_per_image
    assert ms["big"] > 2 * ms["small"], ms


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+search.space.optim.optimizer.momentumm={low:0.1,high:0.9}"], "momentumm: unknown parameter"),
        (["search.space.optim.optimizer.lr.low=0.1"], "optim.optimizer.lr: inverted range"),
        (["search.space.model.stem_width.high=4"], "model.stem_width: empty range"),
        (["search.space.model.act.choices=[relu,swishy]"], "'swishy' is rejected by the model registry"),
        (["search.storage=sqlite:///{tmp}/no/such/dir/search.db"], "search.storage: cannot open sqlite:///"),
        (
            ["search.storage=sqlite://"],
            "search.storage='sqlite://' is an in-memory database: the study would",
        ),
        (["search.timeout=0.001"], "search.timeout=0.001 s is too small for one trial"),
        (["search.max_latency_ms=1e-6"], "search.max_latency_ms=1e-06 is too small for one trial"),
        (["search.max_latency_ms=nan"], "search.max_latency_ms must be null or a number > 0, got nan"),
        (["search.stopping.min_delta=abc"], "search.stopping.min_delta must be a number >= 0, got 'abc'"),
        (["search.stopping=5"], "search.stopping must be a mapping of settings, got 5"),
        (["search.stopping.rungs=3"], "search.stopping.rungs must be a list, got 3"),
        (["search.presets=5"], "search.presets must be a list of names, got 5"),
        (["search.test_trials=no"], "search.test_trials: expected true or false, got str 'no'"),
        (["search.latency=5"], "search.latency must be a mapping of settings, got 5"),
        (["search.latency.image_size=5"], "search.latency.image_size must be null or [height, width], got 5"),
        (
            ["search.latency.provider=gpu"],
            "search.latency.provider must be one of auto, tensorrt, cuda, cpu, got 'gpu'",
        ),
        (
            ["search.latency.threads=abc"],
            "search.latency.threads must be a whole number >= 1 or null, got 'abc'",
        ),
        (["search.latency.warmup=-1"], "search.latency.warmup must be a whole number >= 0, got -1"),
    ],
)
def test_bad_input_is_one_line_before_any_trial(
    overrides: list[str],
    message: str,
    smoke_data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from defectscope.search.app import search_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = [
        "experiment=smoke",
        "model=resnet_small",
        "search=smoke",
        f"paths.data_dir={smoke_data_dir}",
        *[o.replace("{tmp}", str(tmp_path)) for o in overrides],
    ]
    rc = search_main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("defectscope search: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("trials"))  # no trial started


def test_loader_values_are_checked_by_the_training_rule(compose_train: Callable[..., Any]) -> None:
    """A loader choice every trial's data module would refuse stops the search before the first trial."""
    from defectscope.search.preflight import check_choices

    cfg = compose_train(["paths.launch_dir=."], config_name="search")
    check_choices(cfg, parse_space({"data": {"loader": {"upscale_to": {"choices": [None, 256]}}}}))
    with pytest.raises(
        SearchConfigError,
        match=r"data\.loader\.upscale_to: 1\.5 is rejected by the loader policy: "
        r"data\.loader\.upscale_to must be a whole number in \[1, 65536\], got 1\.5",
    ):
        check_choices(cfg, parse_space({"data": {"loader": {"upscale_to": {"choices": [256, 1.5]}}}}))


def test_a_worker_removes_or_requeues_only_its_own_trials(tmp_path: Path) -> None:
    """Two workers on one study: the one stopping on an error must not delete the study under the other, and
    two stopped together must not both queue the same interrupted trial (a review found both)."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.storages import RDBStorage

    from defectscope.search.study import discard_if_empty, requeue_interrupted

    storage = RDBStorage(f"sqlite:///{tmp_path}/s.db")
    study = optuna.create_study(study_name="s", storage=storage)
    dist = {"model.act": CategoricalDistribution(["relu", "silu"])}
    for worker, act in (("me", "relu"), ("other", "silu")):
        study.add_trial(
            optuna.trial.create_trial(
                params={"model.act": act}, distributions=dist, state=optuna.trial.TrialState.FAIL,
                user_attrs={"worker": worker, "interrupted": True},
            )
        )  # fmt: skip
    assert requeue_interrupted(study, "me") == [0] and requeue_interrupted(study, "me") == []  # once
    assert not discard_if_empty(study, storage, "me")  # the other worker's trial keeps the study
    assert optuna.study.get_all_study_names(storage) == ["s"]
    alone = optuna.create_study(study_name="t", storage=storage)
    alone.add_trial(
        optuna.trial.create_trial(
            params={"model.act": "relu"}, distributions=dist, state=optuna.trial.TrialState.FAIL,
            user_attrs={"worker": "me"},
        )
    )  # fmt: skip
    assert discard_if_empty(alone, storage, "me") and optuna.study.get_all_study_names(storage) == ["s"]


def test_a_study_removed_by_another_worker_is_one_line(
    compose_train: Callable[..., Any], tmp_path: Path
) -> None:
    """Worker B opened the study; A's trials all failed and A removed it (discard_if_empty) before B's first
    trial: B said Optuna's bare KeyError('Record does not exist.') in a traceback."""
    import optuna
    from optuna.storages import RDBStorage

    from defectscope.search.settings import SearchSettings
    from defectscope.search.study import StudyRemovedError, optimize, study_removed

    cfg = compose_train(
        ["experiment=synthetic", "paths.launch_dir=.", "search.study_name=s"], config_name="search"
    )
    settings = SearchSettings.from_config(OmegaConf.to_container(cfg.search, resolve=True))
    storage = RDBStorage(f"sqlite:///{tmp_path}/s.db")
    optuna.create_study(study_name="s", storage=storage, directions=settings.directions)
    other = optuna.load_study(study_name="s", storage=storage)
    assert not study_removed(other)
    optuna.delete_study(study_name="s", storage=storage)
    ran: list[int] = []
    with pytest.raises(StudyRemovedError) as err:
        optimize(other, lambda trial: ran.append(trial.number) or (0.5, 1.0), settings)
    assert str(err.value) == (
        "study 's' was removed by another defectscope search on the same storage (its trials had all failed) "
        "before this one ran a trial; run the command again to start it afresh"
    )
    assert ran == [] and study_removed(other)
