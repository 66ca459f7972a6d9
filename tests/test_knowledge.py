"""Knowledge distillation: KD losses against hand computations, the KD method, feature hooks, configs, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import make_tiny_unet

from lightning_distill.losses import (
    classifier_kd_loss,
    feature_kd_loss,
    denoising_loss,
    mixed_kd_loss,
    pseudo_huber,
    regression_distance,
    temperature_kd_loss,
)
from lightning_distill.methods.knowledge import KnowledgeDistillation, count_parameters
from lightning_distill.nn_utils import FeatureTap
from lightning_distill.parametrisation import prediction_from_output
from lightning_distill.teacher import load_teacher

ROOT = Path(__file__).resolve().parents[1]


def _small_student(seed: int = 1):
    """A student narrower than the tiny teacher (widths 4, 8 instead of 8, 16)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=2,
    )


# --- temperature loss: hand computation ----------------------------------------------------------


def _hand_kd(zs, zt, T):
    """T^2 * mean_b sum_k p_k log(p_k / q_k), p = softmax(zt / T), q = softmax(zs / T), with plain floats."""
    total = 0.0
    for s_row, t_row in zip(zs, zt):
        ps = [math.exp(v / T) for v in s_row]
        pt = [math.exp(v / T) for v in t_row]
        q = [v / sum(ps) for v in ps]
        p = [v / sum(pt) for v in pt]
        total += sum(pk * math.log(pk / qk) for pk, qk in zip(p, q))
    return T * T * total / len(zs)


def test_temperature_kd_loss_matches_hand_computation():
    zs = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    zt = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]]
    for T in (1.0, 2.0, 4.0):
        got = temperature_kd_loss(torch.tensor(zs), torch.tensor(zt), T).item()
        assert got == pytest.approx(_hand_kd(zs, zt, T), rel=1e-5)
    # The T^2 factor: at T = 4 the loss is 16 x the un-scaled KL of the flattened distributions.
    plain_kl_t4 = _hand_kd(zs, zt, 4.0) / 16.0
    assert temperature_kd_loss(torch.tensor(zs), torch.tensor(zt), 4.0).item() == pytest.approx(16 * plain_kl_t4, rel=1e-5)


def test_temperature_one_is_plain_kl_and_zero_for_identical_logits():
    torch.manual_seed(0)
    zs, zt = torch.randn(5, 7), torch.randn(5, 7)
    p, q = zt.softmax(-1), zs.softmax(-1)
    plain = (p * (p.log() - q.log())).sum(-1).mean()
    assert temperature_kd_loss(zs, zt, 1.0).item() == pytest.approx(plain.item(), rel=1e-5)
    assert temperature_kd_loss(zt, zt, 3.0).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        temperature_kd_loss(zs, zt, 0.0)


def test_temperature_loss_gradient_flows_to_student_only():
    zs = torch.randn(3, 4, requires_grad=True)
    zt = torch.randn(3, 4, requires_grad=True)
    temperature_kd_loss(zs, zt, 2.0).backward()
    assert zs.grad.abs().sum() > 0 and zt.grad is None


def test_classifier_kd_loss_alpha_extremes():
    torch.manual_seed(0)
    zs, zt, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    hard = classifier_kd_loss(zs, zt, y, temperature=3.0, alpha=1.0)
    assert hard.loss.item() == pytest.approx(F.cross_entropy(zs, y).item(), rel=1e-6)
    soft = classifier_kd_loss(zs, zt, None, temperature=3.0, alpha=0.0)
    assert soft.loss.item() == pytest.approx(temperature_kd_loss(zs, zt, 3.0).item(), rel=1e-6)
    mixed = classifier_kd_loss(zs, zt, y, temperature=3.0, alpha=0.25)
    assert mixed.loss.item() == pytest.approx(0.25 * hard.loss.item() + 0.75 * soft.loss.item(), rel=1e-5)


# --- mixed hard / soft regression loss -----------------------------------------------------------


