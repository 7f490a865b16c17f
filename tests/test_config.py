import pytest

from reprpo.config import RunConfig, apply_overrides, from_dict, load_yaml, save_yaml
from reprpo.errors import ConfigError


def test_overrides_nested_and_dotted_and_types():
    cfg = apply_overrides(RunConfig(), {"train": {"lr": "3e-4", "batch_size": 2}, "lora.r": "8", "data.eval": "a=x.json,b=builtin:arith/test", "data.chat_template": "true"}, where="t")
    assert cfg.train.lr == 3e-4 and cfg.train.batch_size == 2 and cfg.lora.r == 8
    assert cfg.data.eval == {"a": "x.json", "b": "builtin:arith/test"}
    assert cfg.data.chat_template is True


def test_yaml_round_trip(tmp_path):
    cfg = apply_overrides(RunConfig(), {"train.beta": 0.3, "out": "o"}, where="t")
    save_yaml(cfg, tmp_path / "c.yaml")
    again = from_dict(load_yaml(tmp_path / "c.yaml"))
    assert again == cfg


@pytest.mark.parametrize("over, needle", [
    ({"train.nope": 1}, "unknown field 'train.nope'"),
    ({"bogus.x": 1}, "unknown config key"),
    ({"train.batch_size": "two"}, "train.batch_size"),
    ({"train.batch_size": 0}, "train.batch_size must be >= 1"),
    ({"train.lr": True}, "train.lr"),
    ({"data.pairing": "some"}, "data.pairing"),
    ({"data.eval": "noequals"}, "NAME=VALUE"),
])
def test_bad_config_names_the_field(over, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        apply_overrides(RunConfig(), over, where="t")


def test_bad_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(p)
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(p)
