import pytest

from training import config
from training.errors import UserError


def test_defaults_validate_once_shards_are_named():
    cfg = config.load(None, ["data.train_shards=/x/{0..1}.tar"])
    assert cfg.validate() is cfg
    assert cfg.train.zero_stage == 0 and cfg.loss.impl == "gather"


def test_toml_deltas_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[data]\nbatch_size = 32\n[train]\nsteps = 7\nexport = false\n')
    cfg = config.load(path, ["optim.lr=0.5", 'model.name="ViT-B-32"', "train.run_dir=/tmp/r"])
    assert (cfg.data.batch_size, cfg.train.steps, cfg.train.export) == (32, 7, False)
    assert cfg.optim.lr == 0.5 and cfg.model.name == "ViT-B-32" and cfg.train.run_dir == "/tmp/r"
    assert cfg.data.workers == config.DataConfig().workers  # untouched keys keep defaults


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = config.load(None, ['data.train_shards="a {b}.tar"', "optim.weight_decay=0", "train.export=false"])
    path = tmp_path / "resolved.toml"
    path.write_text(config.to_toml(cfg))
    assert config.load(path) == cfg


@pytest.mark.parametrize("text, needle", [
    ("[data]\nbatch_sise = 3\n", "data.batch_sise"),
    ("[dat]\nbatch_size = 3\n", "'dat'"),
    ("[train]\nsteps = 'ten'\n", "train.steps must be a int"),
    ("[train\n", "not valid TOML"),
])
def test_bad_config_names_the_problem(tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=None) as info:
        config.load(path)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_override_and_values():
    with pytest.raises(UserError, match="section.key=value"):
        config.load(None, ["steps=3"])
    with pytest.raises(UserError, match="zero_stage"):
        config.load(None, ["train.zero_stage=4", "data.train_shards=x"]).validate()
    with pytest.raises(UserError, match="train_shards"):
        config.load(None).validate()