def test_mixed_kd_loss_reduces_to_pure_hard_and_pure_soft():
    torch.manual_seed(0)
    pred, hard, soft = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    for d in ("l2", "l1", "pseudo_huber"):
        h = regression_distance(pred, hard, d).mean()
        s = regression_distance(pred, soft, d).mean()
        assert mixed_kd_loss(pred, hard, soft, 1.0, d).loss.item() == pytest.approx(h.item(), rel=1e-6)
        assert mixed_kd_loss(pred, hard, soft, 0.0, d).loss.item() == pytest.approx(s.item(), rel=1e-6)
        assert mixed_kd_loss(pred, hard, soft, 0.3, d).loss.item() == pytest.approx(0.3 * h.item() + 0.7 * s.item(), rel=1e-5)
    assert regression_distance(pred, hard, "l2").mean().item() == pytest.approx(F.mse_loss(pred, hard).item(), rel=1e-6)
    assert mixed_kd_loss(pred, hard, None, 1.0).loss.item() == pytest.approx(F.mse_loss(pred, hard).item(), rel=1e-6)
    with pytest.raises(ValueError, match="soft target"):
        mixed_kd_loss(pred, hard, None, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        mixed_kd_loss(pred, hard, soft, 1.5)


def test_pseudo_huber_reductions_by_hand():
    # d = (3, -4): ||d||^2 = 25 over D = 2 elements
    a, b = torch.tensor([[3.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(pseudo_huber(a, b, 1.0, "sum"), torch.tensor([26**0.5 - 1, 0.0]))
    torch.testing.assert_close(pseudo_huber(a, b, 1.0, "mean"), torch.tensor([13.5**0.5 - 1, 0.0]))
    torch.testing.assert_close(pseudo_huber(a, b, 1.0, "elementwise"), torch.tensor([(10**0.5 + 17**0.5) / 2 - 1, 0.0]))
    # regression_distance's pseudo_huber is the mean form with c = 0.03
    torch.testing.assert_close(regression_distance(a, b, "pseudo_huber"), pseudo_huber(a, b, 0.03, "mean"))
    with pytest.raises(ValueError, match="choose one of"):
        pseudo_huber(a, b, 1.0, "max")


def _method(teacher_dir, alpha, **kw):
    teacher = load_teacher(teacher_dir)
    return KnowledgeDistillation(teacher=teacher, student=_small_student(), alpha=alpha, **kw)


def test_method_alpha_one_is_denoising_loss_and_alpha_zero_is_teacher_regression(tiny_teacher_dir):
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    hard_model = _method(tiny_teacher_dir, alpha=1.0)
    torch.manual_seed(3)
    got = hard_model.compute_loss({"x": x0, "label": torch.zeros(4, dtype=torch.long)}).loss
    torch.manual_seed(3)
    t = torch.randint(0, 1024, (4,))
    eps = torch.randn_like(x0)
    assert got.item() == pytest.approx(denoising_loss(hard_model.student, x0, t, eps).item(), rel=1e-5)

    soft_model = _method(tiny_teacher_dir, alpha=0.0, student_prediction_type="epsilon")
    torch.manual_seed(3)
    got = soft_model.compute_loss({"x": x0, "label": torch.zeros(4, dtype=torch.long)}).loss
    # By hand: the teacher (v-prediction) at the same x_t, converted to eps; the student regresses onto it.
    sched = soft_model.teacher.schedule
    x_t = sched.add_noise(x0, eps, t)
    a, s = sched.alpha(t), sched.sigma(t)
    v_teacher = soft_model.teacher.unet(x_t, t).sample
    eps_teacher = s.view(-1, 1, 1, 1) * x_t + a.view(-1, 1, 1, 1) * v_teacher  # eps = sigma x_t + alpha v
    expected = F.mse_loss(soft_model.student.unet(x_t, t).sample, eps_teacher)
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)
    pred = prediction_from_output(v_teacher, x_t, a, s, "v_prediction")
    assert torch.allclose(pred.eps, eps_teacher, atol=1e-5)


# --- feature KD ----------------------------------------------------------------------------------


def test_feature_tap_captures_named_blocks(tiny_teacher_dir):
    unet = make_tiny_unet()
    seen = {}
    unet.mid_block.register_forward_hook(lambda m, i, o: seen.__setitem__("mid", o))
    unet.up_blocks[0].register_forward_hook(lambda m, i, o: seen.__setitem__("up0", o))
    tap = FeatureTap(unet, {"mid_block": "mid_block", "up_blocks.0": "up_blocks.0"})
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        unet(x, t)
    assert tap.features == {}  # recording only inside the context
    with tap, torch.no_grad():
        unet(x, t)
    assert set(tap.features) == {"mid_block", "up_blocks.0"}
    assert torch.equal(tap.features["mid_block"], seen["mid"])
    assert torch.equal(tap.features["up_blocks.0"], seen["up0"])
    # Hooks live only inside the `with`: the network (and a deepcopy of it, e.g. the EMA's) carries none.
    assert len(unet.mid_block._forward_hooks) == 1 and len(unet.up_blocks[0]._forward_hooks) == 1
    with pytest.raises(ValueError, match=r"no block named \['mid'\]"):
        FeatureTap(unet, {"x": "mid"})


def test_unknown_feature_blocks_name_the_argument(tiny_teacher_dir):
    with pytest.raises(ValueError, match=r"feature_weights \(student blocks\): no block named \['mid'\].*blocks: \["):
        _method(tiny_teacher_dir, 0.5, feature_weights={"mid": 1.0})
    with pytest.raises(ValueError, match=r"feature_teacher_blocks \(teacher blocks\): no block named \['middle'\]"):
        _method(tiny_teacher_dir, 0.5, feature_weights={"mid_block": 1.0}, feature_teacher_blocks={"mid_block": "middle"})


def test_projections_train_and_are_saved(tiny_teacher_dir):
    model = _method(tiny_teacher_dir, alpha=0.5, feature_weights={"mid_block": 1.0, "up_blocks.0": 0.5})
    # Student widths (8 at the mid block, 8 at up_blocks.0) differ from the teacher's (16, 16): 1x1 convs.
    assert set(model.projections) == {"mid_block", "up_blocks__0"}
    proj = model.projections["mid_block"]
    assert isinstance(proj, torch.nn.Conv2d) and proj.kernel_size == (1, 1)
    assert (proj.in_channels, proj.out_channels) == (8, 16)
    opt = model.configure_optimizers()
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in ids for p in model.projections.parameters())
    before = {k: v.clone() for k, v in model.projections.state_dict().items()}
    torch.manual_seed(0)
    out = model.compute_loss({"x": torch.rand(4, 1, 8, 8) * 2 - 1, "label": torch.zeros(4, dtype=torch.long)})
    assert {"feat/mid_block", "feat/up_blocks.0", "hard", "soft"} <= set(out.logs)
    opt.zero_grad()
    out.loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())
    opt.step()
    after = model.projections.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert any(k.startswith("projections.mid_block") for k in model.state_dict())
    # The loss released the tapped activations, and hooks exist only inside a tap's `with`: copies of the
    # student (EMA, export) carry none, nor does the shared teacher.
    import copy

    assert model.student_tap.features == {} and model.teacher_tap.features == {}
    clone = copy.deepcopy(model.student.unet)
    assert not any(m._forward_hooks for m in [*clone.modules(), *model.teacher.unet.modules()])


def test_feature_blocks_with_different_paths_and_bad_names(tiny_teacher_dir):
    model = _method(
        tiny_teacher_dir, alpha=1.0, feature_weights={"up_blocks.1": 1.0}, feature_teacher_blocks={"up_blocks.1": "up_blocks.0"}
    )
    out = model.compute_loss({"x": torch.zeros(2, 1, 8, 8), "label": torch.zeros(2, dtype=torch.long)})
    assert "feat/up_blocks.1" in out.logs  # student up_blocks.1 (4 ch, 8x8) vs teacher up_blocks.0 (16 ch, 4x4)
    with pytest.raises(ValueError, match="no entry in feature_weights"):
        _method(tiny_teacher_dir, alpha=1.0, feature_teacher_blocks={"mid_block": "mid_block"})
    with pytest.raises(KeyError, match="not captured"):
        feature_kd_loss({}, {}, {"mid_block": 1.0})


# --- configs and CLI -----------------------------------------------------------------------------


def _unet_from(cfg_path: Path, key: str):
    from diffusers import UNet2DModel

    cfg = yaml.safe_load(cfg_path.read_text())
    args = dict(cfg["model"]["init_args"][key]["init_args"])
    args["sample_size"] = cfg["data"]["image_size"]
    return UNet2DModel(**args)


def test_digits_student_has_at_most_half_the_teacher_parameters():
    student = _unet_from(ROOT / "configs/knowledge/digits.yaml", "student")
    teacher = _unet_from(ROOT / "configs/teacher/digits.yaml", "unet")
    assert count_parameters(student) <= count_parameters(teacher) / 2
    assert count_parameters(student) == 465_529


def test_knowledge_debug_preset_runs_through_cli(tiny_teacher_dir, tmp_path):
    from lightning_distill.cli import cli_main

    root = tmp_path / "run"
    cli_main([
        "fit", "--config", str(ROOT / "configs/knowledge/debug.yaml"), "--data.teacher", str(tiny_teacher_dir),
        "--data.image_size", "8", "--trainer.default_root_dir", str(root),
    ])
    assert (root / "checkpoints" / "last.ckpt").exists()
    assert (root / "student" / "unet" / "config.json").exists()
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert any(k.startswith("projections.") for k in ckpt["state_dict"])
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])


