"""jaxkd.schema and the blocks of jaxkd.config: defaults, conversions, one-line errors."""

import dataclasses

import ml_collections
import pytest

from jaxkd import config, schema


@dataclasses.dataclass(frozen=True)
class Child(schema.Block):
    weight: float = schema.number(1.0, lo=0.0, lo_open=True)
    name: str = ""


@dataclasses.dataclass(frozen=True)
class Parent(schema.Block):
    mode: str = schema.choice("a", ("a", "b", ""), noun="a mode")
    steps: int = schema.integer(3, minimum=1)
    rate: float = schema.number(0.5, lo=0.0, hi=1.0, hi_open=True)
    pattern: str = schema.regex(".*")
    flag: bool = False
    sizes: tuple = schema.items((1, 2), schema.Integer(minimum=0))
    child: Child = schema.nested(Child)
    children: tuple = schema.items((), schema.Record(Child))

    def check(self):
        if self.mode == "b" and self.steps > 5:
            raise schema.FieldError("steps", f"={self.steps} must be <= 5 in mode 'b'")


def test_defaults_round_trip_through_a_config_dict():
    c = schema.defaults(Parent)
    assert isinstance(c, ml_collections.ConfigDict) and c.child.weight == 1.0
    assert schema.parse(Parent, c, "config.p") == Parent()
    c.rate, c.child.weight, c.sizes = 0, 2, [4, 5]  # ints for floats, a list for a tuple
    p = schema.parse(Parent, c, "config.p")
    assert p.rate == 0.0 and isinstance(p.rate, float) and p.child.weight == 2.0
    assert p.sizes == (4, 5) and Parent(children=({"weight": 3},)).children == (Child(3.0),)
    assert p.kwargs()["steps"] == 3 and "flag" not in p.kwargs(exclude=("flag",))


@pytest.mark.parametrize("fields, message", [
    ({"mode": "c"}, "config.p.mode='c' is not a mode; allowed: a, b, ''"),
    ({"steps": 0}, "config.p.steps=0 must be a positive integer"),
    ({"steps": 2.5}, "config.p.steps=2.5 must be a positive integer"),
    ({"rate": 1.0}, "config.p.rate=1.0 must be in [0, 1)"),
    ({"rate": float("nan")}, "config.p.rate=nan must be in [0, 1)"),
    ({"pattern": "("}, "config.p.pattern='(' is not a valid regex"),
    ({"flag": "yes"}, "config.p.flag='yes' must be True or False"),
    ({"sizes": (1, -1)}, "config.p.sizes[1]=-1 must be an integer >= 0"),
    ({"sizes": "12"}, "config.p.sizes='12' must be a tuple"),
    ({"child": {"weight": 0}}, "config.p.child.weight=0 must be > 0"),
    ({"children": ({"wieght": 1},)}, "config.p.children[0] has unknown field(s) wieght"),
    ({"typo": 1}, "config.p has unknown field(s) typo; fields: mode, steps"),
    ({"mode": "b", "steps": 9}, "config.p.steps=9 must be <= 5 in mode 'b'"),
])
def test_bad_values_are_one_line_naming_the_field(fields, message):
    with pytest.raises(schema.ConfigError) as e:
        schema.parse(Parent, fields, "config.p")
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_library_calls_name_the_argument_and_named_adds_the_block():
    with pytest.raises(schema.FieldError, match="^rate=2 must be in"):
        Parent(rate=2)
    with pytest.raises(schema.FieldError, match=r"^config\.p\.rate=2 must be in"):
        with schema.named("config.p"):
            Parent(rate=2)


def test_every_block_of_a_run_has_its_defaults_and_checks_them():
    c = config.run_config("digits", "mlp", widths=(8,))
    run = config.parse_run(c)
    assert run.data.name == "digits" and run.model.kwargs == {"widths": (8,)}
    assert run.optimizer == config.Optimizer() and run.pruning == config.Pruning()
    assert config.data_config("imagenet2012").eval_split == "validation"
    c.optimizer.learning_rate = -1.0
    with pytest.raises(schema.FieldError, match=r"^config\.optimizer\.learning_rate=-1\.0 "
                                                r"must be > 0"):
        config.parse_run(c)
    with pytest.raises(schema.FieldError, match="config.data.name='svhn' is not a known"):
        config.data_config("svhn")
    chain = config.chain_config({"a": config.run_config("mnist1d", "cnn1d")})
    assert config.smoke(chain).stages.a.num_steps == 2
