"""LibMTL 1.1.5's weighting methods in the scenarios of ``vs_anchors.py``, driven as its ``Trainer`` does.

LibMTL's Trainer builds its model as a class deriving from the architecture and the weighting
(``MTLmodel(architecture, weighting)``), which gives the weighting the shared parameters
(``get_share_params``), ``task_num``, ``device`` and ``rep_grad``, and calls ``init_param()``;
every trainable parameter of that model, the weighting's own included, goes to one optimizer.
Per batch it calls ``optimizer.zero_grad()``, ``model.backward(losses, **weight_args)`` and
``optimizer.step()``; it sets ``model.epoch`` before each epoch and, after it,
``model.train_loss_buffer[:, epoch]`` to the epoch's mean task losses. ``libmtl_model`` builds the
same mix-in on the benchmark's network, without LibMTL's encoder/decoder architecture (the
weighting never looks at it). With ``rep_grad=False``, as here, LibMTL takes the gradients of the
shared parameters: every parameter in ``groups``, the trunk in ``heads`` (the heads then keep
their plain task gradients).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from functools import cache
from typing import Any

import numpy as np
import torch
from anchor_methods import GRADNORM_ALPHA, Data, K, Method, split_losses
from torch import Tensor


@cache
def libmtl_weighting() -> types.ModuleType:
    """``LibMTL.weighting`` without ``LibMTL/__init__.py`` (which imports torchvision)."""
    spec = importlib.util.find_spec("LibMTL")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("LibMTL is not installed: pip install --no-deps LibMTL==1.1.5")
    if "LibMTL" not in sys.modules:
        package = types.ModuleType("LibMTL")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["LibMTL"] = package
    return importlib.import_module("LibMTL.weighting")


def libmtl_model(name: str, shared: list[Tensor]) -> Any:
    """LibMTL's weighting ``name`` mixed into a minimal model class, as its Trainer mixes it in."""
    weighting: Any = getattr(libmtl_weighting(), name)

    class Model(weighting):
        task_num, device, rep_grad = K, torch.device("cpu"), False

        def get_share_params(self) -> list[Tensor]:
            return shared

        def zero_grad_share_params(self) -> None:  # LibMTL 1.1.5 predates set_to_none grads
            for p in shared:
                if p.grad is not None:
                    p.grad.zero_()

    model = Model()
    model.init_param()  # as MTLmodel.__init__ does
    return model


def shared_params(method: Method) -> list[Tensor]:
    """LibMTL's shared parameters: all in ``groups``, the trunk's in ``heads``."""
    trunk: list[Tensor] = list(method.net.trunk.parameters())
    return trunk if method.data.scenario == "heads" else method.params


class LibmtlStep(Method):
    """``LibMTL.weighting.MGDA`` (``mgda_gn='none'``) or ``PCGrad``."""

    def __init__(self, data: Data, aggregator: str) -> None:
        super().__init__(data, aggregator)
        self.weighting = libmtl_model({"mgda": "MGDA", "pcgrad": "PCGrad"}[aggregator], shared_params(self))
        self.kwargs = {"mgda_gn": "none"} if aggregator == "mgda" else {}

    def backward(self) -> None:
        self.weighting.backward(split_losses(self.net, self.data), **self.kwargs)


class LibmtlGradNormStep(Method):
    """``LibMTL.weighting.GradNorm`` (``alpha=1.5``): learned task weights ``w = K softmax(s)``.

    ``s`` (LibMTL's ``loss_scale``, a parameter of its model) is stepped by the model's optimizer,
    here the benchmark's Adam. LibMTL's GradNorm does nothing in epoch 0 but backward the plain
    sum; from epoch 1 on it takes the k task gradients of the shared parameters (one
    ``backward(retain_graph=True)`` each), backward's ``L_grad`` into ``s``, and sets the shared
    parameters' gradient to ``Σ w_i g_i`` with the weights before the step; ``L_i(0)`` is
    ``train_loss_buffer[:, 0]``, the first epoch's mean losses. Here each step is one epoch of one
    batch (the Trainer with one batch per epoch): step 1 is the plain sum and stores its losses as
    ``L_i(0)``, GradNorm learns from step 2. The Balancer's ``gradnorm`` has the same schedule:
    weights 1 and ``L_i(0)`` recorded at its first step, learning from the second. From step 2 the
    losses go over as a list, as for MGDA and PCGrad (the Trainer's loss tensor would make each
    task's backward run through every group's graph in ``groups``).
    """

    def __init__(self, data: Data, aggregator: str) -> None:
        super().__init__(data, aggregator)
        self.weighting = libmtl_model("GradNorm", shared_params(self))
        self.weighting.epoch = 0
        self.weighting.train_loss_buffer = np.zeros([K, 1])  # GradNorm reads the first epoch's column only
        self.inner.add_param_group({"params": [self.weighting.loss_scale]})  # the Trainer's one optimizer

    def backward(self) -> None:
        losses = split_losses(self.net, self.data)
        if self.weighting.epoch == 0:  # epoch 0's branch sums a loss tensor, as the Trainer hands it over
            self.weighting.backward(torch.stack(losses), alpha=GRADNORM_ALPHA)
            self.weighting.train_loss_buffer[:, 0] = [loss.item() for loss in losses]
        else:
            self.weighting.backward(losses, alpha=GRADNORM_ALPHA)
        self.weighting.epoch += 1

    def learned_weights(self) -> Tensor:
        """``K softmax(s)``: the weights of the next step."""
        return K * torch.softmax(self.weighting.loss_scale.detach(), dim=0)


def libmtl_step(data: Data, aggregator: str) -> Method:
    return LibmtlGradNormStep(data, aggregator) if aggregator == "gradnorm" else LibmtlStep(data, aggregator)
