"""mmkernels.api: the trainer-facing torch.autograd API (balancers and unimodal-logit helpers).

One balancer class per method, all with the same protocol (see README.md, "The trainer API"):
tap()/drop()/combine()/forward() in the model's forward, observe() (or loss()) on this step's unimodal logits, step()
after optimizer.step(), a modulation window, state_dict()/load_state_dict(), read-only `scores`, `ratios`,
`coefficients` device tensors. Nothing in a training step reads a device value on the host.
"""

from ._base import Balancer
from .agm import AGM
from .mlb import MLB
from .mmpareto import MMPareto
from .ogm import OGM, OGMGE
from .olm import OLM
from .opm import OPM
from .pmr import PMR
from .protocol import StepOutput, eval_mode, fit, train_step
from .valuation import ModalityValuation, SampleValuation, ValuationDataset, apply_keep
from .unimodal import concat_unimodal_logits, summation_unimodal_logits, zero_out_unimodal_logits

__all__ = [
    "Balancer",
    "StepOutput",
    "fit",
    "train_step",
    "eval_mode",
    "OGMGE",
    "OGM",
    "OPM",
    "AGM",
    "MLB",
    "OLM",
    "PMR",
    "MMPareto",
    "SampleValuation",
    "ModalityValuation",
    "ValuationDataset",
    "apply_keep",
    "concat_unimodal_logits",
    "summation_unimodal_logits",
    "zero_out_unimodal_logits",
]
