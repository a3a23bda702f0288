"""One runner per balancing method: how each plugs into the demo's training step through the public API.

A runner owns the per-step recipe (forward, balancing calls, loss, backward, optimizer step), exposes what it
wants traced (a ratio and a coefficient per modality, as device tensors: no sync in the step), and wraps the parts
that only the balancing adds in `timer.balancing()` so the demo can report their share of the step.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .. import reference as ref

METHODS = [
    "joint",
    "ogm_ge",
    "ogm_ge_cov",
    "ogm",
    "opm",
    "agm",
    "mlb",
    "olm",
    "pmr",
    "mmpareto",
    "valuation",
    "valuation_modality",
]
# not in the default list: "grad" vs "update" modulation under an adaptive optimizer (--optimizer adam, issue 13)
EXTRA_METHODS = ["ogm_ge_update", "mlb_params", "mlb_update"]
LABELS = {
    "joint": "joint (no balancing)",
    "ogm_ge": "OGM-GE (isotropic GE)",
    "ogm_ge_cov": "OGM-GE (covariance GE)",
    "ogm": "OGM",
    "opm": "OPM",
    "agm": "AGM",
    "mlb": "MLB",
    "olm": "OLM",
    "pmr": "PMR",
    "mmpareto": "MMPareto",
    "valuation": "sample-level valuation",
    "valuation_modality": "modality-level valuation",
    "ogm_ge_update": "OGM-GE (isotropic GE), modulate=update",
    "mlb_params": "MLB (parameter mode), modulate=grad",
    "mlb_update": "MLB (parameter mode), modulate=update",
    "audio alone": "audio encoder alone",
    "visual alone": "visual encoder alone",
}


def label(name: str) -> str:
    """The table's label of a method or of a reference run "<view> alone"."""
    if name in LABELS:
        return LABELS[name]
    return f"{name[: -len(' alone')]} encoder alone" if name.endswith(" alone") else name


def concat_unimodal(model, feats, *, detach=True):
    """u_m = f_m W_m^T + b/M from the concat head (TPAMI Eq. 6, Sec. 4.5.2), [M, B, C] (public API helper)."""
    from mmkernels.api import concat_unimodal_logits

    return concat_unimodal_logits(list(feats), model.head, detach=detach)


class JointRunner:
    """Plain joint training; traces the TPAMI ratio rho_m (Eq. 7) of the concat head's unimodal logits."""

    name = "joint"

    def __init__(self, model, *, num_classes, seed, total_steps):
        self.model = model
        self.num_classes = num_classes
        self.seed = seed
        self.total_steps = total_steps

    def parameters(self):
        return list(self.model.parameters())

    train_split = None  # the training Splits member, set by train_method (runners that read the data per epoch)
    batch_size = 64

    def bind(self, opt):
        """Called once with the optimizer, before the first step."""

    def forward_loss(self, inputs, y):
        return F.cross_entropy(self.model(inputs), y)

    def step(self, inputs, y, opt, timer):
        opt.zero_grad(set_to_none=True)
        loss = self.forward_loss(inputs, y)
        loss.backward()
        opt.step()
        return loss.detach()

    @torch.no_grad()
    def trace(self, inputs, y):
        u = concat_unimodal(self.model, self.model.encode(inputs))
        rho = ref.ratio_tpami(ref.scores(u, y, kind="prob"))
        return rho, None

    def end_step(self, step, losses_fn):
        pass

    @torch.no_grad()
    def eval_logits(self, inputs):
        return self.model(inputs)

    @torch.no_grad()
    def unimodal_logits(self, inputs):
        """u_m of the concat head, [M, B, C] (for AGM's linear head these equal its Shapley responses phi_m)."""
        return concat_unimodal(self.model, self.model.encode(inputs))

    @torch.no_grad()
    def unimodal_losses(self, inputs, y):
        return torch.stack([F.cross_entropy(u_m, y) for u_m in self.unimodal_logits(inputs)])


