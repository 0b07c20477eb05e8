import pytest

from wbc_tasks.training.params import TRAINING_PARAM_SPECS, ParamError, training_params


def test_defaults_are_valid_and_described():
    params = training_params()
    assert params.image_size == 256 and params.weights == "imagenet" and params.smote is True
    for name, spec in TRAINING_PARAM_SPECS.items():
        assert spec.get("description"), f"{name} has no description for the trigger form"


def test_values_keep_their_python_types_and_an_empty_folder_means_unset():
    params = training_params({"image_size": 64.0, "smote": False, "learning_rate_head": 1, "data_dir": ""})
    assert params.image_size == 64 and isinstance(params.image_size, int)
    assert params.learning_rate_head == 1.0 and isinstance(params.learning_rate_head, float)
    assert params.smote is False and params.data_dir is None


def test_every_problem_is_named_at_once():
    with pytest.raises(ParamError) as caught:
        training_params({"image_size": 16, "weights": "random"})
    assert "param image_size" in str(caught.value) and "param weights" in str(caught.value)


def test_the_cli_and_the_trigger_form_check_the_same_schema():
    """Airflow's Param validates the form's values with the same fragments: both refuse alike."""
    from airflow.sdk import Param
    from airflow.sdk.definitions.param import ParamValidationError

    for name, value in [("image_size", 16), ("weights", "random"), ("epochs_head", "many"), ("learning_rate_head", 0)]:
        with pytest.raises(ParamValidationError):
            Param(**TRAINING_PARAM_SPECS[name]).resolve(value)
        with pytest.raises(ParamError, match=f"param {name}"):
            training_params({name: value})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"image_size": 16}, "param image_size: 16 is less than the minimum of 32"),
        ({"weights": "random"}, "param weights: 'random' is not one of"),
        ({"epochs_head": "many"}, "param epochs_head: 'many' is not of type 'integer'"),
        ({"learning_rate_head": 0}, "param learning_rate_head: 0 is less than or equal to the minimum of 0"),
        ({"smote": "maybe"}, "param smote: 'maybe' is not of type 'boolean'"),
        ({"colour": 1}, "unknown params"),
    ],
)
def test_bad_values_are_refused_with_the_param_named(values, message):
    with pytest.raises(ParamError, match=message):
        training_params(values)
