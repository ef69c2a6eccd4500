"""Config: YAML + diffusers-style CLI overrides, typed parsing, unknown keys, saved resolved config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from memreg.monitor_config import EvalConfig
from memreg.training.config import ConfigError, TrainConfig, load_config, save_config, valid_keys

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")


def test_yaml_then_cli_overrides_win():
    cfg = load_config(["--config", TINY, "--max_train_steps", "6", "--output_dir", "out/x", "--guard.weight", "0.5",
                       "--eval.enabled", "true", "--guard.wen.tau", "3", "--learning_rate=2e-4"])
    assert cfg.max_train_steps == 6 and cfg.output_dir == "out/x" and cfg.learning_rate == 2e-4
    assert cfg.resolution == 32  # from the YAML
    assert cfg.guard.weight == 0.5 and cfg.guard.type == "none"
    assert isinstance(cfg.eval, EvalConfig) and cfg.eval.enabled is True
    assert cfg.guard.wen.tau == 3.0


def test_typed_values():
    cfg = load_config(["--config", TINY, "--guard.tau", "auto", "--snr_gamma", "none", "--center_crop", "false",
                       "--lora_target_modules", "to_q,to_v", "--random_flip", "--seed", "7"])
    assert cfg.guard.tau == "auto" and cfg.snr_gamma is None and cfg.center_crop is False
    assert cfg.lora_target_modules == ["to_q", "to_v"] and cfg.random_flip is True and cfg.seed == 7
    cfg = load_config(["--config", TINY, "--guard.tau", "0.25", "--lora_target_modules", "[to_k, to_out.0]"])
    assert cfg.guard.tau == 0.25 and cfg.lora_target_modules == ["to_k", "to_out.0"]
    with pytest.raises(ConfigError, match="train_batch_size"):
        load_config(["--config", TINY, "--train_batch_size", "two"])
    with pytest.raises(ConfigError, match="center_crop"):
        load_config(["--config", TINY, "--center_crop", "maybe"])


def test_unknown_cli_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"'guard\.wieght'.*'guard\.weight'"):
        load_config(["--config", TINY, "--guard.wieght", "0.5"])
    with pytest.raises(ConfigError, match=r"'learning_rat'.*'learning_rate'"):
        load_config(["--config", TINY, "--learning_rat", "1e-4"])


def test_unknown_yaml_key_names_file_and_closest_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("pretrained_model_name_or_path: m\ntrain_data_dir: d\nguard:\n  probes_per_stp: 3\n")
    with pytest.raises(ConfigError, match=r"'guard\.probes_per_stp' in .*bad\.yaml.*'guard\.probes_per_step'"):
        load_config(["--config", str(p)])


def test_a_key_given_twice_in_yaml_is_an_error_not_the_last_one(tmp_path):
    p = tmp_path / "twice.yaml"
    p.write_text("pretrained_model_name_or_path: m\ntrain_data_dir: d\nlearning_rate: 1e-4\nlearning_rate: 1e-2\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml.*duplicate key 'learning_rate'"):
        load_config(["--config", str(p)])


def test_resolution_must_be_a_multiple_of_8():
    with pytest.raises(ConfigError, match="resolution=36"):
        load_config(["--config", TINY, "--resolution", "36"])


def test_static_contradictions_fail():
    with pytest.raises(ConfigError, match="use_ema"):
        load_config(["--config", TINY, "--use_ema", "true"])
    with pytest.raises(ConfigError, match="guard.type"):
        load_config(["--config", TINY, "--guard.type", "penalti"])
    with pytest.raises(ConfigError, match="guard.tau"):
        load_config(["--config", TINY, "--guard.tau", "high"])
    with pytest.raises(ConfigError, match="dataset"):
        load_config(["--config", TINY, "--train_data_dir", "none"])
    with pytest.raises(ConfigError, match="guard.grad_through"):
        load_config(["--config", TINY, "--guard.grad_through", "uncond"])
    for bad in ("0", "2.5"):   # (0, 1]: the score penalty's force at most the denoising loss's
        with pytest.raises(ConfigError, match="guard.max_force"):
            load_config(["--config", TINY, "--guard.max_force", bad])
    assert load_config(["--config", TINY, "--guard.max_force", "0.5"]).guard.max_force == 0.5


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(["--config", TINY, "--guard.type", "penalty", "--guard.tau", "auto", "--seed", "3"])
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(["--config", str(path)])
    assert again == cfg
    assert yaml.safe_load(path.read_text())["guard"]["type"] == "penalty"


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "sd15_lora_guard.yaml", "sd21_lora_guard.yaml",
                                  "sd15_full_guard.yaml"])
def test_shipped_configs_parse(name):
    cfg = load_config(["--config", str(REPO / "configs" / name)])
    assert isinstance(cfg, TrainConfig)


def test_real_model_configs_fit_a_24gb_gpu_recipe():
    sd21 = load_config(["--config", str(REPO / "configs" / "sd21_lora_guard.yaml")])
    assert sd21.resolution == 768 and sd21.prediction_type in (None, "v_prediction")
    for name in ("sd15_lora_guard.yaml", "sd21_lora_guard.yaml", "sd15_full_guard.yaml"):
        cfg = load_config(["--config", str(REPO / "configs" / name)])
        assert cfg.mixed_precision == "fp16", name
        assert cfg.guard.type == "anisotropy_gate", name
    full = load_config(["--config", str(REPO / "configs" / "sd15_full_guard.yaml")])
    assert full.mode == "full" and full.gradient_checkpointing and full.use_ema


def test_valid_keys_cover_sections():
    keys = valid_keys()
    assert "guard.weight" in keys and "guard.wen.tau" in keys and "eval.heldout_fraction" in keys
    assert "pretrained_model_name_or_path" in keys and "resume_from_checkpoint" in keys


def test_shipped_guard_configs_turn_the_monitor_on():
    for name in ("sd15_lora_guard", "sd21_lora_guard", "sd15_full_guard"):
        cfg = load_config(["--config", str(REPO / "configs" / f"{name}.yaml")])
        assert cfg.guard.type == "anisotropy_gate" and cfg.eval.enabled is True, name
        assert cfg.eval.heldout_fraction > 0 and cfg.eval.preset == ("sd2" if "sd21" in name else "sd1")


def test_eval_keys_while_the_monitor_is_off_are_named_in_a_warning(tmp_path, caplog):
    y = tmp_path / "c.yaml"
    y.write_text("pretrained_model_name_or_path: m\ntrain_data_dir: data\nguard:\n  type: none\neval:\n  enabled: false\n  every_n_steps: 5\n  seeds: 3\n")
    with caplog.at_level("WARNING", logger="memreg.training.config"):
        load_config(["--config", str(y), "--eval.heldout_fraction", "0.1"])
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1
    assert "eval.every_n_steps, eval.heldout_fraction, eval.seeds" in warned[0] and "eval.enabled" in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="memreg.training.config"):
        load_config(["--config", str(y), "--eval.enabled", "true"])              # monitor on: no warning
        load_config(["--config", TINY, "--eval.enabled", "false"])               # only the switch: no warning
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_agc_section():
    cfg = load_config(["--config", TINY, "--guard.type", "agc", "--guard.agc.mem_ratio", "1.5", "--guard.agc.decay", "0.9"])
    assert cfg.guard.type == "agc" and cfg.guard.agc.mem_ratio == 1.5 and cfg.guard.agc.decay == 0.9
    with pytest.raises(ConfigError, match="guard.agc"):
        load_config(["--config", TINY, "--guard.agc.decay", "1.0"])
