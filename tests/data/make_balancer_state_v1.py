"""How tests/data/balancer_state_v1.pt was made: run with the release before balancers became nn.Modules (state
version 1), from the repository root: python tests/data/make_balancer_state_v1.py. Each balancer's state_dict()
after 3 steps (M = 3). Kept for the record: with today's code it writes version-2 states."""

import sys
import torch
import torch.nn.functional as F

sys.path.insert(0, "tests")
import mmkernels.api as api
from _api_models import TinyModel, batch


def run(kind):
    torch.manual_seed(0)
    model = TinyModel(3)
    xs, y = batch(3)
    if kind == "ogm_ge":
        bal = api.OGMGE(3, alpha=2.0, seed=5)
    elif kind == "ogm":
        bal = api.OGM(3, alpha=2.0)
    elif kind == "opm":
        bal = api.OPM(3, seed=5)
    elif kind == "agm":
        bal = api.AGM(3, alpha=1.0)
    elif kind == "mlb":
        bal = api.MLB(3)
    elif kind == "olm":
        bal = api.OLM(3)
    elif kind == "pmr":
        bal = api.PMR(3, num_classes=4)
    elif kind == "mmpareto":
        bal = api.MMPareto(3, params=[list(e.parameters()) for e in model.encoders])
    elif kind == "sample_valuation":
        bal = api.SampleValuation(3, 16)
    elif kind == "modality_valuation":
        bal = api.ModalityValuation(3, 16)
    for step in range(3):
        feats = model.feats(xs)
        u = api.concat_unimodal_logits(feats, model.head)
        if kind in ("ogm_ge", "ogm", "mlb"):
            bal.observe(u, y)
            loss = F.cross_entropy(model.fuse(bal.tap(feats)), y)
            loss.backward()
        elif kind == "opm":
            d = bal.drop(feats)
            bal.observe(u, y)
            F.cross_entropy(model.fuse(d), y).backward()
        elif kind == "agm":
            F.cross_entropy(bal.shapley_forward(xs, y, encoders=list(model.encoders), head=model.fuse), y).backward()
        elif kind == "olm":
            F.cross_entropy(bal.combine(api.concat_unimodal_logits(feats, model.head, detach=False)), y).backward()
            bal.report([1.0 + step, 2.0, 1.5], [1.2, 2.0 - 0.1 * step, 1.6])
        elif kind == "pmr":
            if step == 0:
                bal.begin_refresh()
                bal.refresh([f.detach() for f in feats], y)
                bal.end_refresh()
            (F.cross_entropy(model.fuse(feats), y) + bal.loss(feats, y)).backward()
        elif kind == "mmpareto":
            bal.backward(
                F.cross_entropy(model.fuse(feats), y),
                [F.cross_entropy(u[m].requires_grad_(), y) for m in range(3)]
                if False
                else [
                    F.cross_entropy(api.concat_unimodal_logits(feats, model.head, detach=False)[m], y) for m in range(3)
                ],
            )
        else:
            with torch.no_grad():
                bal.value(bal.subset_logits(feats, model.fuse), y, torch.arange(16))
            bal.set_epoch(step + 1)
            bal.rows(step + 1)
        bal.step()
    return bal.state_dict()


out = {
    k: run(k)
    for k in ["ogm_ge", "ogm", "opm", "agm", "mlb", "olm", "pmr", "mmpareto", "sample_valuation", "modality_valuation"]
}
torch.save(out, "tests/data/balancer_state_v1.pt")
print({k: sorted(v) for k, v in out.items()}["pmr"], out["olm"]["tensors"].keys())