def unimodal_heads(model):
    """One linear head per encoder, [D_m] -> [C] (MLB's and MMPareto's unimodal heads), on the model's device."""
    return torch.nn.ModuleList([torch.nn.Linear(d, model.head.out_features) for d in model.widths]).to(
        model.head.weight.device
    )


def api_class(name):
    """A balancer class of the public API, `mmkernels.api.<name>`."""
    import mmkernels.api as api

    return getattr(api, name)


class _BalancerRunner(JointRunner):
    """Shared pieces of the runners that drive a balancer from mmkernels.api."""

    def __init__(self, model, *, num_classes, seed, total_steps):
        super().__init__(model, num_classes=num_classes, seed=seed, total_steps=total_steps)
        self.bal = self.make_balancer()

    def make_balancer(self):
        raise NotImplementedError

    @torch.no_grad()
    def trace(self, inputs, y):
        return self.bal.ratios.clone(), self.bal.coefficients.clone()


def _weight_tensors(module):
    """The tensors the authors' OGM-GE modulates: conv weights (4-D); for the MLP encoders, the linear weights."""
    ps = [p for p in module.parameters() if p.dim() == 4]
    return ps or [p for p in module.parameters() if p.dim() >= 2]


class _ParamModeRunner(_BalancerRunner):
    """Runners whose balancer acts on listed parameter tensors after backward (modulate_grads()), with
    modulate="grad" or "update". On probe steps they also measure the update-norm ratio achieved per modality:
    ||delta of modality m's listed tensors|| / ||delta the same optimizer would make from the unmodulated gradient||
    (a copy of the optimizer and the tensors stepped on the raw gradient; outside the timed steps)."""

    modulate = "grad"

    def __init__(self, model, **kw):
        self.achieved = []  # [(ratio [M], k [M])] device tensors, read after training
        self._probe = False
        super().__init__(model, **kw)

    def make_balancer(self):
        return None if self.modulate == "update" else self.build_balancer(None)

    def bind(self, opt):
        if self.bal is None:  # modulate="update" needs the optimizer
            self.bal = self.build_balancer(opt)

    def listed(self):
        raise NotImplementedError

    def probe_next_step(self):
        self._probe = True

    def finish_step(self, loss, opt, timer):
        """backward, modulate_grads(), opt.step() (probe steps: plus the counterfactual unmodulated step), and the
        balancer's step (with modulate="update" optimizer= ends it)."""
        loss.backward()
        self.modulate_and_step(opt, timer)
        if self.modulate != "update":
            self.bal.step()
        return loss.detach()

    def modulate_and_step(self, opt, timer):
        """modulate_grads() then opt.step() (probe steps: plus the counterfactual unmodulated step)."""
        probe, self._probe = self._probe, False
        if probe:
            listed = self.listed()
            flat = [p for g in listed for p in g]
            raw = [p.grad.detach().clone() for p in flat]
            before = [p.detach().clone() for p in flat]
            counter = copy.deepcopy(opt)  # same state and hyperparameters, its own tensors
        with timer.balancing():
            self.bal.modulate_grads()
        if probe:
            k = self.bal.coefficients.clone()
        opt.step()
        if not probe:
            return
        index = {id(p): i for i, p in enumerate(q for g in opt.param_groups for q in g["params"])}
        mirror = [q for g in counter.param_groups for q in g["params"]]
        for p, g, b in zip(flat, raw, before):
            q = mirror[index[id(p)]]
            with torch.no_grad():
                q.copy_(b)
            q.grad = g
        others = set(id(mirror[index[id(p)]]) for p in flat)
        for q in mirror:
            if id(q) not in others:
                q.grad = None  # only the listed tensors are compared
        counter.step()
        ratios, i = [], 0
        for group in listed:
            got = torch.stack([(p.detach() - b).norm() for p, b in zip(group, before[i : i + len(group)])]).norm()
            want = torch.stack(
                [(mirror[index[id(p)]].detach() - b).norm() for p, b in zip(group, before[i : i + len(group)])]
            ).norm()
            ratios.append(got / want)
            i += len(group)
        self.achieved.append((torch.stack(ratios), k))


