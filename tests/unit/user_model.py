"""A user model factory as a team would write one (used by test_train_parts)."""

from torch import nn


class Linear(nn.Sequential):
    width: int


def make(spec, input_schema):
    width = int(spec.options.get("width", 16))
    model = Linear(
        nn.Linear(input_schema["num_inputs"], width),
        nn.ReLU(),
        nn.Linear(width, input_schema["num_classes"]),
    )
    model.width = width
    return model
