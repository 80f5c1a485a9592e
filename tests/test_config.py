"""Config round trip, overrides, presets and strict errors."""

import pytest
import yaml

from livt import config as c


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = c.parse_args("finetune", ["--data", "imagenet_lt", "--optim.blr", "2e-3", "--data.root", "/x"])
    c.save(cfg, tmp_path / "config.yaml")
    again = c.from_dict("finetune", yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg
    assert again.optim.betas == (0.9, 0.99) and isinstance(again.optim.betas, tuple)


def test_precedence_defaults_preset_override():
    assert c.FinetuneConfig().optim.epochs == 100
    cfg = c.parse_args("finetune", ["--data", "places_lt"])
    assert cfg.optim.epochs == 30 and cfg.data.dataset == "places_lt"  # preset beats default
    cfg = c.parse_args("finetune", ["--data", "places_lt", "--optim.epochs=7"])
    assert cfg.optim.epochs == 7  # override beats preset


def test_override_types():
    cfg = c.parse_args("pretrain", ["--data.mean", "0.1,0.2,0.3", "--overwrite", "--seed", "3",
                                    "--mae.norm_pix_loss", "false", "--optim.warmup_epochs", "2"])
    assert cfg.data.mean == (0.1, 0.2, 0.3)
    assert cfg.overwrite is True and cfg.seed == 3 and cfg.mae.norm_pix_loss is False
    assert cfg.optim.warmup_epochs == 2.0 and isinstance(cfg.optim.warmup_epochs, float)
    assert c.parse_args("evaluate", ["--tta-aggregate", "--checkpoint", "x"]).tta_aggregate is True


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(c.ConfigError, match=r"unknown key 'optim\.bl'.*did you mean 'optim\.blr'"):
        c.parse_args("pretrain", ["--optim.bl", "1e-3"])


@pytest.mark.parametrize("argv, key", [
    (["--optim.blr", "fast"], "optim.blr"),
    (["--data.batch_size", "1.5"], "data.batch_size"),
    (["--data.mean", "0.1,0.2"], "data.mean"),
    (["--overwrite", "maybe"], "overwrite"),
])
def test_wrong_type_names_the_key(argv, key):
    with pytest.raises(c.ConfigError, match=f"'{key}' expects"):
        c.parse_args("pretrain", argv)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  epochz: 3\n")
    with pytest.raises(c.ConfigError, match=r"bad\.yaml: unknown key 'optim\.epochz'.*'optim\.epochs'"):
        c.parse_args("pretrain", ["--config", str(bad)])
    bad.write_text("optim: {epochs: three}\n")
    with pytest.raises(c.ConfigError, match=r"bad\.yaml: key 'optim\.epochs' expects int"):
        c.parse_args("pretrain", ["--config", str(bad)])


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(c.ConfigError, match="no preset 'imagenet'.*imagenet_lt"):
        c.parse_args("pretrain", ["--data", "imagenet"])


def test_every_preset_loads():
    for stage in c.STAGES:
        names = c.presets(stage)
        assert {"tiny", "demo", "imagenet_lt", "places_lt", "inat18", "cifar10_lt", "cifar100_lt"} <= set(names)
        for name in names:
            c.parse_args(stage, ["--data", name])


def test_hash_ignores_what_may_change_on_resume():
    base = c.parse_args("pretrain", ["--data", "tiny"])
    same = c.parse_args("pretrain", ["--data", "tiny", "--resume", "auto", "--data.num_workers", "7"])
    other = c.parse_args("pretrain", ["--data", "tiny", "--optim.blr", "1"])
    assert c.run_name(base, "pretrain") == c.run_name(same, "pretrain") != c.run_name(other, "pretrain")


def test_help_lists_every_field_with_its_doc(capsys):
    with pytest.raises(SystemExit):
        c.parse_args("finetune", ["--help"])
    out = capsys.readouterr().out
    for key in c.flat_fields(c.FinetuneConfig):
        assert f"--{key} " in out
    assert "layer-wise lr decay" in out


def test_loss_options_are_the_loss_functions_own():
    args = ["--data", "tiny", "--method", "ldam"]
    cfg = c.parse_args("finetune", args + ["--loss.s", "20"])  # the function's name, coerced to its default's type
    assert cfg.loss.options == {"s": 20.0, "max_margin": 0.5, "drw_start": 0.8, "drw_beta": 0.9999,
                                "drw_mean": "weighted"}
    assert isinstance(cfg.loss.options["s"], float) and c.sources_of(cfg)["loss.s"] == "--loss.s"
    # an option of another loss names the loss and the options it takes, before anything runs
    with pytest.raises(c.ConfigError, match=r"command line: unknown key 'loss\.tau'.*ldam' takes the options: s, "
                                            r"max_margin, drw_start, drw_beta, drw_mean"):
        c.parse_args("finetune", args + ["--loss.tau", "2"])
    with pytest.raises(c.ConfigError, match=r"--loss\.s: key 'loss\.s' expects float, got 'abc'"):
        c.parse_args("finetune", args + ["--loss.s", "abc"])
    with pytest.raises(c.ConfigError, match=r"key 'loss\.name': unknown loss 'nope'"):
        c.parse_args("finetune", ["--loss.name", "nope"])
    # tuples by the annotation; a layer that changes the loss drops the options of the one before (the
    # cifar10_lt preset's bal_bce tau / variant), and --loss.name applies before the other overrides
    reslt = c.parse_args("finetune", ["--method", "reslt", "--loss.split", "0.2,0.2"])
    assert reslt.loss.options["split"] == (0.2, 0.2)
    cfg = c.parse_args("finetune", ["--data", "cifar10_lt", "--loss.gamma", "3", "--loss.name", "focal"])
    assert cfg.loss.options == {"gamma": 3.0}
    assert c.parse_args("finetune", ["--data", "cifar10_lt"]).loss.options == {"tau": 1.0, "variant": "eq10"}


def test_loss_options_enter_the_hash_given_or_default(tmp_path):
    base = c.parse_args("finetune", ["--data", "tiny", "--loss.name", "ldam"])
    same = c.parse_args("finetune", ["--data", "tiny", "--loss.name", "ldam", "--loss.s", "30"])
    other = c.parse_args("finetune", ["--data", "tiny", "--loss.name", "ldam", "--loss.s", "20"])
    assert c.run_name(base, "finetune") == c.run_name(same, "finetune") != c.run_name(other, "finetune")
    assert "loss.s" not in c.non_default_sources(base) and c.non_default_sources(other)["loss.s"] == "--loss.s"
    # config.yaml writes the options beside the loss's fields and reads back to the same config
    c.save(other, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["loss"]["s"] == 20.0 and "options" not in saved["loss"]
    again = c.from_dict("finetune", saved)
    assert again == other and c.config_hash(again) == c.config_hash(other)


# ---------------------------------------------------------------------------------------------
# Fixed choices (Literal types) checked at parse time


@pytest.mark.parametrize("argv, key, allowed", [
    (["--precision", "fp8"], "precision", "auto, bf16, fp16, fp32"),
    (["--log_with", "neptune"], "log_with", "none, tensorboard, wandb, mlflow"),
    (["--select", "best"], "select", "auto, best_val, last"),
    (["--data.pipeline", "turbo"], "data.pipeline", "pil, fast, draft"),
    (["--data.normalize", "imagenet"], "data.normalize", "given, from_train"),
    (["--data.sampler", "balanced"], "data.sampler", "instance, class_balanced, sqrt, progressive"),
    (["--aug.crop", "random"], "aug.crop", "rrc, pad"),
    (["--optim.name", "adam"], "optim.name", "adamw, sgd"),
    (["--optim.schedule", "linear"], "optim.schedule", "cosine, step"),
    (["--method", "ldam", "--loss.drw_mean", "mean"], "loss.drw_mean", "weighted, plain"),
    (["--loss.name", "bal_bce", "--loss.variant", "eq9"], "loss.variant", "eq10, eq6"),
    (["--method", "mislas", "--init_classifier", "x", "--loss.shape", "cubic"], "loss.shape",
     "concave, linear, convex"),
    (["--method", "mislas", "--init_classifier", "x", "--loss.spread", "even"], "loss.spread", "code, paper"),
    (["--method", "reslt", "--loss.groups", "thirds"], "loss.groups", "rank, log_count"),
    (["--method", "ncm", "--init_classifier", "x", "--decoupled.ncm_metric", "l1"], "decoupled.ncm_metric",
     "l2, cosine"),
])
def test_fixed_choices_are_checked_on_the_command_line(argv, key, allowed):
    bad, command = argv[-1], "stage2" if "--init_classifier" in argv else "finetune"
    with pytest.raises(c.ConfigError, match=rf"^command line: --{key}: expected one of {allowed}, got '{bad}'$"):
        c.parse_args(command, ["--data", "tiny", *argv])


def test_fixed_choices_are_checked_in_files(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("loss: {name: ldam}\noptim: {schedule: linear}\n")
    with pytest.raises(c.ConfigError, match=rf"^{recipe}: key 'optim.schedule': expected one of cosine, step, "
                                            "got 'linear'$"):
        c.parse_args("finetune", ["--data", "tiny", "--method", str(recipe)])
    recipe.write_text("loss: {name: ldam, drw_mean: mean}\n")
    with pytest.raises(c.ConfigError, match=rf"^{recipe}: key 'loss.drw_mean': expected one of weighted, plain"):
        c.parse_args("finetune", ["--data", "tiny", "--config", str(recipe)])
    assert c.parse_args("finetune", ["--data", "tiny", "--optim.schedule", "step"]).optim.schedule == "step"


def test_help_shows_the_choices(capsys):
    with pytest.raises(SystemExit):
        c.parse_args("finetune", ["--help"])
    out = capsys.readouterr().out
    assert any(line.split()[:2] == ["--precision", "{auto|bf16|fp16|fp32}"] for line in out.splitlines())
    assert "drw_mean=weighted {weighted|plain}" in out and "ncm_metric" not in out
    with pytest.raises(SystemExit):
        c.parse_args("stage2", ["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: livt stage2 ") and "ncm_metric=l2 {l2|cosine}" in out
    assert "crt" in out.split("methods (--method")[1].splitlines()[0] and "--init_classifier" in out


def test_choice_sets_match_the_code_that_branches_on_them():
    from livt import tracking

    assert c.choices(c.Tracker) == tuple(tracking.TRACKERS)
    assert c.choices(c.Precision) == ("auto", "bf16", "fp16", "fp32") and c.choices(int) == ()


def test_test_prior_file_with_a_loss_that_takes_none_is_refused(tmp_path):
    prior = tmp_path / "prior.txt"
    prior.write_text("0 5\n1 1\n")
    with pytest.raises(c.ConfigError, match=r"--loss\.test_prior_file: loss 'ce' takes no test prior.*only bal_bce"):
        c.parse_args("finetune", ["--data", "tiny", "--from_scratch", "--loss.name", "ce",
                                  "--loss.test_prior_file", str(prior)])
    cfg = c.parse_args("finetune", ["--data", "tiny", "--from_scratch", "--loss.test_prior_file", str(prior)])
    assert cfg.loss.name == "bal_bce" and cfg.loss.test_prior_file == str(prior)


@pytest.mark.parametrize("command", ["finetune", "stage2"])
def test_the_ncm_head_is_refused_for_training(command):
    start = ["--from_scratch"] if command == "finetune" else ["--method", "crt", "--init_classifier", "s1.safetensors"]
    with pytest.raises(c.ConfigError, match=r"--model\.head: the ncm head is not trained.*livt stage2 --method ncm"):
        c.parse_args(command, ["--data", "tiny", *start, "--model.head", "ncm"])
    assert c.parse_args(command, ["--data", "tiny", *start, "--model.head", "cosine"]).model.head == "cosine"
