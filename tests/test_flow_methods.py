"""Every method on a flow-matching teacher: each ``configs/<method>/debug_flow.yaml`` trains on the tiny
flow teacher (conftest.write_tiny_flow_teacher), its student is a flow model, and its export is a stock
diffusers pipeline (``FlowMatchEulerDiscreteScheduler`` / ``FlowMatchLCMScheduler``) that reproduces
``sample()``: with the default call at the trained step count, and at any other count once its scheduler
is set up for it with ``sampling.at_steps`` (what ``evaluate`` does).

A method extends these tests by landing its debug_flow preset; FLOW_METHODS lists the ones that must.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline

from _method_configs import debug_config, flow_debug_presets, preset_args
from test_export import assert_pipeline_reproduces_samples

#: methods that must run on a flow teacher, with the step counts their sampler is checked at.
FLOW_METHODS = {
    "teacher": [1, 2],
    "consistency": [1, 2],
    "progressive": [1, 2],
    "knowledge": [1, 2],
    "data_distillation": [1],
    "add": [1, 2],
    "apt": [1],
    "dmd2": [1],
    "scm": [1, 2],
}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    from _method_configs import write_fixtures

    return write_fixtures(tmp_path_factory.mktemp("flow_fixtures"))


def test_every_method_has_a_flow_debug_preset():
    assert set(FLOW_METHODS) <= set(flow_debug_presets()), "methods without configs/<name>/debug_flow.yaml"


@pytest.mark.parametrize("name", sorted(FLOW_METHODS))
def test_method_trains_on_a_flow_teacher_and_exports_a_stock_flow_pipeline(name, fixtures, tmp_path):
    from lightning_distill.cli import cli_main
    from lightning_distill.sampling import at_steps

    if not debug_config(name, flow=True).is_file():
        pytest.skip(f"configs/{name}/debug_flow.yaml is absent")
    cli = cli_main(["fit", *preset_args(name, tmp_path / "run", fixtures, flow=True)])
    model = cli.model
    assert cli.trainer.global_step > 0
    assert model.student.path == "flow" and model.student.prediction_type == "flow_prediction"
    if model.teacher is not None:
        assert model.teacher.schedule.path == "flow"
    folder = model.export(tmp_path / "student")
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    assert type(pipe.scheduler).__name__ in ("FlowMatchEulerDiscreteScheduler", "FlowMatchLCMScheduler")
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(v, model.sampling_denoiser().unet.state_dict()[k], rtol=0, atol=0, msg=k)
    trained = int(model.hparams.sample_steps)
    assert_pipeline_reproduces_samples(model, pipe, trained)  # the stock call, nothing set up
    stock = pipe.scheduler
    for steps in FLOW_METHODS[name]:
        pipe.scheduler = at_steps(stock, steps)
        assert_pipeline_reproduces_samples(model, pipe, steps)