class OGMGERunner(_ParamModeRunner):
    """OGM-GE as the authors run it (official=True): CVPR coefficient, isotropic GE noise N(0, std(grad)^2) added
    after backward to each encoder weight tensor (parameter mode, `modulate_grads()`)."""

    name = "ogm_ge"

    def listed(self):
        return [_weight_tensors(enc) for enc in self.model.encoders]

    def build_balancer(self, opt):
        params = self.listed()
        return api_class("OGMGE")(
            len(params), alpha=0.8, official=True, params=params, seed=self.seed, modulate=self.modulate, optimizer=opt
        )

    def step(self, inputs, y, opt, timer):
        opt.zero_grad(set_to_none=True)
        feats = self.model.encode(inputs)
        with timer.balancing():
            self.bal.observe(concat_unimodal(self.model, feats), y)
        return self.finish_step(F.cross_entropy(self.model.fuse(feats), y), opt, timer)


class OGMGEUpdateRunner(OGMGERunner):
    """OGM-GE (official) with modulate="update": k scales the change opt.step() makes to the listed weights."""

    name = "ogm_ge_update"
    modulate = "update"


class TapRunner(_BalancerRunner):
    """Balancers acting through feature taps (OGM-GE with batch-covariance GE, OGM): identity forward, the backward
    scales modality m's feature gradient (row i by k_m + sigma (z_i - mean z) with covariance noise)."""

    def step(self, inputs, y, opt, timer):
        opt.zero_grad(set_to_none=True)
        feats = self.model.encode(inputs)
        with timer.balancing():
            self.bal.observe(concat_unimodal(self.model, feats), y)
            feats = self.bal.tap(feats)
        loss = F.cross_entropy(self.model.fuse(feats), y)
        loss.backward()
        opt.step()
        self.bal.step()
        return loss.detach()


class OGMGECovRunner(TapRunner):
    """OGM-GE, paper mode: TPAMI Eq. 7/11 coefficient and the batch-covariance noise of Eq. 13-17 through taps."""

    name = "ogm_ge_cov"

    def make_balancer(self):
        return api_class("OGMGE")(len(self.model.encoders), alpha=0.8, noise="covariance", seed=self.seed)


class OGMRunner(TapRunner):
    """OGM (TPAMI Eq. 7, 11): gradient scaling by k_m, no noise."""

    name = "ogm"

    def make_balancer(self):
        return api_class("OGM")(len(self.model.encoders), alpha=0.8, seed=self.seed)


class OPMRunner(_BalancerRunner):
    """OPM (TPAMI Eq. 8, Alg. 1): drop the leading modality's features with probability q from the previous step;
    q scored on this step's undropped features."""

    name = "opm"

    def make_balancer(self):
        return api_class("OPM")(len(self.model.encoders), q_base=0.5, lam=0.5, seed=self.seed)

    def step(self, inputs, y, opt, timer):
        opt.zero_grad(set_to_none=True)
        feats = self.model.encode(inputs)
        with timer.balancing():
            dropped = self.bal.drop(feats)
            self.bal.observe(concat_unimodal(self.model, feats), y)
        loss = F.cross_entropy(self.model.fuse(dropped), y)
        loss.backward()
        opt.step()
        self.bal.step()
        return loss.detach()


class AGMRunner(_BalancerRunner):
    """AGM (ICCV 2023 Eq. 1-10): the balancer runs the encoders once and the fusion head on the 2^M - 2 muted feature
    combinations (muted_mode="reuse": exact for encoders without BatchNorm/dropout, as here); the loss is on
    sum_m phi_m = f(all), whose backward carries kappa_m."""

    name = "agm"
    muted_mode = "reuse"

    def make_balancer(self):
        return api_class("AGM")(
            len(self.model.encoders), alpha=1.0, clip=10.0, muted_mode=self.muted_mode, seed=self.seed
        )

    def step(self, inputs, y, opt, timer):
        opt.zero_grad(set_to_none=True)
        # the whole forward goes through the balancer: the joint step's forward is inside it, so the share below
        # counts the extra head passes, the scores and the Shapley combination, plus one joint forward
        with timer.balancing():
            logits = self.bal.shapley_forward(inputs, y, encoders=list(self.model.encoders), head=self.model.fuse)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        self.bal.step()
        return loss.detach()


