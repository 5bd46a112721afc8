import pytest

from tests.conftest import ROOT
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
    cfg = config.load(None, ['data.train_shards="a {b}.tar"', "optim.weight_decay=0", "train.export=false",
                             "train.run_dir=/data/\U0001f600 caf\u00e9\x7f\tx"])
    assert cfg.train.run_dir == "/data/\U0001f600 caf\u00e9\x7f\tx"
    path = tmp_path / "resolved.toml"
    path.write_text(config.to_toml(cfg))
    assert config.load(path) == cfg


@pytest.mark.parametrize("text, needle", [
    ("[data]\nbatch_sise = 3\n", "data.batch_sise"),
    ("[dat]\nbatch_size = 3\n", "'dat'"),
    ("[train]\nsteps = 'ten'\n", "train.steps must be a int"),
    ("[train\n", "not valid TOML"),
    ("[loss]\ninit_temperature = inf\n", "loss.init_temperature must be a finite number, got inf"),
    ("[optim]\nlr = nan\n", "optim.lr must be a finite number"),
])
def test_bad_config_names_the_problem(tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=None) as info:
        config.load(path)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "utf16.toml"
    path.write_bytes("[data]\n".encode("utf-16"))  # as PowerShell's `>` writes it
    with pytest.raises(UserError, match="is not UTF-8 text"):
        config.load(path)


def test_text_knobs_take_the_text_as_written():
    """A path, name or key that reads as a TOML date or number stays the text the user typed."""
    cfg = config.load(None, ["train.run_dir=2024-01-01", "data.s3_access_key_id=12345", 'model.name="ViT-B-32"'])
    assert (cfg.train.run_dir, cfg.data.s3_access_key_id, cfg.model.name) == ("2024-01-01", "12345", "ViT-B-32")
    # any text, quoted with toml_string (as the demo quotes its paths), reads back as itself
    for text in ("/tmp/out\U0001F600/run", '/tmp/we"ird', "back\\slash", "del\x7fx", "tab\tx"):
        assert config.parse_override("train.run_dir=" + config.toml_string(text))["train"]["run_dir"] == text
    # spaces around `=` are TOML's, not the value's: ' /tmp/x' would be a relative path
    cfg = config.load(None, ["train.run_dir = /tmp/x", "model.name = ViT-B-32 ", "train.steps = 7"])
    assert (cfg.train.run_dir, cfg.model.name, cfg.train.steps) == ("/tmp/x", "ViT-B-32", 7)
    with pytest.raises(UserError, match="train.steps must be a int"):
        config.load(None, ["train.steps=2024-01-01"])


def test_bad_override_and_values():
    with pytest.raises(UserError, match="section.key=value"):
        config.load(None, ["steps=3"])
    with pytest.raises(UserError, match="zero_stage"):
        config.load(None, ["train.zero_stage=4", "data.train_shards=x"]).validate()
    with pytest.raises(UserError, match="train_shards"):
        config.load(None).validate()
    with pytest.raises(UserError, match="method.momentum_end 0.5 is below method.momentum 0.99: the cosine"):
        config.load(None, ["method.momentum=0.99", "method.momentum_end=0.5", "data.train_shards=x"]).validate()


def test_settings_that_depend_on_the_processes():
    from training.unimodal.trainer import check_method_layout

    def cfg(*overrides):
        return config.load(None, ["data.train_shards=x", *overrides])

    check_method_layout(cfg("method.name=swav", "method.swav_queue=12"), 4)
    with pytest.raises(UserError, match="method.swav_queue 3 must be a multiple of the 2 processes"):
        check_method_layout(cfg("method.name=swav", "method.swav_queue=3"), 2)
    with pytest.raises(UserError, match="method.swav_queue 1 must be a multiple of the 2 processes"):
        check_method_layout(cfg("method.name=swav", "method.swav_queue=1"), 2)
    with pytest.raises(UserError, match="barlow_twins .* needs at least 2 samples"):
        check_method_layout(cfg("method.name=barlow_twins", "data.batch_size=1"), 1)
    check_method_layout(cfg("method.name=barlow_twins", "data.batch_size=1"), 2)
    with pytest.raises(UserError, match="method.momentum_end 0.99 is below byol's base momentum 0.996"):
        check_method_layout(cfg("method.name=byol", "method.momentum_end=0.99"), 1)  # the paper's base, -1
    check_method_layout(cfg("method.name=moco", "method.momentum_end=0.99"), 1)  # MoCo v2's is constant


@pytest.mark.parametrize("override, needle", [
    ("data.eval_batch_size=0", "data.eval_batch_size must be >= 1, got 0"),
    ("data.shuffle_buffer=-1", "data.shuffle_buffer must be >= 0"),
    ("optim.beta2=1.0", "optim.beta2 must be in [0, 1), got 1.0"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio must be in [0, 1]"),
    ("optim.eps=0", "optim.eps must be > 0"),
    ("train.seed=-1", "train.seed must be in [0, 4294967295]"),
    ("train.seed=99999999999999999999", "train.seed must be in [0, 4294967295]"),
    pytest.param("optim.lr=1" + "0" * 400, "optim.lr must be a finite number", id="optim.lr=1e400"),
    ("loss.init_temperature=inf", "loss.init_temperature must be a finite number"),
    ("model.hf_pooler=mean", "model.hf_pooler must be one of mean_pooler, max_pooler"),
    ("train.log_every=0", "train.log_every must be >= 1"),  # a modulo by zero mid-run otherwise
    ("train.keep_checkpoints=0", "train.keep_checkpoints must be >= 1"),  # would delete the latest one
    ("train.metrics_port=70000", "train.metrics_port must be a port"),
    ("method.knn_k=0", "method.knn_k must be >= 1"),
    ("method.momentum=1.5", "method.momentum must be in [0, 1) (at 1 the target never leaves"),
    ("method.momentum=1", "method.momentum must be in [0, 1) (at 1 the target never leaves"),
    ("method.momentum=-0.5", "method.momentum must be in [0, 1) (at 1 the target never leaves"),
    ("model.context_length=100000", "model.context_length must be in [0, 4096]"),
    ("method.prototypes=1", "method.prototypes must be >= 2 (with one, every code is the same"),
    ("method.queue_size=0", "method.queue_size must be >= 1"),
    ("method.sinkhorn_epsilon=0", "method.sinkhorn_epsilon must be > 0"),
    ("method.crop_min_scale=1.2", "method.crop_min_scale must be in [0, 1]"),
    ("method.name=xyz", "method.name must be one of clip, simclr"),
])
def test_out_of_range_values_are_named_before_a_run_starts(override, needle):
    with pytest.raises(UserError) as info:
        config.load(None, [override, "data.train_shards=x"]).validate()
    assert needle in str(info.value)


def test_every_rule_names_a_real_knob_and_accepts_the_default():
    defaults = config.load(None, ["data.train_shards=x"])
    for key, ok, rule in config._RULES:
        section, _, name = key.partition(".")
        assert ok(getattr(getattr(defaults, section), name)), (key, rule)
    # the demo configs pass as well
    for path in sorted((ROOT / "training" / "configs").glob("*.toml")):
        config.load(path, ["data.train_shards=x"]).validate()
