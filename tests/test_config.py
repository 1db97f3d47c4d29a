"""The shared value checks of utils.config: types, ranges, numeric strings, and messages that name the
file and the dotted key with a valid example."""
from functools import partial

import pytest

from utils.config import ConfigError, check_choice, check_int, check_list, check_number, check_positive


def test_numeric_strings_are_numbers():
    # PyYAML (YAML 1.1) reads `1e-3` without a dot as the string '1e-3'.
    assert check_positive("1e-3", "model.learning_rate", "a.yaml") == 0.001
    assert check_number("0.5", "x", low=0, high=1) == 0.5
    assert check_int("2000", "save_interval", minimum=1) == 2000
    assert isinstance(check_number(3, "x"), float)


@pytest.mark.parametrize("call, message", [
    (lambda: check_positive(0, "model.learning_rate", "a.yaml", example=0.001),
     "a.yaml: 'model.learning_rate' is 0; expected a number > 0, e.g. 0.001"),
    (lambda: check_number(2, "training.lr_decay", "b.yaml", 0, 1, open_low=True, example=0.1),
     "b.yaml: 'training.lr_decay' is 2; expected a number in (0, 1], e.g. 0.1"),
    (lambda: check_number("fast", "training.lr_decay", "b.yaml", 0, 1),
     "b.yaml: 'training.lr_decay' is 'fast'; expected a number in [0, 1]"),
    (lambda: check_int(1.5, "train_iter", "c.yaml", minimum=0),
     "c.yaml: 'train_iter' is 1.5; expected an integer >= 0, e.g. 1"),
    (lambda: check_int(0, "model.batch_size", "c.yaml", minimum=1, example=16),
     "c.yaml: 'model.batch_size' is 0; expected a positive integer, e.g. 16"),
    (lambda: check_choice("fp64", ("fp32", "bf16"), "training.precision", "d.yaml"),
     "d.yaml: 'training.precision' is 'fp64'; expected one of ['fp32', 'bf16']"),
    (lambda: check_list(5, "training.lr_milestones", "e.yaml", example="[20000]"),
     "e.yaml: 'training.lr_milestones' is 5; expected a list, e.g. [20000]"),
])
def test_errors_name_file_key_and_example(call, message):
    with pytest.raises(ConfigError) as err:
        call()
    assert str(err.value) == message


def test_booleans_and_nan_are_not_numbers():
    for value in (True, False, float("nan"), "nan", None):
        with pytest.raises(ConfigError):
            check_number(value, "x")
    with pytest.raises(ConfigError):
        check_int(True, "x")


def test_list_items_are_checked_with_their_index():
    item = partial(check_int, minimum=1)
    assert check_list((3, "4"), "training.lr_milestones", item=item) == [3, 4]
    with pytest.raises(ConfigError, match=r"'training.lr_milestones\[1\]' is 0"):
        check_list([3, 0], "training.lr_milestones", item=item)
