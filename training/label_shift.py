"""Logit adjustment against label skew between sites (Menon et al., 2021, "Long-tail learning via
logit adjustment"; for federations: FedLC, Zhang et al., 2022).

A site whose labels are mostly cats learns, on its own, that everything is likely a cat: its
cross-entropy pulls the logits of the classes it never sees down at every step, and averaging
such models is what makes label-skewed federations swing from round to round. If the site's
label prior differs from the federation's by the factor p_site(y) / p_federation(y), then

    p_site(y | x)  ∝  p_federation(y | x) * p_site(y) / p_federation(y),

so training on `logits + strength * (log p_site - log p_federation)` makes the plain logits
estimate the federation's posterior at every site: what is averaged is the same target
everywhere. With IID sites the offset is about zero and nothing changes; the model is used
without any offset afterwards. `strength` 1 is the exact correction; less is a partial one
(measured: 0.5 is better than 1 at Dirichlet 0.1 skew, README "Logit adjustment").

Plain PyTorch; the federation only supplies the federation-wide label counts.
"""
import torch

# Add-one (Laplace) smoothing: a class a site never saw gets a finite, very negative offset
# (about log(1 / n_site)), so its logit is barely pushed down at that site; a zero count would
# give -inf and NaN losses.
SMOOTHING = 1.0


def label_counts(labels, n_classes):
    """How many samples of each class `labels` (int64 tensor) holds, as a list of n_classes ints."""
    return torch.bincount(labels.long(), minlength=n_classes)[:n_classes].tolist()


def log_prior(counts):
    """log p(y) from per-class counts, add-one smoothed (float32 tensor)."""
    counts = torch.as_tensor(counts, dtype=torch.float64) + SMOOTHING
    return (counts / counts.sum()).log().float()


def logit_offset(site_counts, federation_counts, strength):
    """What a site adds to its logits in its training loss (float32 tensor [classes])."""
    if len(site_counts) != len(federation_counts):
        raise ValueError(f"logit_offset: {len(site_counts)} site counts but "
                         f"{len(federation_counts)} federation counts")
    return strength * (log_prior(site_counts) - log_prior(federation_counts))


def adjusted_logits(logits, offset):
    """`logits` + `offset` (on the logits' device); what the training loss sees."""
    return logits + offset.to(device=logits.device, dtype=logits.dtype)