class MLBRunner(_BalancerRunner):
    """MLB (Kontras et al. Eq. 3-7): per-encoder linear heads, multi-loss CE(f) + sum_m CE(u_m); encoder m's gradient
    scaled by k_m through a feature tap."""

    name = "mlb"

    def __init__(self, model, **kw):
        self.uni_heads = unimodal_heads(model)
        super().__init__(model, **kw)

    def make_balancer(self):
        return api_class("MLB")(len(self.model.encoders), alpha=0.8, beta_max=2.0, seed=self.seed)

    def parameters(self):
        return list(self.model.parameters()) + list(self.uni_heads.parameters())

    def step(self, inputs, y, opt, timer):
        opt.zero_grad(set_to_none=True)
        feats = self.model.encode(inputs)
        with timer.balancing():
            feats = self.bal.tap(feats)
        fused = self.model.fuse(feats)
        with timer.balancing():
            uni = [h(f) for h, f in zip(self.uni_heads, feats)]
            loss = self.bal.loss(fused, uni, y)
        loss.backward()
        opt.step()
        self.bal.step()
        return loss.detach()

    @torch.no_grad()
    def unimodal_logits(self, inputs):
        """MLB's own per-encoder heads h_m(f_m), the logits its multi-loss trains and its scores read, [M, B, C]."""
        return torch.stack([h(f) for h, f in zip(self.uni_heads, self.model.encode(inputs))])


class MLBParamsRunner(_ParamModeRunner):
    """MLB in parameter mode (the authors' placement): k_m scales encoder m's gradients after backward."""

    name = "mlb_params"

    def __init__(self, model, **kw):
        self.uni_heads = unimodal_heads(model)
        super().__init__(model, **kw)

    def listed(self):
        return [list(enc.parameters()) for enc in self.model.encoders]

    def build_balancer(self, opt):
        return api_class("MLB")(
            len(self.model.encoders),
            alpha=0.8,
            beta_max=2.0,
            seed=self.seed,
            params=self.listed(),
            modulate=self.modulate,
            optimizer=opt,
        )

    parameters = MLBRunner.parameters
    unimodal_logits = MLBRunner.unimodal_logits

    def step(self, inputs, y, opt, timer):
        opt.zero_grad(set_to_none=True)
        feats = self.model.encode(inputs)
        fused = self.model.fuse(feats)
        with timer.balancing():
            uni = [h(f) for h, f in zip(self.uni_heads, feats)]
            loss = self.bal.loss(fused, uni, y)
        return self.finish_step(loss, opt, timer)


class MLBUpdateRunner(MLBParamsRunner):
    """MLB with modulate="update": k_m scales the change opt.step() makes to encoder m."""

    name = "mlb_update"
    modulate = "update"


