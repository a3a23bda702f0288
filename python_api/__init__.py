"""mmkernels.api: the trainer-facing torch.autograd API (balancers and unimodal-logit helpers)."""
