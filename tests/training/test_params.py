import pytest

from wbc_tasks.training.params import TRAINING_PARAM_SPECS, training_params


def test_defaults_are_valid_and_described():
    params = training_params()
    assert params.image_size == 256 and params.weights == "imagenet" and params.smote is True
    for name, spec in TRAINING_PARAM_SPECS.items():
        assert spec.get("description"), f"{name} has no description for the trigger form"


def test_values_are_coerced_and_checked():
    params = training_params({"image_size": "64", "smote": "false", "learning_rate_head": "0.01", "data_dir": ""})
    assert params.image_size == 64 and params.smote is False and params.learning_rate_head == 0.01
    assert params.data_dir is None


@pytest.mark.parametrize(
    "values, message",
    [
        ({"image_size": 16}, "below the minimum"),
        ({"weights": "random"}, "not one of"),
        ({"epochs_head": "many"}, "expected an integer"),
        ({"learning_rate_head": 0}, "greater than"),
        ({"smote": "maybe"}, "true or false"),
        ({"colour": 1}, "unknown params"),
    ],
)
def test_bad_values_are_refused_with_the_param_named(values, message):
    with pytest.raises(ValueError, match=message):
        training_params(values)