class PMRRunner(_BalancerRunner):
    """PMR (Fan et al. CVPR 2023; docs/methods/pmr.md): before every epoch the prototypes are refreshed (no grad, eval
    mode) from 10 % of the training rows drawn at random (the authors: the first tenth of the shuffled batches);
    the loss adds sum_m c_m PCE_m, alpha 1.0, mu 0.2 (the authors' argparse defaults), window epochs 0..100."""

    name = "pmr"

    def make_balancer(self):
        return api_class("PMR")(
            len(self.model.encoders), num_classes=self.num_classes, alpha=1.0, mu=0.2, end=100, unit="epoch"
        )

    def _refresh(self, epoch):
        n = len(self.train_split)
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        idx = torch.randperm(n, generator=g)[: max(n // 10, 1)].to(self.train_split.labels.device)
        self.model.eval()
        with torch.no_grad():
            self.bal.update_prototypes(
                self.model.encode([x[idx] for x in self.train_split.views]), self.train_split.labels[idx]
            )
        self.model.train()

    def step(self, inputs, y, opt, timer):
        if self.train_split is None:  # no data set bound (benchmarks): prototypes from the first batch, once
            if self.bal.prototypes is None:
                self.model.eval()
                with torch.no_grad():
                    self.bal.update_prototypes(self.model.encode(inputs), y)
                self.model.train()
        elif self.bal.step_count % max(len(self.train_split) // self.batch_size, 1) == 0:
            epoch = self.bal.step_count // max(len(self.train_split) // self.batch_size, 1)
            self.bal.set_epoch(epoch)
            with timer.balancing():
                self._refresh(epoch)
        opt.zero_grad(set_to_none=True)
        feats = self.model.encode(inputs)
        loss = F.cross_entropy(self.model.fuse(feats), y)
        with timer.balancing():
            loss = loss + self.bal.loss(feats, y)
        loss.backward()
        opt.step()
        self.bal.step()
        return loss.detach()


class MMParetoRunner(_BalancerRunner):
    """MMPareto (Wei & Hu, ICML 2024; docs/methods/mmpareto.md): per-encoder linear unimodal heads (the authors'), the
    encoder gradients of CE(fused) and of CE(head_m(f_m)) combined by the Pareto rule, gamma 1.5, rescale per tensor."""

    name = "mmpareto"

    def __init__(self, model, **kw):
        self.uni_heads = unimodal_heads(model)
        super().__init__(model, **kw)

    def make_balancer(self):
        return api_class("MMPareto")(
            len(self.model.encoders), params=[list(e.parameters()) for e in self.model.encoders]
        )

    parameters = MLBRunner.parameters
    unimodal_logits = MLBRunner.unimodal_logits

    def step(self, inputs, y, opt, timer):
        opt.zero_grad(set_to_none=True)
        feats = self.model.encode(inputs)
        loss = F.cross_entropy(self.model.fuse(feats), y)
        with timer.balancing():  # the unimodal heads, the second backward and the combination
            uni = [F.cross_entropy(h(f), y) for h, f in zip(self.uni_heads, feats)]
            self.bal.backward(loss, uni)
        opt.step()
        self.bal.step()
        return loss.detach()


class ValuationRunner(_BalancerRunner):
    """Sample-level valuation (Wei et al. CVPR 2024; docs/methods/sample_valuation.md): the runner serves its own rows,
    the originals plus the single-modality copies of the last valuation (features of the other modalities zeroed),
    reshuffled per epoch; after each epoch e >= 4 (warm-up 5) a no-grad, eval-mode pass values every training sample
    (v(S) = |S| correct)."""

    name = "valuation"
    kind = "SampleValuation"

    def make_balancer(self):  # needs N, known at bind()
        if self.num_samples is None:
            return None
        return api_class(self.kind)(len(self.model.encoders), self.num_samples, start=5, seed=self.seed)

    def __init__(self, model, **kw):
        self._rows = None
        self.num_samples = None
        self._bal_kw = kw
        super().__init__(model, **kw)

    def bind(self, opt):
        self.num_samples = len(self.train_split) if self.train_split is not None else 1
        self.bal = self.make_balancer()
        self._epoch, self._order, self._pos = 0, None, 0

    def _new_epoch(self, index, keep):
        g = torch.Generator().manual_seed(self.seed * 7919 + self._epoch)
        order = torch.randperm(index.shape[0], generator=g).to(index.device)
        self._index, self._keep, self._order, self._pos = index[order], keep[order], order, 0

    def _valuation_rows(self):
        """The rows valued after this epoch: every original (sample level)."""
        return torch.arange(len(self.train_split), device=self.train_split.labels.device)

    def _value(self):
        tr = self.train_split
        self.model.eval()
        with torch.no_grad():
            idx = self._valuation_rows()
            for i in range(0, idx.shape[0], 1024):
                rows = idx[i : i + 1024]
                feats = self.model.encode([x[rows] for x in tr.views])
                self.bal.value(self.bal.subset_logits(feats, self.model.fuse), tr.labels[rows], rows)
        self.model.train()

    def _batch(self, inputs, y):
        if self.train_split is None:  # benchmarks: the given batch, every modality kept
            return inputs, y, None
        if self._order is None:
            n = len(self.train_split)
            dev = self.train_split.labels.device
            self._new_epoch(torch.arange(n, device=dev), torch.ones(n, len(inputs), dtype=torch.bool, device=dev))
        if self._pos + self.batch_size > self._index.shape[0]:  # epoch over: value, rebuild the rows
            if self.bal.values_after(self._epoch):
                self._value()
            self._epoch += 1
            self.bal.set_epoch(self._epoch)
            self._new_epoch(*self.bal.rows(self._epoch))
        rows = slice(self._pos, self._pos + self.batch_size)
        self._pos += self.batch_size
        idx, keep = self._index[rows], self._keep[rows]
        return [x[idx] for x in self.train_split.views], self.train_split.labels[idx], keep

    def step(self, inputs, y, opt, timer):
        with timer.balancing():
            inputs, y, keep = self._batch(inputs, y)
        opt.zero_grad(set_to_none=True)
        feats = self.model.encode(inputs)
        if keep is not None:
            feats = api_class("apply_keep")(feats, keep)
        loss = F.cross_entropy(self.model.fuse(feats), y)
        loss.backward()
        opt.step()
        self.bal.step()  # the step counter (the rows change per epoch: set_epoch in _batch)
        return loss.detach()


class ModalityValuationRunner(ValuationRunner):
    """Modality-level valuation (docs/methods/modality_valuation.md): phi on floor(0.2 N) samples drawn with
    replacement; the next epoch
    gets floor(p N) extra rows keeping only the larger-gap modality (alpha 1, "linear")."""

    name = "valuation_modality"
    kind = "ModalityValuation"

    def _valuation_rows(self):
        return self.bal.valuation_indices(self._epoch).unique().to(self.train_split.labels.device)


class OLMRunner(_BalancerRunner):
    """OLM (Zong et al. Eq. 5-9): the concat head's branches u_m = f_m W_m^T + b/M (their sum is the joint logits)
    fused as sum_m w_m u_m; every `report_every` steps (one "evaluation") the branches' train and dev losses are
    reported and w is refitted (Alg. 1)."""

    name = "olm"
    report_every = 50

    def make_balancer(self):
        return api_class("OLM")(len(self.model.encoders), lr=0.01, update_steps=10, seed=self.seed)

    def step(self, inputs, y, opt, timer):
        opt.zero_grad(set_to_none=True)
        feats = self.model.encode(inputs)
        with timer.balancing():
            branches = concat_unimodal(self.model, feats, detach=False)
            logits = self.bal.combine(branches)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        self.bal.step()
        return loss.detach()

    def end_step(self, step, losses_fn):
        if losses_fn is None or (step + 1) % self.report_every:
            return
        out = losses_fn()
        if out is not None:
            self.bal.report(*out)

    @torch.no_grad()
    def eval_logits(self, inputs):
        """sum_m w_m u_m with the fitted w (Eq. 5): bal.combine in eval mode (no norm statistics from test data)."""
        self.bal.eval()
        try:
            return self.bal.combine(concat_unimodal(self.model, self.model.encode(inputs)))
        finally:
            self.bal.train()


RUNNERS = {
    "joint": JointRunner,
    "ogm_ge": OGMGERunner,
    "ogm_ge_cov": OGMGECovRunner,
    "ogm": OGMRunner,
    "opm": OPMRunner,
    "agm": AGMRunner,
    "mlb": MLBRunner,
    "olm": OLMRunner,
    "pmr": PMRRunner,
    "mmpareto": MMParetoRunner,
    "valuation": ValuationRunner,
    "valuation_modality": ModalityValuationRunner,
    "ogm_ge_update": OGMGEUpdateRunner,
    "mlb_params": MLBParamsRunner,
    "mlb_update": MLBUpdateRunner,
}


def make_method(name, model, *, num_classes, seed, total_steps):
    if name not in RUNNERS:
        raise ValueError(f"method must be one of {sorted(RUNNERS)}, got {name!r}")
    return RUNNERS[name](model, num_classes=num_classes, seed=seed, total_steps=total_steps)