def test_classifier_kd_runs_through_cli_and_reports_accuracy(tmp_path):
    from lightning_distill.cli import cli_main
    from lightning_distill.feature_net import load_digits_feature_net

    root = tmp_path / "run"
    cli = cli_main([  # the preset's teacher: the bundled digits classifier
        "fit", "--config", str(ROOT / "configs/knowledge/classifier_digits.yaml"), "--trainer.default_root_dir", str(root),
        "--trainer.max_epochs", "1", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false",
    ])
    result = json.loads((root / "result.json").read_text())
    assert result["num_val_images"] == 180 and result["temperature"] == 4.0 and result["global_step"] == 2
    # The reported numbers, recomputed over the whole val split: the bundled teacher and the trained student
    # (weights from last.ckpt), in eval mode, against the split's labels. The teacher is accurate, so an
    # off-by-one between predictions and labels, or the wrong split, shows.
    batches = list(cli.datamodule.val_dataloader())
    x, y = torch.cat([b["x"] for b in batches]), torch.cat([b["label"] for b in batches])
    assert len(y) == 180
    teacher = load_digits_feature_net().eval()
    student = cli.model.student
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    student.load_state_dict({k[len("student."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("student.")})
    student.eval()
    with torch.no_grad():
        pred_t, pred_s = teacher.logits(x).argmax(1), student.logits(x).argmax(1)
    teacher_acc = (pred_t == y).float().mean().item()
    assert teacher_acc > 0.9
    assert result["teacher_accuracy"] == pytest.approx(teacher_acc, abs=1e-6)
    assert result["student_accuracy"] == pytest.approx((pred_s == y).float().mean().item(), abs=1e-6)
    assert result["agreement"] == pytest.approx((pred_s == pred_t).float().mean().item(), abs=1e-6)
    # the shift augmentation's random state is in the checkpoint (ResumeRNG), so a resume continues its draws
    assert any(k.startswith("ResumeRNG") for k in ckpt["callbacks"]), list(ckpt["callbacks"])


@pytest.mark.parametrize("config", ["knowledge/digits.yaml", "data_distillation/digits.yaml"])
def test_digits_configs_instantiate(config, tmp_path):
    """The real presets parse and build (against a tiny 16x16 teacher; no step is run, no pair generated)."""
    from conftest import write_tiny_teacher
    from lightning_distill.cli import cli_main

    teacher = write_tiny_teacher(tmp_path / "teacher16", sample_size=16)
    cli = cli_main(["--config", str(ROOT / "configs" / config), "--data.teacher", str(teacher),
                    "--trainer.default_root_dir", str(tmp_path / "run")], run=False)
    if "knowledge" in config:
        # the measured default: soft labels only, no feature KD; the commented feature option still builds
        assert cli.model.hparams.alpha == 0.0 and cli.model.feature_weights == {}
        cli = cli_main(["--config", str(ROOT / "configs" / config), "--data.teacher", str(teacher),
                        "--model.init_args.feature_weights", '{"mid_block": 0.1, "up_blocks.1": 0.1}',
                        "--trainer.default_root_dir", str(tmp_path / "run2")], run=False)
        assert cli.model.feature_weights == {"mid_block": 0.1, "up_blocks.1": 0.1}
        assert set(cli.model.projections) == {"mid_block", "up_blocks__1"}  # 40 -> 16 channels here
    else:
        pairs = cli.datamodule.hparams.pairs  # jsonargparse hands dataclass groups over as dicts
        assert (pairs["num_steps"] if isinstance(pairs, dict) else pairs.num_steps) == 32
        assert cli.model.hparams.sample_steps == 1


# --- flow-matching teachers (METHODS.md section 7) -----------------------------------------------


def test_flow_teacher_kd_targets_are_velocities_by_hand(tiny_flow_teacher_dir):
    """On x_s = (1 - s) x + s eps (s = (t + 1) / T, the network fed s T): the hard label of a velocity
    student is eps - x, the soft label the teacher's velocity; other student types get x = x_s - s u and
    eps = x_s + (1 - s) u of that velocity."""
    from lightning_distill.methods.knowledge import kd_targets

    teacher = load_teacher(tiny_flow_teacher_dir)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 250, 700, 999])
    s = ((t + 1) / 1000).view(-1, 1, 1, 1)
    x_s = (1 - s) * x0 + s * eps
    u_teacher = teacher.unet(x_s, (t + 1).float()).sample
    x_t, hard, soft = kd_targets(teacher.denoiser, "flow_prediction", x0, eps, t)
    torch.testing.assert_close(x_t, x_s)
    torch.testing.assert_close(hard, eps - x0)
    torch.testing.assert_close(soft, u_teacher, atol=1e-5, rtol=1e-5)
    _, hard_x, soft_x = kd_targets(teacher.denoiser, "sample", x0, eps, t)
    torch.testing.assert_close(hard_x, x0)
    torch.testing.assert_close(soft_x, x_s - s * u_teacher, atol=1e-5, rtol=1e-5)
    _, _, soft_eps = kd_targets(teacher.denoiser, "epsilon", x0, eps, t)
    torch.testing.assert_close(soft_eps, x_s + (1 - s) * u_teacher, atol=1e-5, rtol=1e-5)


