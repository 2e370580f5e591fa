"""The one hook accessor and the self-removing hooks context."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qviz.probes.hooks import (
    attached,
    feed_inputs,
    hidden_in,
    hidden_out,
    record_outputs,
    scaled_output,
    with_hidden_in,
    with_hidden_out,
)
from tests.conftest import hook_count, tiny_llama


class KwLayer(nn.Module):
    """Takes its hidden states as a keyword and returns a tuple, as HF decoder layers do."""

    def forward(self, hidden_states=None, scale=1.0):
        return (hidden_states * scale, "extra")


def test_accessor_on_args_kwargs_and_tuples():
    x, y = torch.ones(2), torch.zeros(2)
    assert hidden_in((x, 3), {}) is x
    assert hidden_in((), {"hidden_states": x, "mask": 1}) is x
    assert with_hidden_in((x, 3), {"k": 1}, y) == ((y, 3), {"k": 1})
    args, kw = with_hidden_in((), {"hidden_states": x, "k": 1}, y)
    assert args == () and kw["hidden_states"] is y and kw["k"] == 1
    assert hidden_out((x, "a")) is x and hidden_out([x, "a"]) is x and hidden_out(x) is x
    assert with_hidden_out((x, "a"), y)[0] is y and with_hidden_out((x, "a"), y)[1] == "a"
    assert with_hidden_out(x, y) is y
    with pytest.raises(ValueError, match="hidden_states"):
        hidden_in((), {"mask": 1})


def test_hooks_removed_after_a_raising_forward():
    model = tiny_llama()
    layers = model.model.layers

    def boom(mod, args, kwargs):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), attached() as h:
        h.post(layers[0], lambda m, a, o: None)
        h.pre(layers[1], boom)
        model(torch.tensor([[1, 2, 3]]))
    assert hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"), record_outputs(list(layers)) as outs:
        with attached() as h:
            h.pre(layers[2], boom)
            model(torch.tensor([[1, 2, 3]]))
    assert outs[0] is not None and outs[2] is None
    assert hook_count(model) == 0


def test_kwarg_layer_scale_feed_and_record():
    layer = KwLayer()
    x = torch.arange(3.0)
    with scaled_output(layer, 2.0):
        out = layer(hidden_states=x)
    assert torch.equal(out[0], 2 * x) and out[1] == "extra"
    with feed_inputs([layer], [torch.ones(3)]), record_outputs([layer]) as rec:
        layer(hidden_states=x)
    assert torch.equal(rec[0], torch.ones(3))
    assert torch.equal(layer(hidden_states=x)[0], x) and hook_count(layer) == 0


def test_scaled_output_equals_a_hand_scaled_run():
    model = tiny_llama()
    ids = torch.tensor([[5, 6, 7, 8]])
    layers = model.model.layers
    with torch.no_grad(), record_outputs([layers[2]]) as plain:
        model(ids)
    with torch.no_grad(), scaled_output(layers[1], 3.0), record_outputs([layers[1]]) as scaled:
        model(ids)
    with torch.no_grad(), record_outputs([layers[1]]) as ref:
        model(ids)
    torch.testing.assert_close(scaled[0], 3.0 * ref[0])
    assert plain[0] is not None and hook_count(model) == 0
