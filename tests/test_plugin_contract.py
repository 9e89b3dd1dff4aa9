"""The typed plugin contract: registered plugin classes declare their Params; a run file
and Python keywords give plugins with equal params; plugins are built from a frozen
RunContext (never the run config) and work on a bare Avalanche SupervisedTemplate."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.templates import SupervisedTemplate
from pydantic import BaseModel, ValidationError

from cl_proxyfda.config import first_error, parse_config
from cl_proxyfda.registry import STRATEGIES, STREAMS, load_builtin_components
from cl_proxyfda.runner import build_run
from cl_proxyfda.strategies.base import Configurable, RunContext
from cl_proxyfda.strategies.ewc import EWC
from cl_proxyfda.strategies.l2sp import L2SPPlugin
from cl_proxyfda.strategies.ldifs import LDIFSParams, LDIFSPlugin
from cl_proxyfda.strategies.proxy_fda import FDAPlugin, ProxyFDAPlugin
from cl_proxyfda.strategies.zscl import ZSCLPlugin
from conftest import tiny_config

load_builtin_components()

# Entries a run file may hold and that build without a stream (Python keywords = YAML args).
WITHOUT_STREAM = [
    {"name": "naive"},
    {"name": "l2sp", "weight": 0.25, "anchor": "previous"},
    {"name": "ldifs", "weight": 3.0, "layers": ["ln_pre", "block1"]},
    {"name": "wiseft", "alpha": 0.3, "when": "end"},
    {"name": "ewc", "ewc_lambda": 5.0, "mode": "online", "decay_factor": 0.5},
    {"name": "lwf", "alpha": 0.5, "temperature": 3.0},
    {"name": "awc", "weight": 2.0},
    {"name": "proxy_fda", "k": 5, "n_proxies": 2},
    {"name": "fda", "k": 5, "neg_weight": "one_minus"},
    {"name": "infusing_l2", "weight": 7.0},
    {"name": "infusing_select", "every": 3, "knn_k": 4},
    {"name": "infusing_head", "init": "random", "scale": 8.0, "record_accuracy": False},
]


def test_every_registered_strategy_is_a_plugin_class_with_its_params():
    assert len(STRATEGIES.names()) >= 18
    for name in STRATEGIES.names():
        entry = STRATEGIES.get(name)
        cls = entry.factory
        assert isinstance(cls, type) and issubclass(cls, Configurable), name
        assert issubclass(cls.Params, BaseModel) and entry.params is cls.Params, name
        assert entry.help, name
        cls.Params()  # every option has a default, so an entry of just a name is valid


@pytest.mark.parametrize("item", WITHOUT_STREAM, ids=[i["name"] for i in WITHOUT_STREAM])
def test_run_file_and_python_keywords_give_equal_params(item, tmp_path, tiny_stream_root):
    cfg = parse_config(tiny_config(tiny_stream_root, tmp_path, strategies=[item], train={"batch_size": 16, "sampler": "random"}))
    entry = cfg.strategies[0]
    args = {k: v for k, v in item.items() if k != "name"}
    assert entry.args == args  # what the file gave, defaults left out
    from_yaml = entry.plugin.from_params(entry.params, RunContext(seed=3))
    from_python = entry.plugin(**args)
    assert type(from_yaml) is type(from_python) is entry.plugin
    assert from_yaml.params == from_python.params
    assert from_yaml.run == RunContext(seed=3) and from_python.run is None


@pytest.mark.parametrize("item", WITHOUT_STREAM, ids=[i["name"] for i in WITHOUT_STREAM])
def test_an_entry_builds_its_one_plugin_as_a_list(item):
    args = {k: v for k, v in item.items() if k != "name"}
    plugins = STRATEGIES.build_plugins(item["name"], args, RunContext(seed=3))
    assert [type(p) for p in plugins] == [STRATEGIES.get(item["name"]).factory] and plugins[0].run == RunContext(seed=3)


def test_a_recipe_entry_stands_for_its_parts(tmp_path, tiny_stream_root):
    item = {"name": "infusing", "generic": None, "select": {"every": 3}}
    run = build_run(parse_config(tiny_config(tiny_stream_root, tmp_path, strategies=[item, {"name": "l2sp"}])))
    assert [p.name for p in run.plugins] == ["infusing_vision_only", "infusing_head", "infusing_l2", "infusing_select", "l2sp"]
    assert all(isinstance(p, SupervisedPlugin) for p in run.plugins) and run.strategy.plugins[:5] == run.plugins
    assert run.plugins[3].params.every == 3 and all(p.run is run.plugins[-1].run for p in run.plugins)


def test_fda_is_proxy_fda_without_proxies_under_its_own_name():
    fda, proxy = FDAPlugin(k=5), ProxyFDAPlugin(k=5)
    assert fda.name == "fda" and fda.params.proxies is False
    assert proxy.name == "proxy_fda" and proxy.params.proxies is True
    assert fda.params.model_dump(exclude={"proxies"}) == proxy.params.model_dump(exclude={"proxies"})


def test_bad_keywords_raise_the_params_message():
    with pytest.raises(ValidationError) as python:
        LDIFSPlugin(weight=-1.0, layers="embed")
    with pytest.raises(ValidationError) as direct:
        LDIFSParams(weight=-1.0, layers="embed")
    assert python.value.errors() == direct.value.errors()
    assert str(first_error(python.value, "strategies[0]")) == "strategies[0].weight: Input should be greater than or equal to 0 (got -1.0)"
    with pytest.raises(ValidationError, match="wieght"):
        L2SPPlugin(wieght=1.0)
    with pytest.raises(ValidationError, match="anchor"):
        L2SPPlugin(anchor="yesterday")
    with pytest.raises(ValidationError, match="ewc_lambda"):
        EWC(ewc_lambda=-5)
    with pytest.raises(ValidationError, match="EWC online mode needs decay_factor"):
        EWC(mode="online")
    with pytest.raises(TypeError, match="keyword arguments"):
        LDIFSPlugin(10.0)
    with pytest.raises(TypeError, match="not both"):
        LDIFSPlugin(LDIFSParams(), weight=1.0)


def test_the_run_file_gives_the_same_message_as_python(tmp_path, tiny_stream_root, capsys):
    from cl_proxyfda.cli import main

    path = tmp_path / "bad.yaml"
    import yaml

    path.write_text(yaml.safe_dump(tiny_config(tiny_stream_root, tmp_path / "out", strategies=[{"name": "ldifs", "weight": -1.0}])))
    assert main(["run", str(path)]) == 2
    assert capsys.readouterr().err.strip() == "error: strategies[0].weight: Input should be greater than or equal to 0 (got -1.0)"
    assert not (tmp_path / "out").exists()


def test_config_holds_typed_params_and_dumps_them_plainly(tmp_path, tiny_stream_root):
    items = [{"name": "ldifs", "layers": "embed"}, {"name": "zscl", "weight": 2.0, "texts": "imagenet"}]
    cfg = parse_config(tiny_config(tiny_stream_root, tmp_path, strategies=items))
    ldifs, zscl = cfg.strategies
    assert isinstance(ldifs.params, LDIFSParams) and ldifs.params.weight == 10.0 and ldifs.params.layers == "embed"
    assert zscl.plugin is ZSCLPlugin and zscl.params.weight == 2.0 and zscl.params.seed is None
    dumped = cfg.to_dict()["strategies"]
    assert dumped == [{"name": e.name, **e.params.model_dump(mode="json")} for e in cfg.strategies]
    assert list(dumped[0]) == ["name", "weight", "layers", "reference"]  # config.yaml key order
    again = parse_config({**cfg.to_dict()})
    assert again.to_dict() == cfg.to_dict() and again.strategies == cfg.strategies
    with pytest.raises(ValidationError):  # parsed entries are frozen: one typed form, never re-validated
        ldifs.name = "l2sp"


def test_runner_builds_plugins_from_a_frozen_run_context(tmp_path, tiny_stream_root):
    cfg = parse_config(
        tiny_config(
            tiny_stream_root,
            tmp_path,
            run={"seed": 11},
            train={"batch_size": 8, "workers": 0},
            eval={"batch_size": 32},
            strategies=[{"name": "ldifs", "layers": "embed"}, {"name": "zscl", "texts": "imagenet", "reference": "stream"}],
        )
    )
    from cl_proxyfda.errors import UserError

    with pytest.raises(UserError, match="zscl.reference"):  # the tiny stream has no reference images
        build_run(cfg)
    cfg = parse_config(tiny_config(tiny_stream_root, tmp_path, run={"seed": 11}, eval={"batch_size": 32},
                                   strategies=[{"name": "ldifs", "layers": "embed"}, {"name": "l2sp", "weight": 0.5}]))
    run = build_run(cfg)
    ldifs, l2sp = run.plugins
    ctx = ldifs.run
    assert ctx is l2sp.run and isinstance(ctx, RunContext)
    assert ctx.seed == 11 and ctx.train_batch_size == 8 and ctx.eval_batch_size == 32 and ctx.workers == 0
    assert ctx.task_names == tuple(t.name for t in run.stream.tasks) and ctx.num_experiences == len(run.stream.tasks)
    assert ctx.classnames == tuple(tuple(t.classnames) for t in run.stream.tasks)
    assert ctx.stream is run.stream and ctx.stream_name == "image_folder" and ctx.device == "cpu"
    assert ctx.rank == 0 and ctx.world == 1 and ctx.output_dir == str(tmp_path)
    assert ldifs.params == LDIFSPlugin(layers="embed").params and l2sp.params == L2SPPlugin(weight=0.5).params
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.seed = 1  # type: ignore[misc]
    assert not any(hasattr(p, "config") for p in run.plugins)


def test_ldifs_on_a_bare_supervised_template_trains_one_experience(tiny_stream_root):
    from cl_proxyfda.benchmarks.stream import to_avalanche
    from cl_proxyfda.models import build_task_model

    torch.manual_seed(0)
    stream = STREAMS.build("image_folder", {"root": str(tiny_stream_root)})
    model, train_tf, eval_tf = build_task_model("cl-test-tiny", None, [t.vocabulary for t in stream.tasks])
    benchmark = to_avalanche(stream.tasks, train_tf, eval_tf)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ldifs = LDIFSPlugin(weight=10.0, layers="embed")
    strategy = SupervisedTemplate(
        model=model,
        optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2),
        train_mb_size=4,
        train_epochs=1,
        plugins=[ldifs],
        evaluator=None,
    )
    # no teachers, no run context: the plugin takes what it needs from the strategy it joined
    ctx = ldifs.context(strategy)
    assert ctx.seed == 0 and ctx.train_batch_size == 4 and ctx.workers == 0
    losses: list[float] = []
    strategy.plugins.append(_LossRecorder(losses, ldifs))
    strategy.train(benchmark.train_stream[0], eval_streams=[])
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert changed, "one experience of training changes the trainable weights"
    # the first batch: student == reference, so the feature distance is 0; it grows as the weights move
    assert losses[0] == pytest.approx(0.0, abs=1e-6)
    assert max(losses) > 1e-6 and all(torch.isfinite(torch.tensor(losses)))
    assert ldifs.loss_terms["ldifs"] == losses[-1]


class _LossRecorder(SupervisedPlugin):
    """Records LDIFS's loss term after each backward."""

    def __init__(self, out: list[float], plugin: LDIFSPlugin) -> None:
        super().__init__()
        self.out, self.plugin = out, plugin

    def after_backward(self, strategy, **kwargs) -> None:
        self.out.append(self.plugin.loss_terms["ldifs"])


def test_a_part_built_by_hand_takes_the_batch_size_of_the_strategy_it_joins(tiny_stream_root):
    import numpy as np

    from cl_proxyfda.benchmarks.stream import ArrayImageDataset
    from cl_proxyfda.models import build_task_model
    from cl_proxyfda.strategies.infusing import GenericDistillPlugin

    stream = STREAMS.build("image_folder", {"root": str(tiny_stream_root)})
    model, _, _ = build_task_model("cl-test-tiny", None, [t.vocabulary for t in stream.tasks])
    images = ArrayImageDataset(np.random.default_rng(0).integers(0, 255, (12, 16, 16, 3), dtype=np.uint8), [i % 3 for i in range(12)])
    by_hand, fixed = GenericDistillPlugin(images), GenericDistillPlugin(generic=images, batch_size=5)
    assert by_hand.batch_size is None and by_hand.params.batch_size is None
    strategy = SupervisedTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_mb_size=6, evaluator=None)
    by_hand.before_training(strategy)
    fixed.before_training(strategy)
    assert by_hand.batch_size == 6 and fixed.batch_size == 5
    assert by_hand.targets is not None and by_hand.targets.shape[0] == len(by_hand.items)