def test_flow_student_regresses_velocities_hard_and_soft(tiny_flow_teacher_dir):
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    for alpha in (0.0, 1.0):
        model = _method(tiny_flow_teacher_dir, alpha=alpha)
        assert model.student.path == "flow" and model.student.prediction_type == "flow_prediction"
        torch.manual_seed(3)
        got = model.compute_loss({"x": x0, "label": torch.zeros(4, dtype=torch.long)}).loss
        torch.manual_seed(3)
        t = torch.randint(0, 1000, (4,))
        eps = torch.randn_like(x0)
        s = ((t + 1) / 1000).view(-1, 1, 1, 1)
        x_s = (1 - s) * x0 + s * eps
        target = eps - x0 if alpha == 1 else model.teacher.unet(x_s, (t + 1).float()).sample
        expected = F.mse_loss(model.student.unet(x_s, (t + 1).float()).sample, target)
        assert got.item() == pytest.approx(expected.item(), rel=1e-4)
    # the student samples with the stock flow Euler sampler, at the teacher's step count
    assert type(model.sampling_scheduler(model.hparams.sample_steps)).__name__ == "FlowMatchEulerDiscreteScheduler"


from test_lcm import captioned_folder, tiny_sd  # noqa: E402,F401 - fixtures


def test_feature_kd_on_a_text_unet_teacher_builds_and_trains(tiny_sd, captioned_folder):  # noqa: F811
    """Feature KD with an SD-style UNet2DConditionModel teacher (BK-SDM's setting): the projections' dry pass
    gives the network text states (it crashed before: encoder_hidden_states missing), and a training loss
    with the feature term is finite and reaches the student."""
    from lightning_distill.data import TeacherDataModule
    from lightning_distill.methods.knowledge import KnowledgeDistillation

    dm = TeacherDataModule(teacher=str(tiny_sd), data=str(captioned_folder), image_size=8, batch_size=2)
    method = KnowledgeDistillation(dm.teacher, feature_weights={"mid_block": 1.0})
    dm.setup("fit")
    out = method.compute_loss(next(iter(dm.train_dataloader())))
    assert torch.isfinite(out.loss) and any(k.startswith("feat") for k in out.logs), out.logs.keys()
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters())
